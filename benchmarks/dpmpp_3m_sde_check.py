"""dpmpp_3m_sde at few steps: this package's coefficient of the second difference (-2 phi_3, the Taylor term,
third order as an ODE solver) against k-diffusion's (-phi_3), and dpmpp_2m_sde, by FID_mnist on a trained MNIST model.

    python benchmarks/dpmpp_3m_sde_check.py RUN_DIR

Prints one JSON line per (sampler, steps, precision). Results: benchmarks/results/mnist_quality/dpmpp_3m_sde_check.jsonl.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hdiffusion import sampling  # noqa: E402
from hdiffusion.data import build_dataset  # noqa: E402
from hdiffusion.evaluation import Statistics, compare, load_extractor, reference_statistics, sample_features  # noqa: E402
from hdiffusion.guidance import random_classes  # noqa: E402
from hdiffusion.inference import load_denoiser  # noqa: E402

EXTRACTOR = "torchscript:benchmarks/mnist_classifier/mnist_classifier.pt"


@torch.no_grad()
def k_diffusion_3m_sde(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                       noise_sampler=None):
    """sampling.sample_dpmpp_3m_sde with k-diffusion's -phi_3 d2 in place of -2 phi_3 d2."""
    model = sampling._model(denoiser, x, extra_args)
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        h = torch.log(sigma / sigma_next)
        z = (1 + eta) * h
        x = (sigma_next / sigma) * torch.exp(-eta * h) * x - torch.expm1(-z) * denoised
        phi_2 = 1 + torch.expm1(-z) / z
        if denoised_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / z - 0.5) * d2
        elif denoised_1 is not None:
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta:
            x = x + sampling._sde_noise(noise_sampler, sigma, sigma_next, h, eta, s_noise)
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
    return x


def main():
    sampling.SAMPLERS["k_diffusion_3m_sde"] = k_diffusion_3m_sde
    sampling.SDE_SAMPLERS += ("k_diffusion_3m_sde",)  # the same Brownian-tree noise as dpmpp_3m_sde
    state = PartialState()
    denoiser, config, step = load_denoiser(sys.argv[1], device=state.device)
    extractor = load_extractor(EXTRACTOR, device=state.device)
    reference = reference_statistics(config, build_dataset(config), extractor, state)
    seeds = list(range(2000))
    labels = random_classes(seeds, config["dataset"]["num_classes"])
    for sampler in ("dpmpp_3m_sde", "k_diffusion_3m_sde", "dpmpp_2m_sde"):
        for steps in (6, 8, 10, 12):
            for dtype in (torch.bfloat16, None):
                features = sample_features(extractor, denoiser, config, seeds, state, 500, labels=labels,
                                           sampler=sampler, steps=steps, autocast_dtype=dtype)
                scores = compare(Statistics.from_features(features, extractor.key), reference, device=state.device)
                print(json.dumps({"step": step, "sampler": sampler, "steps": steps, "bf16": dtype is not None,
                                  "fid": round(scores["fid"], 2)}), flush=True)


if __name__ == "__main__":
    main()
