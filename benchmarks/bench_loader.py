"""Data loading speed: augmented images per second delivered to the device, alone and beside training.

    python benchmarks/bench_loader.py [--workers 14] [--seconds 10] [--device cuda]
    python benchmarks/bench_loader.py --config configs/cifar10_transformer.json --batch-size 256 --train-steps 300

Without --config, four cases on generated data (one JSON line each): a cached dataset of 32x32 and of 256x256
RGB images (uint8 in memory, the path of MNIST, CIFAR-10 and any dataset up to 2 GiB) and the same sizes decoded
from JPEG files by --workers DataLoader workers (the path of large image folders; the 256x256 files are 512x384
photos-like JPEGs, so each read decodes, resizes and crops). Each delivered batch goes the way of a training
step: to the device, to [-1, 1], through the non-leaking augmentation (p = --augment-prob) with a fresh
generator on the device. With --config, the config's own dataset through the same path, and then, with
--train-steps, train.py's loop on it (bf16 on CUDA), whose img/s the metrics file reports.
"""

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hdiffusion.augmentation import augment_batch  # noqa: E402
from hdiffusion.data import (CachedDataset, StepBatchSampler, build_dataset, infinite_loader,  # noqa: E402
                             to_unit_range)


def smooth_images(n, height, width, seed):
    """n uint8 RGB images [H, W, 3] of smooth random content (blurry blobs plus a little grain), like photos in
    how they compress and decode."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        image = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
        grain = rng.integers(-8, 9, (height, width, 3))
        yield np.clip(image + grain, 0, 255).astype(np.uint8)


def write_jpeg_folder(root, n, height, width):
    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(smooth_images(n, height, width, seed=height)):
        Image.fromarray(image).save(root / f"{i:06d}.jpg", quality=90)
    return root


def delivered_per_second(dataset, batch, workers, augment_prob, device, seconds, warmup=3):
    """Augmented images per second on `device`, the training step's data path without the model."""
    sampler = StepBatchSampler(len(dataset), batch, 1, 1, 0, seed=0)
    batches = infinite_loader(dataset, sampler, workers)

    def one(step):
        images, _ = (t.to(device, non_blocking=True) for t in next(batches))
        generator = torch.Generator(device).manual_seed(step)
        return augment_batch(to_unit_range(images), augment_prob, False, generator)[0]

    for step in range(warmup):
        one(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        one(warmup + count)
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count * batch / (time.perf_counter() - start)


def files_config(location, size):
    """An image folder decoded as it is read (never cached), at size x size RGB: the keys build_dataset reads
    (written out, so that the generated cases need no jsonschema)."""
    return {"model": {"input_channels": 3, "input_size": [size, size]},
            "dataset": {"type": "imagefolder", "location": str(location), "num_classes": 0, "classes": None,
                        "skip_bad_images": False, "cache": False}}


def generated_cases(args, device, tmp):
    cases = [("cached", 32, 256, 50_000), ("cached", 256, 64, 2_000), ("files", 32, 256, 5_000),
             ("files", 256, 64, 1_000)]
    for mode, size, batch, n in cases:
        if mode == "cached":
            images = torch.from_numpy(np.stack(list(smooth_images(n, size, size, seed=size)))).permute(0, 3, 1, 2)
            dataset = CachedDataset(images.contiguous(), torch.zeros(n, dtype=torch.long))
        else:
            height, width = (size, size) if size <= 32 else (384, 512)
            folder = write_jpeg_folder(tmp / f"jpeg{size}", n, height, width)
            dataset = build_dataset(files_config(folder, size))
        rate = delivered_per_second(dataset, batch, args.workers if mode == "files" else 0, args.augment_prob,
                                    device, args.seconds)
        yield {"case": f"{mode}_{size}", "size": size, "batch": batch, "images": n,
               "workers": args.workers if mode == "files" else 0, "augment_prob": args.augment_prob,
               "device": str(device), "img_per_s": round(rate, 1)}


def config_case(args, device, tmp):
    from hdiffusion.config import load_config

    config = load_config(args.config)
    start = time.perf_counter()
    dataset = build_dataset(config, Path(args.config).parent, args.workers)
    build_s = time.perf_counter() - start
    record = {"case": Path(args.config).stem, "batch": args.batch_size, "images": len(dataset),
              "cached": isinstance(dataset, CachedDataset), "build_s": round(build_s, 1), "workers": args.workers,
              "augment_prob": config["model"]["augment_prob"], "device": str(device)}
    record["loader_img_per_s"] = round(delivered_per_second(dataset, args.batch_size, args.workers,
                                                            config["model"]["augment_prob"], device,
                                                            args.seconds), 1)
    if args.train_steps:
        from hdiffusion.training import TrainOptions, train

        run_dir = tmp / "run"
        options = TrainOptions(config=args.config, name="bench", out_dir=str(run_dir), batch_size=args.batch_size,
                               end_step=args.train_steps, save_every=10**9, demo_every=0,
                               log_every=max(1, args.train_steps // 3), num_workers=args.workers,
                               mixed_precision="bf16" if device.type == "cuda" else "no", compile=args.compile,
                               progress=False)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON lines
            train(options)
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        record["train_img_per_s"] = round(lines[-1]["img_per_s"], 1)  # the last third: past start-up
        record["compile"] = args.compile
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers (files cases, --config)")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per case")
    parser.add_argument("--augment-prob", type=float, default=0.12, help="generated cases; --config uses its own")
    parser.add_argument("--config", help="measure this config's dataset instead of generated data")
    parser.add_argument("--batch-size", type=int, default=256, help="with --config")
    parser.add_argument("--train-steps", type=int, default=0, help="with --config: also train this many steps")
    parser.add_argument("--compile", action="store_true", help="with --train-steps: train.py --compile")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        records = [config_case(args, device, Path(tmp))] if args.config else generated_cases(args, device, Path(tmp))
        for record in records:
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
