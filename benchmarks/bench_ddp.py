"""Where data-parallel training loses time: one training step of a config on synthetic GPU data, per process.

    torchrun --nproc_per_node 1 benchmarks/bench_ddp.py --config configs/in128_E.json --batch-size 128
    torchrun --nproc_per_node 2 benchmarks/bench_ddp.py --config configs/in128_E.json --batch-size 128

--batch-size is per process. Prints one JSON line per variant (rank 0):
- allreduce: time of one all-reduce of a buffer the size of the fp32 gradients, and its bus bandwidth;
- ddp: DistributedDataParallel as Accelerate builds it (default bucket size);
- ddp_static: with static_graph and gradient_as_bucket_view (no per-step search for unused parameters, no copy
  of the gradients into the buckets);
- ddp_bucket100: with 100 MB buckets (fewer, larger all-reduces);
- no_sync: the same processes with gradient synchronisation off, i.e. the step's compute alone: the gap between
  it and ddp is what communication costs, the gap between it and one process is what sharing the machine costs.
With one process only the plain step runs.
"""

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train import cuda_time, emit  # noqa: E402

from hdiffusion.config import load_config  # noqa: E402
from hdiffusion.denoiser import Denoiser  # noqa: E402
from hdiffusion.models import compile_blocks, make_model  # noqa: E402
from hdiffusion.optim import make_optimizer  # noqa: E402


def allreduce_record(numel, device, steps=10):
    buffer = torch.ones(numel, device=device)
    seconds = cuda_time(lambda: dist.all_reduce(buffer), 3, steps)
    world = dist.get_world_size()
    gbytes = numel * 4 / 1e9
    return {"variant": "allreduce", "gbytes": round(gbytes, 3), "ms": round(seconds * 1000, 2),
            "bus_gb_s": round(gbytes * 2 * (world - 1) / world / seconds, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/in128_E.json")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl", device_id=device)

    config = load_config(ROOT / args.config)
    model_config, num_classes = config["model"], config["dataset"]["num_classes"]
    shape = (model_config["input_channels"], *model_config["input_size"])

    def fresh_model():  # a new model per variant: DDP hooks must not pile up on one set of parameters
        torch.manual_seed(0)
        return compile_blocks(make_model(model_config, num_classes).to(device))

    batch = args.batch_size
    images = torch.randn(batch, *shape, device=device)
    labels = {"class_cond": torch.randint(num_classes, (batch,), device=device)} if num_classes else {}
    base = {"device": torch.cuda.get_device_name(), "processes": world, "batch_per_process": batch}

    def run(variant, model, wrapped, sync=True):
        denoiser = Denoiser(wrapped, sigma_data=model_config["sigma_data"], weighting=model_config["loss_weighting"])
        optimizer = make_optimizer(config["optimizer"], model.param_groups(config["optimizer"]["lr"],
                                                                           config["optimizer"]["weight_decay"]))

        def step():
            noise = torch.randn_like(images)
            sigma = torch.randn(batch, device=device).mul(1.2).sub(1.2).exp()
            with nullcontext() if sync else wrapped.no_sync():
                with torch.autocast("cuda", torch.bfloat16):
                    loss = denoiser.loss(images, noise, sigma, **labels).mean()
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = cuda_time(step, args.warmup, args.steps)
        if rank == 0:
            emit({**base, "variant": variant, "step_ms": round(seconds * 1000, 1),
                  "img_per_s_total": round(world * batch / seconds, 1)}, args.out)

    if world == 1:
        model = fresh_model()
        run("single", model, model)
        return
    n_params = sum(p.numel() for p in fresh_model().parameters())
    record = allreduce_record(n_params, device)
    if rank == 0:
        emit({**base, **record}, args.out)
    variants = {
        "ddp": {},
        "ddp_static": {"static_graph": True, "gradient_as_bucket_view": True},
        "ddp_bucket100": {"bucket_cap_mb": 100},
    }
    for variant, kwargs in variants.items():
        model = fresh_model()
        wrapped = DistributedDataParallel(model, device_ids=[device.index], **kwargs)
        run(variant, model, wrapped)
        if variant == "ddp":
            run("no_sync", model, wrapped, sync=False)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
