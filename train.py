#!/usr/bin/env python3
"""Train a diffusion model from a JSON config: `accelerate launch train.py --config C --name N`.

Exit codes: 0 done; 2 bad input (nothing written); 65 diverged (--max-nonfinite-steps non-finite steps in a row);
74 a file could not be written (disk full, read-only; the last checkpoint is intact); 75 stopped by SIGTERM or
SIGINT after saving a checkpoint (run the same command again to resume)."""

import argparse
import sys

from hdiffusion.errors import ArgumentParser, RunError, UsageError


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=_Help)
    p.add_argument("--config", required=True, help="the JSON config file")
    p.add_argument("--name", default="model", help="run name; the run folder is runs/NAME unless --out-dir")
    p.add_argument("--out-dir", help="run folder (checkpoints, demo grids, metrics); default runs/NAME")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per optimizer step, over all processes and accumulation steps together")
    p.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="default: accelerate's config")
    p.add_argument("--end-step", type=int, help="stop after this many optimizer steps (default: never)")
    p.add_argument("--save-every", type=int, default=10000, help="checkpoint every N optimizer steps")
    p.add_argument("--keep-last", type=int, default=3, help="keep the newest K checkpoints")
    p.add_argument("--demo-every", type=int, default=500, help="demo grid every N steps (0: never)")
    p.add_argument("--demo-steps", type=int, default=50, help="sampler steps for demo grids")
    p.add_argument("--sample-n", type=int, default=64, help="images in a demo grid")
    p.add_argument("--evaluate-every", type=int, default=0,
                   help="FID and KID of the EMA model every N steps, against the training set (0: never)")
    p.add_argument("--evaluate-n", type=int, default=2000,
                   help="images sampled per evaluation (with the demo sampler and --demo-steps); metric names "
                        "carry it: fid_2k_train")
    p.add_argument("--evaluate-with", default="inception",
                   help="feature extractor: inception (clean-fid's), dinov2, or torchscript:PATH")
    p.add_argument("--inception-weights",
                   help="a local inception-2015-12-05.pt (default: $HDIFFUSION_INCEPTION, else downloaded once "
                        "into ~/.cache/hdiffusion)")
    p.add_argument("--log-every", type=int, default=10, help="metrics line every N steps")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random in the run")
    p.add_argument("--resume", help="checkpoint file or run folder to resume from "
                                    "(default: the run folder's latest checkpoint, if any)")
    p.add_argument("--lr", type=float, help="base learning rate (overrides optimizer.lr; applied on resume too)")
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--num-workers", type=int, default=4, help="data loader worker processes per process")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (less memory, slower)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients, optimizer state and EMA over the processes (FSDP), for models "
                        "that do not fit one GPU; checkpoints are the same as without it")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--log-with", nargs="*", default=[], choices=["tensorboard", "wandb"], help="trackers")
    p.add_argument("--wandb-project", help="wandb project (implies --log-with wandb)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--max-nonfinite-steps", type=int, default=10,
                   help="stop after this many optimizer steps in a row with a non-finite loss or gradients (each "
                        "is skipped and counted in metrics.jsonl)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only (torch.use_deterministic_algorithms): bitwise-reproducible "
                        "runs on GPUs too, somewhat slower")
    args = p.parse_args(argv)
    positive = ["batch_size", "grad_accum_steps", "save_every", "keep_last", "demo_steps", "sample_n", "log_every",
                "max_nonfinite_steps"]
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.evaluate_n < 2:
        p.error(f"--evaluate-n must be at least 2, got {args.evaluate_n}")
    from hdiffusion.evaluation import check_extractor_spec

    try:
        check_extractor_spec(args.evaluate_with)
    except UsageError as error:
        p.error(f"--evaluate-with: {error}")
    for name in ["end_step", "demo_every", "evaluate_every", "num_workers"]:
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.wandb_project and "wandb" not in args.log_with:
        args.log_with.append("wandb")
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        from hdiffusion.training import TrainOptions, train

        return train(TrainOptions(**dict(vars(args), log_with=tuple(args.log_with))))
    except RunError as error:  # bad input, divergence, a full disk: one line, no traceback (hdiffusion/errors.py)
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
