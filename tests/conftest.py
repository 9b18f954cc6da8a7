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
