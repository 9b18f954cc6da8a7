"""Faults injected into train.py for tests/test_reliability.py, from outside the package (it has no test hooks).

In this process: `inject(faults, monkeypatch)` before calling train.main. In a subprocess, also under
`accelerate launch`: `python tests/fault_injection.py FAULTS_JSON TRAIN_ARGS...`.

faults (a dict, every key optional; steps count from 1, like metrics.jsonl; a chunk is one micro-batch of one
process, numbered accum * processes + rank as in training.py, None for every chunk):
  nan_loss:  [[step, chunk], ...]  that chunk's loss is NaN
  inf_grad:  [[step, chunk], ...]  that chunk's loss is finite, its gradients infinite
  nan_from:  step                  every loss from this step on is NaN
  signal:    [step, "SIGINT"]      the process sends itself the signal while computing that step
  pause_writing: "step_00000008"   the writer of that checkpoint writes half its file, then sleeps (until killed)
  fail_writing: ["step_00000008", errno]   ... writes half its file, then fails as safetensors does on that errno
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import safetensors
import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parents[1]


class _InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def inject(faults, monkeypatch=None):
    """Wrap training.chunk_seed and training.diffusion_loss, and checkpoint.save_file, to inject `faults`."""
    from hdiffusion import checkpoint, training

    def patch(module, name, value):
        if monkeypatch is not None:
            monkeypatch.setattr(module, name, value)
        else:
            setattr(module, name, value)

    now = {}
    chunk_seed, diffusion_loss, save_file = training.chunk_seed, training.diffusion_loss, checkpoint.save_file
    chosen = lambda key: [list(entry) for entry in faults.get(key, [])]

    def faulty_chunk_seed(seed, step, chunk):
        now.update(step=step + 1, chunk=chunk)
        if faults.get("signal") and faults["signal"][0] == step + 1 and not now.get("signalled"):
            now["signalled"] = True
            os.kill(os.getpid(), getattr(signal, faults["signal"][1]))
        return chunk_seed(seed, step, chunk)

    def faulty_diffusion_loss(*args, **kwargs):
        loss = diffusion_loss(*args, **kwargs)
        here = [[now["step"], now["chunk"]], [now["step"], None]]
        if any(key in chosen("nan_loss") for key in here) or now["step"] >= faults.get("nan_from", float("inf")):
            loss = loss * float("nan")
        if any(key in chosen("inf_grad") for key in here):
            loss = _InfiniteGradient.apply(loss)
        return loss

    def faulty_save_file(tensors, filename, metadata=None):
        pause, fail = faults.get("pause_writing"), faults.get("fail_writing")
        if (pause and pause in Path(filename).name) or (fail and fail[0] in Path(filename).name):
            data = safetensors.torch.save(tensors, metadata)
            with open(filename, "wb") as f:
                f.write(data[:len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            if pause:
                time.sleep(600)
            raise safetensors.SafetensorError(f"Error while serializing: I/O error: {os.strerror(fail[1])} "
                                              f"(os error {fail[1]})")
        return save_file(tensors, filename, metadata=metadata)

    patch(training, "chunk_seed", faulty_chunk_seed)
    patch(training, "diffusion_loss", faulty_diffusion_loss)
    patch(checkpoint, "save_file", faulty_save_file)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import train

    inject(json.loads(sys.argv[1]))
    sys.exit(train.main(sys.argv[2:]))
