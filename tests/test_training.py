"""End to end on CPU: train, stop, resume exactly, sample."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script, tiny_config
from hdiffusion.checkpoint import load_checkpoint


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def train_args(config_path, run_dir, end_step, *extra):
    return ["--config", config_path, "--out-dir", run_dir, "--end-step", end_step, "--batch-size", 16,
            "--log-every", 1, "--demo-every", 0, "--num-workers", 0, "--no-progress", "--seed", 7, *extra]


def assert_same_state(a, b):
    a, b = load_checkpoint(a), load_checkpoint(b)
    assert a.info["step"] == b.info["step"]
    for part in ["model", "ema"]:
        for name, tensor in getattr(a, part).items():
            torch.testing.assert_close(tensor, getattr(b, part)[name], rtol=0, atol=1e-6, msg=f"{part}.{name}")
    for name, tensor in a.optimizer["state"].items():
        for key, value in tensor.items():
            torch.testing.assert_close(value, b.optimizer["state"][name][key], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 12-step run with gradient accumulation and non-leaking augmentation."""
    tmp = tmp_path_factory.mktemp("reference")
    config_path = tmp / "config.json"
    config = tiny_config()
    config["model"]["augment_prob"] = 0.5  # its draws come from the chunk generators: resume must stay exact
    config_path.write_text(json.dumps(config))
    run_script("train.py", *train_args(config_path, tmp / "run", 12, "--grad-accum-steps", 2, "--save-every", 4))
    return config_path, tmp / "run"


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


def test_resume_equals_uninterrupted(reference_run, tmp_path):
    config_path, reference = reference_run
    run_dir = tmp_path / "run"
    args = train_args(config_path, run_dir, 5, "--grad-accum-steps", 2, "--save-every", 4)
    run_script("train.py", *args)  # stops at 5; the end of a run always saves
    result = run_script("train.py", *train_args(config_path, run_dir, 12, "--grad-accum-steps", 2,
                                                "--save-every", 4))
    assert "resuming from" in result.stdout and "at step 5" in result.stdout
    expected, got = losses(reference), losses(run_dir)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    assert_same_state(reference / "checkpoints" / "step_00000012.safetensors",
                      run_dir / "checkpoints" / "step_00000012.safetensors")


def test_sigkill_then_rerun_resumes_exactly(reference_run, tmp_path):
    config_path, reference = reference_run
    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"),
               *map(str, train_args(config_path, run_dir, 100000, "--grad-accum-steps", 2, "--save-every", 4))]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "latest").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(run_dir).info["step"]
    assert killed_at < 12
    run_script("train.py", *train_args(config_path, run_dir, 12, "--grad-accum-steps", 2, "--save-every", 4))
    expected, got = losses(reference), losses(run_dir)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    assert_same_state(reference / "checkpoints" / "step_00000012.safetensors",
                      run_dir / "checkpoints" / "step_00000012.safetensors")


def test_sigterm_saves_and_exits_with_distinct_code(reference_run, tmp_path):
    config_path, _ = reference_run
    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), *map(str, train_args(config_path, run_dir, 100000))]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() or len(losses(run_dir)) < 3:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 75
    assert "received SIGTERM" in stdout
    assert load_checkpoint(run_dir).info["step"] == max(losses(run_dir))


def test_changed_model_is_refused_on_resume(reference_run, tmp_path, write_config):
    _, reference = reference_run
    config = tiny_config()
    config["model"]["widths"] = [48, 48]
    result = run_script("train.py", *train_args(write_config(config), tmp_path / "run", 20, "--resume", reference),
                        check=False)
    assert result.returncode == 2
    assert "model.widths: [32, 32] -> [48, 48]" in result.stderr and "Traceback" not in result.stderr


def test_two_processes_equal_one_with_accumulation(reference_run, tmp_path):
    """Under `accelerate launch` (gloo on CPU), 2 processes x 1 micro-batch compute the same steps as the
    reference's 1 process x 2 accumulation steps: the global batch is cut into the same chunks either way."""
    config_path, reference = reference_run
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train.py"),
               *map(str, train_args(config_path, tmp_path / "run", 12, "--save-every", 4))]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    expected, got = losses(reference), losses(tmp_path / "run")
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    assert_same_state(reference / "checkpoints" / "step_00000012.safetensors",
                      tmp_path / "run" / "checkpoints" / "step_00000012.safetensors")


def test_summary_cli_prints_params_and_gmac():
    result = subprocess.run([sys.executable, "-m", "hdiffusion.summary", "--config", "configs/in128_E.json"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    summary = json.loads(result.stdout)
    assert summary["params"] == pytest.approx(117.0e6, rel=0.01)
    assert summary["gmac"] == pytest.approx(31.4, rel=0.01)  # HDiT paper, ablation model E


@pytest.mark.parametrize("args, message", [
    (["--config", "missing.json"], "missing.json: no such file"),
    (["--config", "configs/mnist_transformer.json", "--resume", "nowhere"], "nowhere: no such checkpoint file"),
])
def test_train_bad_input_exits_2_without_traceback(args, message, tmp_path):
    result = run_script("train.py", *args, "--out-dir", tmp_path / "run", "--no-progress", check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start
