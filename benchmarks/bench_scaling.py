"""Cost per pixel across resolutions: the HDiT family against a DiT-B/4-shaped transformer, one JSON line each.

    python benchmarks/bench_scaling.py [--compile] [--resolutions 128 256 512 1024]

The HDiT family keeps the HDiT paper's recipe: patch 4, global attention only at the 16x16-token level (depth 4),
and one more neighborhood-attention level (kernel 7, depth 2 down + 2 up) for each doubling of resolution, all of
width 768, the width of the DiT-B/4 shape it is compared with: one level of 12 global-attention layers of width
768 on the same patch-4 tokens (d_ff 2048, so its MACs equal DiT-B/4's), whose attention cost grows with the
square of the token count. Batches keep batch x pixels constant. The number to read is
`ms_per_img_per_mpix`: training time per image per megapixel.
"""

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import bench_config, emit, error_text  # noqa: E402

from hdiffusion.config import validate_config  # noqa: E402

WIDTH, NA_DEPTH, GLOBAL_DEPTH = 768, 2, 4


def base_config(model):
    return {"model": dict({"type": "image_transformer_v2", "input_channels": 3, "patch_size": [4, 4],
                           "mapping_width": 768, "mapping_depth": 1, "sigma_data": 0.5,
                           "loss_weighting": "soft-min-snr"}, **model),
            "dataset": {"type": "imagefolder", "location": "unused", "num_classes": 0}}


def hdit_family(resolution):
    levels = int(math.log2(resolution // 64))  # 128 -> 1 NA level + the global level at 16x16 tokens
    widths = [WIDTH] * (levels + 1)
    depths = [NA_DEPTH] * levels + [GLOBAL_DEPTH]
    attns = [{"type": "neighborhood", "d_head": 64, "kernel_size": 7}] * levels + [{"type": "global", "d_head": 64}]
    return base_config({"input_size": [resolution, resolution], "widths": widths, "depths": depths,
                        "self_attns": attns})


def dit_b4_shape(resolution):
    return base_config({"input_size": [resolution, resolution], "widths": [768], "depths": [12], "d_ffs": [2048],
                        "self_attns": [{"type": "global", "d_head": 64}]})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", nargs="+", type=int, default=[128, 256, 512, 1024])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--pixels-per-step", type=int, default=64 * 128 * 128, help="batch x pixels")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    args.na_backend = None
    torch.backends.cuda.matmul.allow_tf32 = True
    for family, make in [("hdit", hdit_family), ("dit_b4_shape", dit_b4_shape)]:
        for resolution in args.resolutions:
            torch._dynamo.reset()
            batch = max(1, args.pixels_per_step // resolution**2)
            name = f"{family}_{resolution}"
            try:
                record = bench_config(name, validate_config(make(resolution), name), batch, args, forward=False)
                if isinstance(record.get("train_img_s"), float):
                    record["ms_per_img_per_mpix"] = round(1000 / record["train_img_s"] / (resolution**2 / 1e6), 3)
            except Exception as error:  # one broken case must not hide the others' numbers
                record = {"case": name, "error": error_text(error)}
            emit(dict(record, family=family, resolution=resolution), args.out)


if __name__ == "__main__":
    main()
