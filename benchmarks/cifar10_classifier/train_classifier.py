#!/usr/bin/env python3
"""Train a small CIFAR-10 classifier and export it as a TorchScript feature extractor for domain FIDs.

    python benchmarks/cifar10_classifier/train_classifier.py [--data ../shared/data/cifar10]

The CIFAR-10 counterpart of benchmarks/mnist_classifier (read its README): trains on the 50,000 training images
of the parquet files in --data (random crops and flips), reports the accuracy on the 10,000 test images and
writes cifar10_classifier.pt beside this script: a TorchScript module mapping [N, 3, 32, 32] images in [0, 1] to
the 256 features of its penultimate layer, declaring input_channels = 3 and input_size = [32, 32]. Then FID and
KID between the test and training splits through the evaluation code (results.json): the floor for a model's
samples against the training split. Offline stand-in for Inception: not comparable with Inception FIDs.
"""

import argparse
import io
import json
import time
from pathlib import Path
from typing import List

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from accelerate import PartialState
from PIL import Image

from hdiffusion import evaluation as ev

HERE = Path(__file__).resolve().parent


class Cifar10Classifier(torch.nn.Module):
    """Three stages of two 3x3 convs with batch norm (64, 128, 256 channels; 2x2 max pooling after each: 32 -> 16
    -> 8 -> 4), global average pooling, a 256-wide hidden layer (the features) and the 10-way output."""

    input_channels: int
    input_size: List[int]

    def __init__(self):
        super().__init__()
        self.input_channels, self.input_size = 3, [32, 32]
        layers, channels = [], 3
        for width in (64, 128, 256):
            for _ in range(2):
                layers += [torch.nn.Conv2d(channels, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width),
                           torch.nn.ReLU()]
                channels = width
            layers.append(torch.nn.MaxPool2d(2))
        self.features = torch.nn.Sequential(*layers)
        self.hidden = torch.nn.Linear(256, 256)
        self.out = torch.nn.Linear(256, 10)

    def forward(self, x):
        """[N, 3, 32, 32] in [0, 1] -> the 256 penultimate features (after the ReLU)."""
        x = self.features(x * 2 - 1).mean((2, 3))
        return F.relu(self.hidden(x))

    @torch.jit.export
    def logits(self, x):
        return self.out(self.forward(x))


def load_split(data, split):
    """uint8 images [N, 32, 32, 3] and int64 labels [N] from the Hugging Face parquet file of a split."""
    table = pq.read_table(data / f"{split}.parquet").to_pydict()
    images = np.stack([np.asarray(Image.open(io.BytesIO(item["bytes"])).convert("RGB")) for item in table["image"]])
    return images, np.asarray(table["label"], dtype=np.int64)


def augment(x):
    """Random crops (4 pixels of reflection padding) and horizontal flips of a float batch [N, 3, 32, 32]."""
    n = len(x)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2,)).tolist()  # one offset per batch: cheap, and enough here
    x = padded[:, :, dy:dy + 32, dx:dx + 32]
    flip = torch.rand(n, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE.parents[2] / "shared" / "data" / "cifar10",
                   help="folder with CIFAR-10's train.parquet and test.parquet")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=HERE / "cifar10_classifier.pt")
    p.add_argument("--evaluate-only", action="store_true", help="measure the existing --out file again")
    args = p.parse_args()
    if args.evaluate_only:
        previous = json.loads((HERE / "results.json").read_text())
        evaluate(args, {k: previous[k] for k in ("parameters", "train_seconds", "epochs", "device")})
        return

    torch.manual_seed(args.seed)
    train_images, train_labels = load_split(args.data, "train")
    x = torch.from_numpy(train_images).to(args.device).permute(0, 3, 1, 2).float().div(255)
    y = torch.from_numpy(train_labels).to(args.device)
    model = Cifar10Classifier().to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    steps = args.epochs * (len(x) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x), device=args.device)
        for i in range(len(x) // args.batch_size):
            batch = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(model.logits(augment(x[batch])), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - start
    model.cpu().eval()
    torch.jit.script(model).save(str(args.out))
    evaluate(args, {"parameters": sum(p.numel() for p in model.parameters()), "train_seconds": round(train_seconds),
                    "epochs": args.epochs, "device": args.device})


def evaluate(args, training):
    """Test accuracy of the exported file, and FID/KID between the splits and between two random halves of the
    training split (the parquet files are sorted by class: halves in file order would differ in classes)."""
    train_images, _ = load_split(args.data, "train")
    test_images, test_labels = load_split(args.data, "test")
    exported = torch.jit.load(str(args.out))
    with torch.no_grad():
        test_x = torch.from_numpy(test_images).permute(0, 3, 1, 2).float().div(255)
        predictions = torch.cat([exported.logits(chunk).argmax(1) for chunk in test_x.split(1000)]).numpy()
    accuracy = float((predictions == test_labels).mean())
    print(f"test accuracy {accuracy:.4f}; wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")

    # FID between the test and training splits, through the evaluation code (uint8 images -> features).
    extractor = ev.load_extractor(f"torchscript:{args.out}")
    state = PartialState(cpu=True)
    features = {split: ev.image_features(extractor, images, state, batch_size=1000)
                for split, images in (("test", test_images), ("train", train_images))}
    stats = {split: ev.Statistics.from_features(f, extractor.key, split) for split, f in features.items()}
    scores = ev.compare(stats["test"], stats["train"])
    halves = np.random.default_rng(0).permutation(len(train_images)).reshape(2, -1)
    half = ev.compare(*(ev.Statistics.from_features(features["train"][indices]) for indices in halves))
    results = {"test_accuracy": accuracy, **training, "torch": torch.__version__,
               "fid_test_vs_train": scores["fid"], "kid_test_vs_train": scores["kid"],
               "kid_test_vs_train_std": scores["kid_std"], "fid_train_half_vs_half": half["fid"],
               "sha256": ev.sha256_of(args.out)}
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
