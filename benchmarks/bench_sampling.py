"""Sampling speed of the main samplers on one GPU: images/s and model evaluations (NFE), one JSON line each.

    python benchmarks/bench_sampling.py [--cases mnist in128_E] [--steps 50]

Runs the path sample.py runs (inference.generate: per-seed initial noise, per-seed Brownian trees for the SDE
samplers, bf16 autocast) on a model built from the config with random weights (speed does not depend on them;
dpm_adaptive is left out because its step count does), transformer layers compiled.

Each case first gets a line with the bare denoiser's time per forward at the same batch (no grad, bf16 autocast,
a mid sigma, CUDA events), and each sampler's line has overhead = ms_per_nfe / bare_ms_per_nfe: the cost of
everything but the model (noise, solver arithmetic, the host falling behind the GPU), measured in the same run.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train import cuda_time, emit, error_text  # noqa: E402

from hdiffusion.config import load_config  # noqa: E402
from hdiffusion.denoiser import Denoiser  # noqa: E402
from hdiffusion.guidance import random_classes  # noqa: E402
from hdiffusion.inference import generate  # noqa: E402
from hdiffusion.models import compile_blocks, make_model  # noqa: E402

CASES = {"mnist": ("configs/mnist_transformer.json", 256), "in128_E": ("configs/in128_E.json", 64)}
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "lms", "ddim", "dpm_fast", "dpmpp_2s_ancestral",
            "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"]


class CountingDenoiser(torch.nn.Module):
    def __init__(self, denoiser):
        super().__init__()
        self.denoiser, self.calls = denoiser, 0

    def forward(self, x, sigma, **cond):
        self.calls += 1
        return self.denoiser(x, sigma, **cond)


def bare_ms_per_nfe(denoiser, config, batch, labels):
    """ms per no-grad forward of the denoiser alone, on a batch like the samplers' at sigma = sqrt(sigma_min
    sigma_max) (mid-schedule in log sigma), under the same bf16 autocast: the floor of a sampler's ms_per_nfe."""
    model_config = config["model"]
    sigma = math.sqrt(model_config["sigma_min"] * model_config["sigma_max"])
    x = sigma * torch.randn(batch, model_config["input_channels"], *model_config["input_size"], device="cuda")
    sigmas = torch.full([batch], sigma, device="cuda")
    cond = {} if labels is None else {"class_cond": labels.cuda()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        return 1000 * cuda_time(lambda: denoiser(x, sigmas, **cond), warmup=3, steps=20)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--samplers", nargs="+", default=SAMPLERS)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per sampler (the median is reported)")
    parser.add_argument("--out")
    args = parser.parse_args()
    for case in args.cases:
        config_path, batch = CASES[case]
        config = load_config(ROOT / config_path)
        model_config, num_classes = config["model"], config["dataset"]["num_classes"]
        torch.manual_seed(0)
        model = make_model(model_config, num_classes).cuda().eval().requires_grad_(False)
        compile_blocks(model)
        denoiser = CountingDenoiser(Denoiser(model, sigma_data=model_config["sigma_data"]))
        seeds = list(range(batch))
        labels = random_classes(seeds, num_classes) if num_classes else None
        bare = bare_ms_per_nfe(denoiser.denoiser, config, batch, labels)
        emit({"case": case, "bare_denoiser": True, "batch": batch, "bare_ms_per_nfe": round(bare, 2),
              "device": torch.cuda.get_device_name()}, args.out)
        for sampler in args.samplers:
            try:
                run = lambda: generate(denoiser, config, seeds, args.steps, labels, "cuda",  # noqa: E731
                                       torch.bfloat16, sampler=sampler)
                run()  # warm-up: compilation, Brownian-tree setup
                times = []
                for _ in range(args.repeats):  # the median: the host-bound small model varies between runs
                    torch.cuda.synchronize()
                    denoiser.calls = 0
                    start = time.perf_counter()
                    run()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                seconds = sorted(times)[len(times) // 2]
                ms_per_nfe = 1000 * seconds / denoiser.calls
                record = {"case": case, "sampler": sampler, "steps": args.steps, "nfe": denoiser.calls,
                          "batch": batch, "img_s": round(batch / seconds, 1), "ms_per_nfe": round(ms_per_nfe, 2),
                          "bare_ms_per_nfe": round(bare, 2), "overhead": round(ms_per_nfe / bare, 2),
                          "device": torch.cuda.get_device_name()}
            except Exception as error:  # one broken sampler must not hide the others' numbers
                record = {"case": case, "sampler": sampler, "error": error_text(error)}
            emit(record, args.out)


if __name__ == "__main__":
    main()
