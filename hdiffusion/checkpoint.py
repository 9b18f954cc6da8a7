"""Checkpoints as safetensors + JSON: written atomically, verified by checksum, read without pickle.

A training checkpoint is one file `checkpoints/step_XXXXXXXX.safetensors` holding the model (`model.*`),
its EMA (`ema.*`) and the optimizer's tensors (`optimizer.<param index>.<name>`); everything else (config,
step, optimizer hyper-parameters, run options) is JSON in the file's metadata. The text file
`checkpoints/latest` names the newest complete checkpoint and is replaced only after that file is in place,
so a crash at any moment leaves the previous pointer and its file intact.

The inference file `ema.safetensors` holds only the EMA weights, with the config in its metadata.

Every file carries in its metadata `sha256`, a digest of all its tensors (name, dtype, shape, bytes) and other
metadata (tensors_digest). A file is read whole and verified before anything uses it: a truncated, bit-flipped
or edited file is refused, never partially loaded.
"""

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import UsageError

CHECKPOINT_FORMAT = "hdiffusion-checkpoint/2"
INFERENCE_FORMAT = "hdiffusion-inference/2"
OLD_FORMATS = ("hdiffusion-checkpoint/1", "hdiffusion-inference/1")  # the same without a checksum
LATEST = "latest"
BEST = "best"  # names the checkpoint of the best FID (evaluation.mark_best); never pruned
STEP_FILE = re.compile(r"step_(\d{8,})\.safetensors")


# Atomic files --------------------------------------------------------------------------------------------

def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Call `write(tmp_path)`, then move the finished file to `path` in one rename.

    An OSError (disk full, read-only folder) names `path` and leaves `path` as it was, with no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def remove_temporary_files(directory):
    """Delete the temporary files a killed writer left in `directory` (ours, `.NAME.tmpPID`, and safetensors'
    own `.tmpXXXXXX`); a run folder has one writer, so at start none is in use. Returns their names."""
    removed = []
    for path in Path(directory).glob(".*tmp*"):
        if path.is_file() and re.fullmatch(r"\..+\.tmp\d+|\.tmp\w{6}", path.name):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return sorted(removed)


def tensors_digest(tensors, metadata):
    """SHA-256 over the metadata (but `sha256`) and every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\n{name} {tensor.dtype} {list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _save_safetensors(path, tensors, metadata):
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    metadata = dict(metadata, sha256=tensors_digest(tensors, metadata))

    def write(tmp):
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as error:  # its I/O errors (disk full, read-only) are not OSErrors
            code = re.search(r"os error (\d+)", str(error))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(tmp)) from None

    atomic_write(path, write)


# Optimizer state <-> flat tensors + JSON ------------------------------------------------------------------

def flatten_optimizer_state(state_dict):
    tensors, scalars = {}, {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors, json_state):
    state = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, scalars in json_state["scalars"].items():
        state.setdefault(int(index), {}).update(scalars)
    return {"state": state, "param_groups": json_state["param_groups"]}


# Training checkpoints ------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    path: Path
    model: dict
    ema: dict
    optimizer: dict
    info: dict  # step, config, options, ...


def checkpoint_step(path):
    """The step in a checkpoint's file name, or None for other names."""
    match = STEP_FILE.fullmatch(Path(path).name)
    return int(match[1]) if match else None


def save_checkpoint(run_dir, step, model_state, ema_state, optimizer_state, info, keep_last):
    """Write checkpoint `step`, then point `latest` at it, then delete older ones beyond the newest `keep_last`
    (never the one `best` names, nor later steps left by a run that resumed from an earlier checkpoint: those are
    replaced as the run reaches them)."""
    directory = Path(run_dir) / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    optimizer_tensors, optimizer_json = flatten_optimizer_state(optimizer_state)
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"ema.{k}": v for k, v in ema_state.items()})
    tensors.update(optimizer_tensors)
    info = dict(info, step=step, optimizer=optimizer_json)
    path = directory / f"step_{step:08d}.safetensors"
    _save_safetensors(path, tensors, {"format": CHECKPOINT_FORMAT, "info": json.dumps(info)})
    atomic_write(directory / LATEST, lambda tmp: Path(tmp).write_text(path.name + "\n"))
    best = directory / BEST
    spared = best.read_text().strip() if best.exists() else None
    steps = {p: checkpoint_step(p) for p in directory.glob("step_*.safetensors")}
    older = sorted((p for p, s in steps.items() if s is not None and s < step), key=steps.get)
    for old in older[:max(len(older) - (keep_last - 1), 0)]:
        if old.name != spared:
            old.unlink()
    return path


def save_inference_file(path, ema_state, config, step):
    metadata = {"format": INFERENCE_FORMAT, "config": json.dumps(config), "step": str(step)}
    _save_safetensors(path, ema_state, metadata)


def latest_checkpoint(run_dir):
    """The checkpoint `latest` names in a run folder, or None when the run has none yet."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.exists():
        raise UsageError(f"{pointer}: names {path.name}, which does not exist")
    return path


def _run_folder(path):
    path = Path(path)
    return path.parent if path.name == "checkpoints" else path


def resolve_checkpoint_path(path):
    """Accept a checkpoint file, a run folder or its checkpoints/ folder (then: the file `latest` names)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(_run_folder(path))
        if found is None:
            raise UsageError(f"{path}: no checkpoint in this folder (expected checkpoints/{LATEST})")
        return found
    if not path.exists():
        raise UsageError(f"{path}: no such checkpoint file")
    return path


def _check_layout(path):
    """Refuse what is not a whole safetensors file, before a byte of it is used: pickles, other files, a
    truncated or extended file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        try:
            if not 0 < header_size <= min(size - 8, 100_000_000):
                raise ValueError
            header = json.loads(f.read(header_size))
            end = max([8 + header_size] + [8 + header_size + entry["data_offsets"][1]
                                           for name, entry in header.items() if name != "__metadata__"])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip, or a bare pickle
                raise UsageError(f"{path}: a pickle file (torch.save, or a k-diffusion .pth checkpoint); hdiffusion "
                                 f"reads only its own safetensors files and never unpickles") from None
            raise UsageError(f"{path}: not a safetensors file") from None
    if size < end:
        raise UsageError(f"{path}: truncated: {size:,} bytes, its header describes {end:,}; an incomplete copy "
                         f"or write: use another checkpoint")
    if size > end:
        raise UsageError(f"{path}: {size - end:,} bytes after the end its header describes: the file is corrupt")


def read_safetensors(path):
    """(tensors, metadata) of one of our files, whole and verified against its checksum; a clear error for
    anything else."""
    path = Path(path)
    _check_layout(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # safetensors raises its own error types for malformed files
        raise UsageError(f"{path}: not a readable safetensors checkpoint ({str(error).splitlines()[0]})") from None
    found = metadata.get("format")
    if found in OLD_FORMATS:
        raise UsageError(f"{path}: written by an older hdiffusion (format {found}, without a checksum); this "
                         f"version reads {CHECKPOINT_FORMAT} and {INFERENCE_FORMAT}")
    if found not in (CHECKPOINT_FORMAT, INFERENCE_FORMAT):
        raise UsageError(f"{path}: not an hdiffusion checkpoint (no '{CHECKPOINT_FORMAT}' metadata)")
    if metadata.get("sha256") != tensors_digest(tensors, metadata):
        raise UsageError(f"{path}: checksum mismatch: its contents differ from what was saved (a corrupt or "
                         f"edited file); nothing was loaded")
    return tensors, metadata


def _checkpoint_from(path, tensors, metadata):
    if metadata["format"] != CHECKPOINT_FORMAT:
        raise UsageError(f"{path}: an inference file holds only EMA weights and cannot resume training; "
                         f"pass a file from the run's checkpoints/ folder")
    info = json.loads(metadata["info"])
    parts = {"model": {}, "ema": {}, "optimizer": {}}
    for name, tensor in tensors.items():
        prefix, rest = name.split(".", 1)
        parts[prefix][name if prefix == "optimizer" else rest] = tensor
    optimizer = unflatten_optimizer_state(parts["optimizer"], info["optimizer"])
    return Checkpoint(path, parts["model"], parts["ema"], optimizer, info)


def load_checkpoint(path) -> Checkpoint:
    """The training checkpoint at `path` (a file, or a run folder's `latest`), verified; a UsageError if it is not
    one or does not verify."""
    path = resolve_checkpoint_path(path)
    return _checkpoint_from(path, *read_safetensors(path))


def load_newest_intact(run_dir, warn=print):
    """The newest checkpoint of a run folder that verifies, for resuming: the one `latest` names, else the next
    older `step_*.safetensors` that verifies, with a warning for each one passed over (a corrupt or missing
    newest checkpoint then costs one save interval, and resume stays exact). None if the folder has no checkpoint
    at all; a UsageError if it has some and none verifies, rather than silently starting again from scratch.
    `run_dir` may also be its checkpoints/ folder."""
    directory = _run_folder(run_dir) / "checkpoints"
    files = sorted((p for p in directory.glob("step_*.safetensors") if checkpoint_step(p) is not None),
                   key=checkpoint_step, reverse=True)
    pointer = directory / LATEST
    candidates = files
    if pointer.exists():
        named = directory / pointer.read_text().strip()
        newest = checkpoint_step(named)
        older = [p for p in files if newest is None or checkpoint_step(p) < newest]
        candidates = [named] + older
    if not candidates:
        return None
    problems = []
    for path in candidates:
        try:
            if not path.is_file():
                raise UsageError(f"{pointer}: names {path.name}, which does not exist")
            checkpoint = _checkpoint_from(path, *read_safetensors(path))
        except UsageError as error:
            problems.append(str(error))
            continue
        for problem in problems:
            warn(f"warning: {problem}; resuming from the newest intact checkpoint, {path.name}, instead")
        return checkpoint
    raise UsageError(f"{run_dir}: no intact checkpoint to resume from ({'; '.join(problems)}); pass one with "
                     f"--resume, or start a new run in another folder")


def load_for_inference(path, use_ema=True):
    """(state_dict, config, step) from a training checkpoint or an inference file, verified."""
    path = resolve_checkpoint_path(path)
    tensors, metadata = read_safetensors(path)
    if metadata["format"] == INFERENCE_FORMAT:
        if not use_ema:
            raise UsageError(f"{path}: an inference file holds only EMA weights; --no-ema needs a training checkpoint")
        return tensors, json.loads(metadata["config"]), int(metadata["step"])
    info = json.loads(metadata["info"])
    prefix = "ema." if use_ema else "model."
    state = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
    return state, info["config"], info["step"]
