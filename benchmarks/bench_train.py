"""Training and sampling-forward speed of HDiT configs on one GPU, one JSON line per case.

    python benchmarks/bench_train.py [--cases flowers256_na in128_E ...] [--compile] [--na-backend flex]

Each case builds the model from its config, then times full training steps (EDM loss through the Denoiser,
bf16 autocast, AdamW with the model's parameter groups, synthetic data already on the GPU) and no-grad denoiser
forwards at sigma 10 with twice the training batch. Times come from CUDA events around `--steps` steps after
`--warmup` steps; train_tflops counts forward + backward as 3x the forward MACs, 2 FLOPs per MAC.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hdiffusion.config import load_config  # noqa: E402
from hdiffusion.denoiser import Denoiser  # noqa: E402
from hdiffusion.flops import count_macs  # noqa: E402
from hdiffusion.models import compile_blocks, make_model  # noqa: E402
from hdiffusion.optim import make_optimizer  # noqa: E402

# name: (config, training batch, model overrides)
CASES = {
    "mnist": ("configs/mnist_transformer.json", 256, {}),
    "flowers256_na": ("configs/oxford_flowers.json", 64, {}),
    "flowers256_sw": ("configs/oxford_flowers_shifted_window.json", 64, {}),
    "in128_E": ("configs/in128_E.json", 128, {}),
    "ffhq1024": ("configs/ffhq1024.json", 8, {}),
}


def set_na_backend(config, backend):
    for attn in config["model"]["self_attns"]:
        if attn["type"] == "neighborhood":
            attn["backend"] = backend


def cuda_time(function, warmup, steps):
    for _ in range(warmup):
        function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / steps


def bench_case(name, args):
    config_path, batch, overrides = CASES[name]
    config = load_config(ROOT / config_path)
    config["model"].update(overrides)
    return bench_config(name, config, batch, args)


def bench_config(name, config, batch, args, forward=True):
    """Time training steps (and, with forward=True, sampling forwards) of one validated config."""
    if args.na_backend:
        set_na_backend(config, args.na_backend)
    model_config, num_classes = config["model"], config["dataset"]["num_classes"]
    shape = (model_config["input_channels"], *model_config["input_size"])
    model = make_model(model_config, num_classes)
    gmac = count_macs(model, shape) / 1e9
    record = {"case": name, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
              "gmac_per_img": round(gmac, 2), "batch": batch, "compile": args.compile,
              "backend": args.na_backend or "auto", "device": torch.cuda.get_device_name()}
    model = model.cuda()
    if args.compile:
        compile_blocks(model)
    denoiser = Denoiser(model, sigma_data=model_config["sigma_data"], weighting=model_config["loss_weighting"])
    optimizer_config = config["optimizer"]
    optimizer = make_optimizer(optimizer_config, model.param_groups(optimizer_config["lr"],
                                                                    optimizer_config["weight_decay"]))
    images = torch.randn(batch, *shape, device="cuda")
    labels = torch.randint(num_classes, (batch,), device="cuda") if num_classes else None
    cond = {"class_cond": labels} if num_classes else {}

    def train_step():
        noise = torch.randn_like(images)
        sigma = torch.randn(batch, device="cuda").mul(1.2).sub(1.2).exp()
        with torch.autocast("cuda", torch.bfloat16):
            loss = denoiser.loss(images, noise, sigma, **cond).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    try:
        compile_start = time.perf_counter()
        train_step()
        torch.cuda.synchronize()
        record["first_step_s"] = round(time.perf_counter() - compile_start, 1)
        seconds = cuda_time(train_step, args.warmup, args.steps)
        record["train_img_s"] = round(batch / seconds, 1)
        record["train_tflops"] = round(batch / seconds * 3 * 2 * gmac / 1000, 1)
        record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except torch.OutOfMemoryError:
        record["train_img_s"] = "oom"
        record["peak_gib"] = f">{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f}"
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    torch.cuda.empty_cache()
    if not forward:
        return record

    fwd_images = torch.randn(2 * batch, *shape, device="cuda")
    fwd_cond = {"class_cond": torch.randint(num_classes, (2 * batch,), device="cuda")} if num_classes else {}
    sigma = torch.full((2 * batch,), 10.0, device="cuda")

    @torch.no_grad()
    def forward():
        with torch.autocast("cuda", torch.bfloat16):
            denoiser(fwd_images, sigma, **fwd_cond)

    try:
        seconds = cuda_time(forward, args.warmup, args.steps)
        record["fwd_img_s"] = round(2 * batch / seconds, 1)
    except torch.OutOfMemoryError:
        record["fwd_img_s"] = "oom"
    del model, denoiser
    torch.cuda.empty_cache()
    return record


def error_text(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"


def emit(record, out=None):
    """Print one JSON line, and append it to `out` when given."""
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of the transformer layers")
    parser.add_argument("--na-backend", choices=["auto", "flex", "natten", "reference"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", help="append the JSON lines to this file too")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    for name in args.cases:
        torch._dynamo.reset()  # each case compiles from scratch, as a fresh training run would
        try:
            record = bench_case(name, args)
        except Exception as error:  # one broken case must not hide the others' numbers
            record = {"case": name, "compile": args.compile, "backend": args.na_backend or "auto",
                      "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
