#!/usr/bin/env python3
"""Train a small MNIST classifier on CPU and export it as a TorchScript feature extractor for domain FIDs.

    python benchmarks/mnist_classifier/train_classifier.py [--data ../shared/data/MNIST/raw]

Trains on MNIST's 60,000 training digits only, reports the accuracy on the 10,000 test digits, and writes
mnist_classifier.pt beside this script: a TorchScript module mapping [N, 1, 28, 28] images with values in [0, 1]
to the 128 features of its penultimate layer, declaring input_channels = 1 and input_size = [28, 28] so that
`--evaluate-with torchscript:benchmarks/mnist_classifier/mnist_classifier.pt` (train.py) and
`--with torchscript:...` (python -m hdiffusion.metrics) feed it correctly. Its `logits` method gives the class
scores. Then it computes FID and KID between the test and training splits with these features, through the same
code as training's evaluation, as the reference point for MNIST models (results.json).
"""

import argparse
import json
import time
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState

from hdiffusion import evaluation as ev
from hdiffusion.data import read_idx

HERE = Path(__file__).resolve().parent


class MnistClassifier(torch.nn.Module):
    """Three 3x3 conv layers (32, 64, 32 channels, each followed by 2x2 max pooling: 28 -> 14 -> 7 -> 3), a
    128-wide hidden layer (the features) and the 10-way output: 75k parameters."""

    input_channels: int
    input_size: List[int]

    def __init__(self):
        super().__init__()
        self.input_channels, self.input_size = 1, [28, 28]
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(64, 32, 3, padding=1)
        self.hidden = torch.nn.Linear(32 * 3 * 3, 128)
        self.out = torch.nn.Linear(128, 10)

    def forward(self, x):
        """[N, 1, 28, 28] in [0, 1] -> the 128 penultimate features (after the ReLU)."""
        x = F.max_pool2d(F.relu(self.conv1(x * 2 - 1)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.hidden(x.flatten(1)))

    @torch.jit.export
    def logits(self, x):
        return self.out(self.forward(x))


def load_split(data, split):
    images = read_idx(data / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(data / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE.parents[2] / "shared" / "data" / "MNIST" / "raw",
                   help="folder with MNIST's four IDX .gz files")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "mnist_classifier.pt")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    train_images, train_labels = load_split(args.data, "train")
    test_images, test_labels = load_split(args.data, "t10k")
    x = torch.from_numpy(train_images).float().div(255)[:, None]
    y = torch.from_numpy(train_labels)
    model = MnistClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(x) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x))
        for i in range(len(x) // args.batch_size):
            batch = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(model.logits(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    train_seconds = time.perf_counter() - start

    model.eval()
    torch.jit.script(model).save(str(args.out))
    exported = torch.jit.load(str(args.out))
    with torch.no_grad():
        predictions = exported.logits(torch.from_numpy(test_images).float().div(255)[:, None]).argmax(1).numpy()
    accuracy = float((predictions == test_labels).mean())
    print(f"test accuracy {accuracy:.4f}; wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")

    # FID between the test and training splits, through the evaluation code (uint8 images -> features).
    extractor = ev.load_extractor(f"torchscript:{args.out}")
    state = PartialState(cpu=True)
    features = {split: ev.image_features(extractor, images[..., None], state, batch_size=1000)
                for split, images in (("test", test_images), ("train", train_images))}
    stats = {split: ev.Statistics.from_features(f, extractor.key, split) for split, f in features.items()}
    scores = ev.compare(stats["test"], stats["train"])
    half = ev.compare(ev.Statistics.from_features(features["train"][:30000]),
                      ev.Statistics.from_features(features["train"][30000:]))
    results = {"test_accuracy": accuracy, "parameters": sum(p.numel() for p in model.parameters()),
               "train_seconds": round(train_seconds), "epochs": args.epochs, "torch": torch.__version__,
               "fid_test_vs_train": scores["fid"], "kid_test_vs_train": scores["kid"],
               "kid_test_vs_train_std": scores["kid_std"], "fid_train_half_vs_half": half["fid"],
               "sha256": ev.sha256_of(args.out)}
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
