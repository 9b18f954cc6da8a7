"""Write a class-labelled image folder of random JPEGs, for throughput runs where image content does not matter.

    python benchmarks/make_random_imagefolder.py DIR --classes 1000 --per-class 20 --size 128
"""

import argparse
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image


def write_class(job):
    root, label, per_class, size = job
    folder = Path(root) / f"class{label:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(label)
    for i in range(per_class):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    with Pool() as pool:
        pool.map(write_class, [(args.root, c, args.per_class, args.size) for c in range(args.classes)])
