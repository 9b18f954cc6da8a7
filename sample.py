#!/usr/bin/env python3
"""Sample images from a training checkpoint or an EMA inference file: `python sample.py --checkpoint PATH`."""

import argparse
import sys
from pathlib import Path

from hdiffusion.errors import UsageError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file, a run folder (its latest checkpoint), or an ema.safetensors file")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--steps", type=int, default=50, help="DPM-Solver++(2M) steps on the Karras schedule")
    p.add_argument("--out-dir", default="samples", help="where the PNG files go")
    p.add_argument("--grid", action="store_true", help="also write grid.png with all images")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (--no-ema: the raw training weights)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast dtype")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    for name in ["n", "batch_size", "steps"]:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch
    from tqdm.auto import tqdm

    from hdiffusion.images import make_grid, save_images
    from hdiffusion.inference import generate, load_denoiser, random_classes

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        denoiser, config, step = load_denoiser(args.checkpoint, use_ema=args.ema, device=device)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    num_classes = config["dataset"]["num_classes"]
    seeds = list(range(args.seed, args.seed + args.n))
    labels = random_classes(seeds, num_classes) if num_classes else None
    print(f"{args.checkpoint}: step {step}, {'EMA' if args.ema else 'raw'} weights; {args.n} images, "
          f"{args.steps} DPM-Solver++(2M) steps" + (f"; class-conditional ({num_classes} classes): "
                                                     "drawing a random class per seed" if num_classes else ""))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None
    all_images = []
    with tqdm(total=args.n, unit="img", disable=not args.progress) as progress:
        for start in range(0, args.n, args.batch_size):
            batch_seeds = seeds[start:start + args.batch_size]
            batch_labels = labels[start:start + args.batch_size] if labels is not None else None
            images = generate(denoiser, config, batch_seeds, args.steps, batch_labels, device, autocast_dtype)
            save_images(images, [out_dir / f"seed{s:06d}.png" for s in batch_seeds])
            if args.grid:
                all_images.append(images.cpu())
            progress.update(len(batch_seeds))
    if args.grid:
        make_grid(torch.cat(all_images)).save(out_dir / "grid.png")
    print(f"wrote {args.n} images to {out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
