import functools
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _shared_data():
    """Real data beside the project (../shared/data; tests only, never the product)."""
    candidates = [os.environ.get("HDIFFUSION_SHARED_DATA"), ROOT.parent / "shared" / "data", "/work/shared/data"]
    for candidate in filter(None, candidates):
        if Path(candidate, "MNIST").is_dir():
            return Path(candidate)
    return ROOT.parent / "shared" / "data"  # tests that need it fail naming this path


SHARED_DATA = _shared_data()


def tiny_config(**dataset):
    """A 66k-parameter class-conditional HDiT on 8x8 gray images: runs a training step in milliseconds."""
    return {
        "model": {
            "type": "image_transformer_v2", "input_channels": 1, "input_size": [8, 8], "patch_size": [2, 2],
            "widths": [32, 32], "depths": [1, 1],
            "self_attns": [{"type": "neighborhood", "d_head": 16, "kernel_size": 3}, {"type": "global", "d_head": 16}],
            "mapping_width": 32, "mapping_depth": 1, "dropout_rate": 0.1, "sigma_data": 0.5,
            "loss_weighting": "soft-min-snr", "sigma_sample_density": {"type": "cosine-interpolated"},
        },
        "dataset": dataset or {"type": "digits", "num_classes": 10},
        "optimizer": {"type": "adamw", "lr": 2e-3},
        "ema_sched": {"type": "inverse", "power": 0.75, "max_value": 0.999},
    }


@pytest.fixture
def write_config(tmp_path):
    def write(config, name="config.json"):
        path = tmp_path / name
        path.write_text(json.dumps(config))
        return path
    return write


def run_script(script, *args, check=True, **kwargs):
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                            cwd=kwargs.pop("cwd", ROOT), **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def free_port():
    """A free TCP port, so that concurrent `accelerate launch` runs (other test sessions) never share one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(num_processes, script, *args):
    """`accelerate launch` of a script on `num_processes` CPU processes (gloo)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), str(script), *map(str, args)]


@functools.lru_cache
def load_script(name):
    """train.py or sample.py as a module, to call its main(argv) in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_in_process(*args, faults=None):
    """train.py's main(argv) in this process, without an interpreter's start-up: its exit code. `faults` are
    injected for this call only (tests/fault_injection.py)."""
    import torch
    from accelerate.state import AcceleratorState

    from fault_injection import inject

    deterministic = torch.are_deterministic_algorithms_enabled()
    AcceleratorState._reset_state(True)  # a fresh Accelerator per run, as in a new process
    with pytest.MonkeyPatch.context() as patch:
        if faults:
            inject(faults, patch)
        try:
            return load_script("train").main([str(a) for a in args])
        finally:
            AcceleratorState._reset_state(True)
            torch.use_deterministic_algorithms(deterministic)


# A shared reference run -----------------------------------------------------------------------------------

def train_args(config_path, run_dir, end_step, *extra):
    """train.py flags of the reference run and of every run compared with it."""
    return ["--config", config_path, "--out-dir", run_dir, "--end-step", end_step, "--batch-size", 16,
            "--grad-accum-steps", 2, "--save-every", 4, "--log-every", 1, "--demo-every", 0, "--num-workers", 0,
            "--no-progress", "--seed", 7, "--deterministic", *extra]


def losses(run_dir):
    """{step: loss} of a run's metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def assert_same_state(a, b, tolerance=0.0):
    """Two checkpoints hold the same step, and bitwise (or within `tolerance`, relative and absolute) the same
    model, EMA and optimizer state."""
    import torch

    from hdiffusion.checkpoint import load_checkpoint

    def same(x, y):
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        return torch.equal(x, y) if not tolerance else torch.allclose(x, y, rtol=tolerance, atol=tolerance)

    a, b = load_checkpoint(a), load_checkpoint(b)
    assert a.info["step"] == b.info["step"]
    for part in ["model", "ema"]:
        assert getattr(a, part).keys() == getattr(b, part).keys()
        for name, tensor in getattr(a, part).items():
            assert same(tensor, getattr(b, part)[name]), f"{part}.{name}"
    assert a.optimizer["state"].keys() == b.optimizer["state"].keys()
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]
    for index, state in a.optimizer["state"].items():
        for key, value in state.items():
            assert same(value, b.optimizer["state"][index][key]), (index, key)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """An uninterrupted 12-step run (2 accumulation steps, non-leaking augmentation, checkpoints at 4, 8, 12) that
    interrupted, resumed and multi-process runs are compared with, bit for bit."""
    tmp = tmp_path_factory.mktemp("reference")
    config = tiny_config()
    config["model"]["augment_prob"] = 0.5  # its draws come from the chunk generators: resume must stay exact
    config_path = tmp / "config.json"
    config_path.write_text(json.dumps(config))
    assert train_in_process(*train_args(config_path, tmp / "run", 12)) == 0
    return config_path, tmp / "run"
