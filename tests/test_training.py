"""End to end on CPU: what a run leaves in its folder. Interruptions, resume and faults: test_reliability.py; bad
input: test_bad_input.py."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import ROOT, losses
from hdiffusion.checkpoint import load_checkpoint


def test_run_folder_contents(reference_run):
    _, run_dir = reference_run
    assert sorted(losses(run_dir)) == list(range(1, 13))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000012.safetensors"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000004.safetensors", "step_00000008.safetensors", "step_00000012.safetensors"]
    stored = json.loads((run_dir / "config.json").read_text())
    assert stored["model"]["d_ffs"] == [96, 96]  # the fully defaulted config is stored
    assert load_checkpoint(run_dir).info["config"] == stored
    assert json.loads((run_dir / "classes.json").read_text()) == [str(i) for i in range(10)]  # label i's name
    ema = load_file(run_dir / "ema.safetensors")
    assert set(ema) == set(load_checkpoint(run_dir).ema)
    assert not list(run_dir.rglob(".*tmp*"))  # no temporary files left behind
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert sorted(record) == ["ema_decay", "img_per_s", "kimg", "loss", "lr", "nonfinite_steps", "step"]


def test_summary_cli_prints_params_and_gmac():
    result = subprocess.run([sys.executable, "-m", "hdiffusion.summary", "--config", "configs/in128_E.json"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    summary = json.loads(result.stdout)
    assert summary["params"] == pytest.approx(117.0e6, rel=0.01)
    assert summary["gmac"] == pytest.approx(31.4, rel=0.01)  # HDiT paper, ablation model E
