"""Where a step of train.py spends its time, on the GPU and on the host: torch.profiler over a few steps of a
real run (data loading, DDP, optimizer, EMA and all), per process.

    accelerate launch [--multi_gpu --num_processes 2] --mixed_precision bf16 benchmarks/profile_train.py \\
        --out DIR --skip 30 --active 5 -- --config configs/in128_E.json --batch-size 128 --compile ...

Arguments after `--` go to train.py (--end-step is set to skip + active + 2). The first --skip steps (compilation,
warm-up) are not recorded. Prints one JSON line per process:
- step_ms: wall time per recorded step; gpu_busy_ms: the time per step that some kernel, copy or fill ran on
  this GPU (any stream); gpu_idle: 1 - busy / wall. A GPU idle for a large share of the step waits for the host
  (or, under DDP, for the other GPU);
- host_blocked_ms: per step, host time inside CUDA calls that can wait for the GPU (synchronizations, copies);
- launches: kernel launches per step; top_host_ops: the operators with the most host time of their own;
- graph_breaks, graphs: dynamo's counts for the whole run (regional compilation: a break splits a layer).
Rank 0 also writes its Chrome trace (DIR/trace_rank0.json.gz, chrome://tracing or ui.perfetto.dev).
"""

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile, schedule

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from hdiffusion import training  # noqa: E402

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
# CUDA calls that can wait for the GPU: synchronizations, and copies (one to or from pageable memory waits for the
# work queued before it; an asynchronous one between the GPU and page-locked memory returns at once).
BLOCKING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def union_length(intervals):
    """Total length covered by [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarize(trace, steps):
    """Per-step figures from a Chrome trace of `steps` recorded profiler steps."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    step_spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["name"].startswith("ProfilerStep#")]
    begin, end = min(s for s, _ in step_spans), max(e for _, e in step_spans)
    wall = end - begin

    def clipped(e):
        return max(e["ts"], begin), min(e["ts"] + e["dur"], end)

    gpu = [clipped(e) for e in events
           if e.get("cat") in GPU_CATEGORIES and e["ts"] < end and e["ts"] + e["dur"] > begin]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime" and begin <= e["ts"] < end]
    blocked = sum(e["dur"] for e in runtime if e["name"].startswith(BLOCKING_CALLS))
    launches = sum(1 for e in runtime if "LaunchKernel" in e["name"] or e["name"] == "cuLaunchKernel")
    busy = union_length(gpu)
    return {"step_ms": round(wall / steps / 1000, 2), "gpu_busy_ms": round(busy / steps / 1000, 2),
            "gpu_idle": round(1 - busy / wall, 3), "host_blocked_ms": round(blocked / steps / 1000, 2),
            "launches": round(launches / steps)}


def main():
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--skip", type=int, default=30, help="steps before recording (compilation, warm-up)")
    parser.add_argument("--active", type=int, default=5, help="steps recorded")
    parser.add_argument("--tag", default="", help="a label copied into the JSON line")
    args = parser.parse_args(argv[:split])
    train_argv = argv[split + 1:] + ["--end-step", str(args.skip + args.active + 2)]
    rank = int(os.environ.get("RANK", 0))

    profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                       schedule=schedule(wait=args.skip - 2, warmup=2, active=args.active, repeat=1))
    exchange = training.StepGuard.exchange

    def exchange_and_step(self, stop_requested):  # StepGuard.exchange runs once per optimizer step
        result = exchange(self, stop_requested)
        profiler.step()
        return result

    training.StepGuard.exchange = exchange_and_step
    with profiler:
        code = train.main(train_argv)
    if code:
        sys.exit(code)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        profiler.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
        if rank == 0:
            with open(path, "rb") as raw, gzip.open(out / "trace_rank0.json.gz", "wb") as packed:
                shutil.copyfileobj(raw, packed)
    averages = profiler.key_averages()
    top = sorted(averages, key=lambda a: a.self_cpu_time_total, reverse=True)[:12]
    record = {"tag": args.tag, "rank": rank, "world": int(os.environ.get("WORLD_SIZE", 1)),
              **summarize(trace, args.active),
              "graph_breaks": sum(counters["graph_break"].values()),
              "graphs": counters["stats"].get("unique_graphs", 0),
              "break_reasons": sorted({reason.splitlines()[0][:120] for reason in counters["graph_break"]}),
              "top_host_ops": [(a.key, round(a.self_cpu_time_total / args.active / 1000, 2), a.count // args.active)
                               for a in top]}
    line = json.dumps(record)
    print(line, flush=True)
    with open(out / f"profile_rank{rank}.jsonl", "a") as file:
        file.write(line + "\n")


if __name__ == "__main__":
    main()
