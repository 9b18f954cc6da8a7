"""FID and KID between two image sets, printed as one JSON line: `python -m hdiffusion.metrics A B`.

Each of A and B is one of
    an image folder                          every image under it, recursively
    a dataset config (.json)                 its training set at the model's resolution (statistics cached)
    a statistics file (.npz)                 written by --save-stats, or clean-fid's / pytorch-fid's (mu, sigma)
    a checkpoint (.safetensors, run folder)  --n images sampled on the fly (seeds --seed .. --seed + n - 1)
prefixed with folder:, config:, stats: or checkpoint: where the guess from the name would be wrong.
With --save-stats PATH and one source, its statistics are written to PATH instead.

    python -m hdiffusion.metrics runs/mnist configs/mnist_transformer.json --n 50000
    python -m hdiffusion.metrics samples/ other_samples/
    python -m hdiffusion.metrics configs/cifar10_transformer.json --save-stats cifar10_train.npz
    accelerate launch -m hdiffusion.metrics runs/in128 configs/in128_E.json --n 50000 --precision bf16
"""

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UsageError

KINDS = ("folder", "config", "stats", "checkpoint")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other bad input
        raise UsageError(message)


def parse_args(argv=None):
    p = _Parser(prog="python -m hdiffusion.metrics", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="two image sets to compare (one with --save-stats)")
    p.add_argument("--with", dest="extractor", default="inception",
                   help="feature extractor: inception (clean-fid's, default), dinov2, or torchscript:PATH")
    p.add_argument("--inception-weights", help="a local inception-2015-12-05.pt (default: $HDIFFUSION_INCEPTION, "
                                               "else downloaded once into ~/.cache/hdiffusion)")
    p.add_argument("--n", type=int, default=50000, help="images sampled from a checkpoint (default 50000)")
    p.add_argument("--seed", type=int, default=0, help="first seed of a checkpoint's images (default 0)")
    p.add_argument("--sampler", default="dpmpp_2m", help="sampler for a checkpoint (default dpmpp_2m)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (default 1: none)")
    p.add_argument("--cfg-interval", help="guide only for sigma in LO,HI")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="sample with the EMA weights (default; --no-ema: the raw weights)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="sampling autocast (default fp32)")
    p.add_argument("--ref-n", type=int, default=50000,
                   help="images of a dataset config at most, a fixed random subset beyond (default 50000)")
    p.add_argument("--batch-size", type=int, default=100, help="images per forward pass, per process (default 100)")
    p.add_argument("--num-workers", type=int, default=4, help="image-reading processes (default 4)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="images per KID subset (default 1000)")
    p.add_argument("--save-stats", metavar="PATH", help="write the one source's statistics (.npz) to PATH")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="neither read nor write cached statistics of dataset configs")
    p.add_argument("--device", help="default: cuda if available, else cpu; under accelerate, each process's")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = p.parse_args(argv)
    if args.save_stats and len(args.sources) != 1:
        p.error(f"--save-stats writes the statistics of one source; got {len(args.sources)}")
    if not args.save_stats and len(args.sources) != 2:
        p.error(f"expected two sources to compare (or one with --save-stats); got {len(args.sources)}")
    for name in ["n", "steps", "batch_size", "kid_subsets"]:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ["ref_n", "kid_subset_size"]:
        if getattr(args, name) < 2:
            p.error(f"--{name.replace('_', '-')} must be at least 2, got {getattr(args, name)}")
    if args.num_workers < 0:
        p.error(f"--num-workers must be >= 0, got {args.num_workers}")
    from .inference import parse_interval
    from .sampling import SAMPLERS

    if args.sampler not in SAMPLERS:
        p.error(f"unknown sampler {args.sampler!r}; expected one of {', '.join(SAMPLERS)}")
    args.cfg_interval = parse_interval(args.cfg_interval) if args.cfg_interval else None
    return args


def source_kind(spec):
    """(kind, path) of a source argument: an explicit prefix, else guessed from the file or folder."""
    prefix, _, rest = spec.partition(":")
    if prefix in KINDS and rest:
        kind, path = prefix, Path(rest)
    else:
        path = Path(spec)
        if not path.exists():
            raise UsageError(f"{spec}: no such file or folder")
        run_dir = path.parent if path.name == "checkpoints" else path
        if path.is_dir():
            kind = "checkpoint" if (run_dir / "checkpoints" / "latest").exists() else "folder"
        else:
            kind = {".npz": "stats", ".json": "config", ".safetensors": "checkpoint"}.get(path.suffix.lower())
            if kind is None:
                raise UsageError(f"{spec}: not an image folder, config (.json), statistics file (.npz) or checkpoint "
                                 f"(.safetensors); prefix it with one of {', '.join(k + ':' for k in KINDS)}")
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    return kind, path


def source_statistics(spec, extractor, state, args, say):
    """(Statistics on the main process, None elsewhere; a description of the source for the JSON output)."""
    import torch

    from . import evaluation as ev

    kind, path = source_kind(spec)
    about = {"kind": kind, "path": str(path)}
    if kind == "stats":
        stats = ev.Statistics.load(path)
        if not stats.extractor:
            say(f"note: {path} does not say which features it holds; assumed to match the other set's")
        elif extractor is not None and stats.extractor != extractor.key:
            raise UsageError(f"{path}: made with another feature extractor ({stats.extractor}) than this run's "
                             f"({extractor.key})")
        return stats, dict(about, n=stats.n, source=stats.source)
    if kind == "config":
        from .config import load_config
        from .data import build_dataset

        config = load_config(path)
        dataset = build_dataset(config, path.parent, args.num_workers, progress=args.progress and state.is_main_process)
        stats = ev.reference_statistics(config, dataset, extractor, state, args.ref_n, args.batch_size,
                                        args.num_workers, args.progress, args.cache, say)
        return stats, dict(about, n=min(len(dataset), args.ref_n))
    if kind == "folder":
        images = ev.ImageFiles(path)
        features = ev.image_features(extractor, images, state, args.batch_size, args.num_workers, args.progress,
                                     f"features of {path}")
        stats = ev.Statistics.from_features(features, extractor.key, str(path)) if state.is_main_process else None
        return stats, dict(about, n=len(images))
    from .guidance import random_classes
    from .inference import load_denoiser

    denoiser, config, step = load_denoiser(path, use_ema=args.ema, device=extractor.device)
    seeds = list(range(args.seed, args.seed + args.n))
    num_classes = config["dataset"]["num_classes"]
    say(f"{path}: step {step}; sampling {args.n:,} images with {args.steps} {args.sampler} steps"
        + (f", guidance scale {args.cfg_scale:g}" if args.cfg_scale != 1 else ""))
    features = ev.sample_features(extractor, denoiser, config, seeds, state, args.batch_size,
                                  random_classes(seeds, num_classes) if num_classes else None, args.progress,
                                  device=extractor.device, steps=args.steps, sampler=args.sampler,
                                  cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, autocast_dtype=torch.bfloat16 if args.precision == "bf16" else None)
    stats = None
    if state.is_main_process:
        stats = ev.Statistics.from_features(features, extractor.key, f"{path} step {step}")
    return stats, dict(about, n=args.n, step=step, seeds=f"{seeds[0]}-{seeds[-1]}", sampler=args.sampler,
                       steps=args.steps, cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval,
                       ema=args.ema)


def run(args):
    import torch
    from accelerate import PartialState

    from . import evaluation as ev

    ev.check_extractor_spec(args.extractor)
    kinds = [source_kind(spec) for spec in args.sources]  # bad paths fail before anything loads
    # Several processes (accelerate launch) and no GPU: Accelerate needs cpu=True to pick gloo.
    state = PartialState(cpu=os.environ.get("LOCAL_RANK") is not None and not torch.cuda.is_available())

    def say(message):
        if state.is_main_process:
            print(message, file=sys.stderr)

    device = torch.device(args.device) if args.device else state.device
    extractor = None  # statistics files alone need no network: they are checked against each other
    if any(kind != "stats" for kind, _ in kinds):
        extractor = ev.load_extractor(args.extractor, device, args.inception_weights)
        if extractor.note:
            say(f"note: {extractor.note}")
    results = [source_statistics(spec, extractor, state, args, say) for spec in args.sources]
    if not state.is_main_process:
        return 0
    keys = [stats.extractor for stats, _ in results if stats.extractor]
    if len(set(keys)) > 1:
        raise UsageError(f"the statistics come from different feature extractors: {' and '.join(keys)}")
    name = extractor.name if extractor else keys[0].split(":")[0] if keys else "unknown"
    if args.save_stats:
        stats, about = results[0]
        stats.save(args.save_stats)
        print(json.dumps({"saved": args.save_stats, "extractor": name, "n": stats.n, "source": about}))
        return 0
    (a, about_a), (b, about_b) = results
    scores = ev.compare(a, b, args.kid_subsets, args.kid_subset_size, device=device)
    subset_size = min(args.kid_subset_size, *(len(s.features) for s in (a, b) if s.features is not None))
    print(json.dumps({**scores, "extractor": name, "kid_subsets": args.kid_subsets, "kid_subset_size": subset_size,
                      "a": about_a, "b": about_b}))
    return 0


def main(argv=None):
    try:
        return run(parse_args(argv))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
