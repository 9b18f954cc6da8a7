"""Sample quality against sampler steps for a trained model, one JSON line per (sampler, steps).

    python benchmarks/quality_vs_steps.py --checkpoint runs/mnist --with torchscript:benchmarks/mnist_classifier/mnist_classifier.pt

FID (and KID) of --n samples against the model's dataset, through the given feature extractor. With the MNIST
classifier this is FID_mnist: comparable between samplers and step counts here, not with Inception FIDs.
"""

import argparse
import sys
from pathlib import Path

import torch
from accelerate import PartialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train import emit  # noqa: E402

from hdiffusion.data import build_dataset  # noqa: E402
from hdiffusion.evaluation import Statistics, compare, load_extractor, reference_statistics, sample_features  # noqa: E402
from hdiffusion.guidance import random_classes  # noqa: E402
from hdiffusion.inference import load_denoiser  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--with", dest="extractor", default="inception")
    parser.add_argument("--samplers", nargs="+", default=["euler", "heun", "dpmpp_2m", "dpmpp_3m_sde"])
    parser.add_argument("--steps", nargs="+", type=int, default=[4, 8, 16, 32, 64])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--out")
    args = parser.parse_args()
    state = PartialState()
    denoiser, config, step = load_denoiser(args.checkpoint, device=state.device)
    extractor = load_extractor(args.extractor, device=state.device)
    dataset = build_dataset(config)
    reference = reference_statistics(config, dataset, extractor, state)
    seeds = list(range(args.n))
    num_classes = config["dataset"]["num_classes"]
    labels = random_classes(seeds, num_classes) if num_classes else None
    for sampler in args.samplers:
        for steps in args.steps:
            features = sample_features(extractor, denoiser, config, seeds, state, args.batch_size, labels=labels,
                                       sampler=sampler, steps=steps, autocast_dtype=torch.bfloat16)
            scores = compare(Statistics.from_features(features, extractor.key), reference, device=state.device)
            emit({"checkpoint_step": step, "extractor": extractor.name, "n": args.n, "sampler": sampler,
                  "steps": steps, **scores}, args.out)


if __name__ == "__main__":
    main()
