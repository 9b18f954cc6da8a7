"""A run survives kills, signals, full disks, NaNs and corrupt checkpoints, and resumes bit for bit (issue 8).

Every fault is injected for real: SIGKILL and SIGTERM from outside the process, a file size limit that makes the
kernel refuse a write half way, and from tests/fault_injection.py (outside the package, which has no test hooks)
NaN losses, infinite gradients, signals at chosen steps and writers that stop half way. Interrupted runs are
compared with one uninterrupted reference run (conftest.reference_run): the same losses and bitwise the same
model, EMA and optimizer state.
"""

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (ROOT, assert_same_state, launch_command, losses, tiny_config, train_args, train_in_process)
from hdiffusion import checkpoint as ckpt
from hdiffusion.errors import UsageError


def checkpoint_file(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:08d}.safetensors"


def run_at(reference, step, run_dir):
    """A copy of the reference run as it was right after saving checkpoint `step` (metrics up to that step)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint_file(reference, step), checkpoint_file(run_dir, step))
    (run_dir / "checkpoints" / "latest").write_text(f"step_{step:08d}.safetensors\n")
    lines = (reference / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines[:step]))
    return run_dir


def assert_equals_reference(reference, run_dir, step=12, tolerance=0.0):
    """Bitwise the reference's losses and state; or, with a tolerance, within it (relative, and absolute for
    values near zero)."""
    expected = {s: loss for s, loss in losses(reference).items() if s <= step}
    if tolerance:  # a skipped step has loss None
        expected = {s: loss if loss is None else pytest.approx(loss, rel=tolerance) for s, loss in expected.items()}
    assert losses(run_dir) == expected
    assert_same_state(checkpoint_file(reference, step), checkpoint_file(run_dir, step), tolerance)


def wait_for(condition, process, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


# Interrupted anywhere, resumed exactly --------------------------------------------------------------------

def stop_at_end_step(config_path, run_dir, capsys):
    assert train_in_process(*train_args(config_path, run_dir, 5)) == 0  # a clean end at 5 saves step 5
    return 5


def signal_in_process(name, step):
    def interrupt(config_path, run_dir, capsys):
        code = train_in_process(*train_args(config_path, run_dir, 12), faults={"signal": [step, name]})
        # The processes agree on stopping one step late (StepGuard: no host sync per step): the step after.
        assert code == 75 and f"received {name}: saved step {step + 1}" in capsys.readouterr().out
        return step + 1
    return interrupt


def sigkill_after_first_checkpoint(config_path, run_dir, capsys):
    process = subprocess.Popen([sys.executable, ROOT / "train.py", *map(str, train_args(config_path, run_dir, 10**6))],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), process)
    process.kill()
    process.wait()
    return ckpt.load_checkpoint(run_dir).info["step"]  # 4, or 8 if the kill came late


def sigkill_while_writing_a_checkpoint(config_path, run_dir, capsys):
    """The writer of checkpoint 8 stops half way through its temporary file; the process is killed there."""
    faults = json.dumps({"pause_writing": "step_00000008"})
    process = subprocess.Popen([sys.executable, ROOT / "tests" / "fault_injection.py", faults,
                                *map(str, train_args(config_path, run_dir, 10**6))],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = lambda: [p for p in (run_dir / "checkpoints").glob(".step_00000008*") if p.stat().st_size > 0]
    wait_for(partial, process)
    time.sleep(0.2)
    process.kill()
    process.wait()
    assert partial() and partial()[0].stat().st_size < checkpoint_file(run_dir, 4).stat().st_size
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004.safetensors\n"
    return 4


INTERRUPTIONS = {
    "end-step 5": stop_at_end_step,
    "SIGTERM at step 3": signal_in_process("SIGTERM", 3),
    "SIGINT at step 10": signal_in_process("SIGINT", 10),
    "SIGKILL after the first checkpoint": sigkill_after_first_checkpoint,
    "SIGKILL while writing checkpoint 8": sigkill_while_writing_a_checkpoint,
}


@pytest.mark.parametrize("interrupt", INTERRUPTIONS.values(), ids=INTERRUPTIONS.keys())
def test_interrupted_run_resumes_exactly(reference_run, tmp_path, capsys, interrupt):
    config_path, reference = reference_run
    run_dir = tmp_path / "run"
    resumed_at = interrupt(config_path, run_dir, capsys)
    assert ckpt.load_newest_intact(run_dir).info["step"] == resumed_at
    assert train_in_process(*train_args(config_path, run_dir, 12)) == 0  # the same command again
    out = capsys.readouterr().out
    assert f"resuming from {checkpoint_file(run_dir, resumed_at)} at step {resumed_at}" in out
    assert_equals_reference(reference, run_dir)
    assert not list(run_dir.rglob(".*tmp*"))  # a killed writer's temporary file is removed at the next start


def test_sigterm_from_outside_saves_and_exits_75(reference_run, tmp_path):
    config_path, _ = reference_run
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, ROOT / "train.py", *map(str, train_args(config_path, run_dir, 10**6))],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 75 and "received SIGTERM" in stdout and "Traceback" not in stderr
    assert ckpt.load_checkpoint(run_dir).info["step"] == max(losses(run_dir))


def test_a_second_signal_stops_at_once_and_handlers_are_restored():
    from hdiffusion.training import SignalFlag

    before = signal.getsignal(signal.SIGINT)
    with SignalFlag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.received == "SIGTERM"  # remembered: the loop saves and stops after this step
        with pytest.raises(KeyboardInterrupt):  # a second one: Python's default, at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_and_a_changed_process_count_resume_exactly(reference_run, tmp_path, sharding):
    """1 process x 2 accumulation steps to step 3, then 2 processes x 1 (gloo) to step 7, then 1 x 2 again to 12:
    the same global batch cut into the same chunks, so bitwise the reference's run. Sharded (FSDP) too: its
    gradients are DDP's, but the fused optimizer and the EMA run over shards, whose lengths change how the CPU's
    vector kernels round: equal to 1e-6 (a last bit here and there), not bitwise."""
    config_path, reference = reference_run
    run_dir = tmp_path / "run"
    assert train_in_process(*train_args(config_path, run_dir, 3)) == 0
    two = train_args(config_path, run_dir, 7, *sharding)
    two[two.index("--grad-accum-steps") + 1] = 1
    result = subprocess.run(launch_command(2, ROOT / "train.py", *two), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "resuming from" in result.stdout
    assert ("sharded (FSDP)" in result.stdout) == bool(sharding)
    assert train_in_process(*train_args(config_path, run_dir, 12)) == 0
    assert_equals_reference(reference, run_dir, tolerance=1e-6 if sharding else 0.0)


def test_fsdp_with_accumulation_is_ddp(reference_run, tmp_path):
    """2 processes x 2 accumulation steps, sharded (no gradient sync but at the last micro-batch) and not: the same
    run up to the rounding of sharded kernels."""
    config_path, _ = reference_run
    for sharding in ([], ["--fsdp"]):
        args = train_args(config_path, tmp_path / f"run{len(sharding)}", 4, *sharding)
        result = subprocess.run(launch_command(2, ROOT / "train.py", *args), cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "global batch 16 = 2 x 2 x 4" in result.stdout
    assert_equals_reference(tmp_path / "run0", tmp_path / "run1", step=4, tolerance=1e-6)


# Disk full, read-only: a clear error, the last checkpoint intact ------------------------------------------

def limit_file_size(limit):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # the kernel refuses writes beyond `limit`
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # ... with EFBIG rather than by killing the process
    return preexec


@pytest.mark.parametrize("fault, failing, intact", [
    ("file size limit (real)", "checkpoints/step_00000008.safetensors", 4),
    ("read-only", "checkpoints/step_00000008.safetensors", 4),
    ("disk full", "ema.safetensors", 8),
], ids=["file size limit", "read-only", "disk full"])
def test_write_failure_stops_with_74_and_keeps_the_last_checkpoint(reference_run, tmp_path, capsys, fault, failing,
                                                                   intact):
    config_path, reference = reference_run
    run_dir = run_at(reference, 4, tmp_path / "run")
    if fault == "file size limit (real)":  # a checkpoint is ~1 MB: the kernel stops its write half way
        result = subprocess.run([sys.executable, ROOT / "train.py", *map(str, train_args(config_path, run_dir, 12))],
                                cwd=ROOT, capture_output=True, text=True, preexec_fn=limit_file_size(600_000))
        code, err, reason = result.returncode, result.stderr, "File too large"
    else:  # as safetensors fails on a read-only folder or a full disk, after writing half of the file
        errno_, reason = (errno.EROFS, "Read-only file system") if fault == "read-only" else (errno.ENOSPC,
                                                                                              "No space left on device")
        faults = {"fail_writing": [failing.split("/")[-1], errno_]}
        code = train_in_process(*train_args(config_path, run_dir, 12), faults=faults)
        err = capsys.readouterr().err
    last = checkpoint_file(run_dir, intact)
    assert code == 74
    assert err == (f"error: cannot write {run_dir / failing}: {reason}; the last checkpoint, {last}, is intact. Free "
                   f"space or make the folder writable, then run the same command again to resume\n")
    assert ckpt.load_newest_intact(run_dir).path == last
    assert not list(run_dir.rglob(".*tmp*"))
    assert train_in_process(*train_args(config_path, run_dir, 12)) == 0  # space again: the same command resumes
    assert_equals_reference(reference, run_dir)


# A corrupt newest checkpoint: resume from the one before ---------------------------------------------------

def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt, problem", [
    (truncate, "truncated: "),
    (flip_last_byte, "checksum mismatch"),
    (lambda path: path.unlink(), "names step_00000008.safetensors, which does not exist"),
], ids=["truncated", "bit flipped", "missing"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(reference_run, tmp_path, capsys, corrupt, problem):
    config_path, reference = reference_run
    run_dir = run_at(reference, 4, tmp_path / "run")
    shutil.copy(checkpoint_file(reference, 8), checkpoint_file(run_dir, 8))
    (run_dir / "checkpoints" / "latest").write_text("step_00000008.safetensors\n")
    (run_dir / "metrics.jsonl").write_text("".join((reference / "metrics.jsonl").read_text().splitlines(True)[:8]))
    corrupt(checkpoint_file(run_dir, 8))
    assert train_in_process(*train_args(config_path, run_dir, 12)) == 0
    warning = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:"))
    assert problem in warning and warning.endswith(
        "; resuming from the newest intact checkpoint, step_00000004.safetensors, instead")
    assert_equals_reference(reference, run_dir)


# Non-finite losses and gradients: skipped, counted, resumed exactly, agreed by all processes -----------------

FAULTS = {"nan_loss": [[3, 1]], "inf_grad": [[6, 0]]}  # step 3: chunk 1's loss; step 6: chunk 0's gradients


def same_weights(a, b):
    a, b = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    tensors = lambda c: {**c.model, **{f"ema.{k}": v for k, v in c.ema.items()},
                         **{f"opt.{i}.{k}": torch.as_tensor(v) for i, s in c.optimizer["state"].items()
                            for k, v in s.items()}}
    a, b = tensors(a), tensors(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def faulty_run(reference_run, tmp_path_factory):
    """8 steps of the reference run's setup with FAULTS injected, a checkpoint every step."""
    config_path, _ = reference_run
    run_dir = tmp_path_factory.mktemp("faulty") / "run"
    args = train_args(config_path, run_dir, 8, "--save-every", 1, "--keep-last", 100)
    assert train_in_process(*args, faults=FAULTS) == 0
    return run_dir


def test_nonfinite_steps_are_skipped_and_counted(faulty_run):
    records = [json.loads(line) for line in (faulty_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert [r["step"] for r in records if r["loss"] is None] == [3, 6]
    for skipped in (3, 6):  # model, EMA and optimizer state are those of the step before
        assert same_weights(checkpoint_file(faulty_run, skipped - 1), checkpoint_file(faulty_run, skipped))
    assert not same_weights(checkpoint_file(faulty_run, 4), checkpoint_file(faulty_run, 5))
    assert ckpt.load_checkpoint(faulty_run).info["nonfinite_total"] == 2


def test_skipping_resumes_exactly(reference_run, faulty_run, tmp_path):
    config_path, _ = reference_run
    run_dir = run_at(faulty_run, 4, tmp_path / "run")
    args = train_args(config_path, run_dir, 8, "--save-every", 1, "--keep-last", 100)
    assert train_in_process(*args, faults=FAULTS) == 0
    assert_equals_reference(faulty_run, run_dir, step=8)


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_skip_the_same_steps(reference_run, faulty_run, tmp_path, sharding):
    """Under 2 processes x 1 micro-batch, chunk 1 is process 1's: only it sees the NaN loss of step 3, yet both
    skip (the gradients are all-reduced), exactly as the 1-process run with 2 accumulation steps did; sharded
    too, where each process holds a part of the gradients."""
    config_path, _ = reference_run
    args = train_args(config_path, tmp_path / "run", 8, "--save-every", 4, "--grad-accum-steps", 1, *sharding)
    result = subprocess.run(launch_command(2, ROOT / "tests" / "fault_injection.py", json.dumps(FAULTS), *args),
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_equals_reference(faulty_run, tmp_path / "run", step=8, tolerance=1e-6 if sharding else 0.0)


def test_bf16_skips_too(tmp_path, write_config):
    args = ["--config", write_config(tiny_config()), "--out-dir", tmp_path / "run", "--end-step", 4, "--batch-size",
            8, "--save-every", 1, "--keep-last", 10, "--log-every", 1, "--demo-every", 0, "--num-workers", 0,
            "--no-progress", "--mixed-precision", "bf16"]
    assert train_in_process(*args, faults={"nan_loss": [[2, None]], "inf_grad": [[3, 0]]}) == 0
    run_dir = tmp_path / "run"
    assert same_weights(checkpoint_file(run_dir, 1), checkpoint_file(run_dir, 2))
    assert same_weights(checkpoint_file(run_dir, 2), checkpoint_file(run_dir, 3))
    assert not same_weights(checkpoint_file(run_dir, 3), checkpoint_file(run_dir, 4))
    assert [json.loads(line)["nonfinite_steps"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        0, 1, 2, 2]


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(reference_run, tmp_path, capsys):
    config_path, reference = reference_run
    run_dir = run_at(reference, 4, tmp_path / "run")
    code = train_in_process(*train_args(config_path, run_dir, 12, "--max-nonfinite-steps", 3),
                            faults={"nan_from": 5})
    assert code == 65
    assert capsys.readouterr().err == (
        f"error: step 7: the loss or the gradients were non-finite in 3 steps in a row (steps 5 to 7, all skipped; "
        f"--max-nonfinite-steps 3); the last good checkpoint is {checkpoint_file(run_dir, 4)}: resume from it with "
        f"a lower --lr, or check the data\n")
    assert {s: loss for s, loss in losses(run_dir).items() if s > 4} == {5: None, 6: None, 7: None}


# Checksums, pruning, no pickle --------------------------------------------------------------------------

def test_checksum_covers_every_tensor_and_the_metadata(tmp_path):
    def saved():
        return ckpt.save_checkpoint(tmp_path, 1, {"w": torch.arange(4.0)}, {"w": torch.ones(4)},
                                    {"state": {}, "param_groups": []}, {"note": "x"}, keep_last=1)

    path = saved()
    assert ckpt.load_checkpoint(path).info["note"] == "x"
    flip_last_byte(path)  # the last tensor's last byte
    with pytest.raises(UsageError, match=r"checksum mismatch: its contents differ from what was saved"):
        ckpt.load_checkpoint(path)
    path = saved()
    path.write_bytes(path.read_bytes().replace(b'\\"note\\": \\"x\\"', b'\\"note\\": \\"y\\"'))  # the same length
    with pytest.raises(UsageError, match=r"checksum mismatch"):
        ckpt.load_checkpoint(path)
    path = saved()
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(UsageError, match=r"1 bytes after the end its header describes: the file is corrupt"):
        ckpt.load_checkpoint(path)


def test_pruning_keeps_the_new_checkpoint_after_resuming_from_an_earlier_one(tmp_path):
    for step in (4, 8, 12, 8):  # the last save: a run resumed from step 4 reaches step 8 again
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.zeros(1)}, {"w": torch.zeros(1)},
                             {"state": {}, "param_groups": []}, {}, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        "step_00000008.safetensors", "step_00000012.safetensors"]  # 12 is replaced when the run reaches it
    assert ckpt.load_newest_intact(tmp_path).info["step"] == 8


def test_checkpoints_are_read_without_unpickling(reference_run, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    _, reference = reference_run
    assert ckpt.load_checkpoint(reference).info["step"] == 12
    assert ckpt.load_for_inference(reference / "ema.safetensors")[2] == 12


def test_the_package_has_no_pickle_or_eval():
    """Only safetensors and JSON are read. The only ways code gets in are named by the user: the Python file of a
    `custom` dataset, and TorchScript or torch.hub feature extractors (--evaluate-with)."""
    forbidden = re.compile(r"import (c?pickle|marshal|shelve|dill)|pickle\.\w|torch\.load\(|(?<![.\w])(eval|exec)\(|"
                           r"exec_module|__import__|allow_pickle=True|weights_only=False|trust_remote_code|yaml\.load")
    found = []
    for path in sorted([*(ROOT / "hdiffusion").rglob("*.py"), ROOT / "train.py", ROOT / "sample.py"]):
        for line in path.read_text().splitlines():
            if forbidden.search(line.split("#")[0]):
                found.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert found == ["hdiffusion/data.py: spec.loader.exec_module(module)"]  # the custom dataset's own file
