"""Share of the main thread's samples per (innermost hdiffusion/train.py frame, innermost frame) in py-spy's
collapsed stacks (benchmarks/profile_ddp_host.sh), largest first.

    python benchmarks/summarize_profile.py benchmarks/results/scale_out/profile/rank0_collapsed.txt.gz
"""

import collections
import gzip
import sys


def main(path, top=12):
    shares, total = collections.Counter(), 0
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as lines:
        for line in lines:
            stack, count = line.rstrip().rsplit(" ", 1)
            frames = stack.split(";")
            if not frames[0].startswith("<module> (train.py"):  # the main thread only
                continue
            ours = [frame for frame in frames if "hdiffusion/" in frame or "train.py" in frame]
            shares[(ours[-1], frames[-1])] += int(count)
            total += int(count)
    print(f"{path}: {total} samples of the main thread")
    for (ours, inner), count in shares.most_common(top):
        print(f"{100 * count / total:5.1f}%  {ours}  <-  {inner}")


if __name__ == "__main__":
    main(sys.argv[1])
