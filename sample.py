#!/usr/bin/env python3
"""Sample images from a training checkpoint or an EMA inference file: `python sample.py --checkpoint PATH`.

One PNG per seed, named by its seed; image i depends on its seed alone, not on the batch size or the number of
processes (`accelerate launch sample.py ...` splits the seeds between the processes)."""

import argparse
import sys

from hdiffusion.errors import ArgumentParser, RunError, UsageError
from hdiffusion.sampling import SAMPLERS

SAMPLER_NAMES = list(SAMPLERS)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # flags without a default say in their help what happens
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=_Help)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file, a run folder (its latest checkpoint), or an ema.safetensors file")
    p.add_argument("--seeds", help="seeds to sample, e.g. 0-63 or 0-3,10,20-22 (ranges inclusive); "
                                   "default: --seed to --seed + n - 1")
    p.add_argument("--seed", type=int, default=0, help="first seed, when no --seeds")
    p.add_argument("--n", type=int, help="number of images, when no --seeds (default 64)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass, per process")
    p.add_argument("--sampler", default="dpmpp_2m", help=f"one of {', '.join(SAMPLER_NAMES)}")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (dpm_fast: model evaluations)")
    p.add_argument("--schedule", default="karras", help="sigma schedule: karras, exponential, polyexponential, vp")
    p.add_argument("--sigma-min", type=float, help="lowest nonzero sigma of the schedule (default: the model's)")
    p.add_argument("--sigma-max", type=float, help="highest sigma of the schedule (default: the model's)")
    p.add_argument("--rho", type=float, help="karras / polyexponential rho (default 7 / 1)")
    p.add_argument("--eta", type=float, help="noise of the ancestral and SDE samplers (default 1; 0: the ODE)")
    p.add_argument("--churn", type=float, help="S_churn of euler, heun and dpm_2 (Karras et al. 2022; default 0)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: no guidance)")
    p.add_argument("--cfg-interval", help="guide only for sigma in LO,HI, e.g. 0.28,2.9")
    classes = p.add_mutually_exclusive_group()
    classes.add_argument("--class", dest="class_label", type=int,
                         help="class of every image (default: a random class per seed)")
    classes.add_argument("--classes", help="classes taken in turn over the seeds, e.g. 0,1,2")
    p.add_argument("--out-dir", default="samples", help="where the PNG files go")
    p.add_argument("--grid", nargs="?", const="auto",
                   help="also write grid.png: of all images, or COLUMNSxROWS of the first ones (e.g. 8x8)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (--no-ema: the raw training weights)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast dtype")
    p.add_argument("--device", help="default: cuda if available, else cpu; under accelerate, each process's")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    for name in ["n", "batch_size", "steps"]:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.sampler not in SAMPLER_NAMES:
        p.error(f"unknown sampler {args.sampler!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    if args.cfg_scale < 0:
        p.error(f"--cfg-scale must be >= 0, got {args.cfg_scale}")
    if args.seeds is None and args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        from hdiffusion.inference import SampleOptions, parse_interval, parse_seeds, sample_to_directory

        if args.seeds is not None:
            seeds = parse_seeds(args.seeds)
        else:
            seeds = parse_seeds(f"{args.seed}-{args.seed + (64 if args.n is None else args.n) - 1}")
        classes = None
        if args.classes is not None:
            try:
                classes = [int(c) for c in args.classes.split(",")]
            except ValueError:
                raise UsageError(f"--classes {args.classes!r}: expected class numbers like 0,1,2") from None
        options = SampleOptions(
            checkpoint=args.checkpoint, seeds=seeds, out_dir=args.out_dir, sampler=args.sampler, steps=args.steps,
            schedule=args.schedule, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho, eta=args.eta,
            churn=args.churn, cfg_scale=args.cfg_scale,
            cfg_interval=None if args.cfg_interval is None else parse_interval(args.cfg_interval),
            class_label=args.class_label, classes=classes, batch_size=args.batch_size, grid=args.grid,
            ema=args.ema, precision=args.precision, device=args.device, progress=args.progress)
        return sample_to_directory(options)
    except RunError as error:  # bad input (2), an unwritable --out-dir (74): one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
