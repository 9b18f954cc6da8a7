"""Checkpoints as safetensors + JSON: written atomically, read without pickle.

A training checkpoint is one file `checkpoints/step_XXXXXXXX.safetensors` holding the model (`model.*`),
its EMA (`ema.*`) and the optimizer's tensors (`optimizer.<param index>.<name>`); everything else (config,
step, optimizer hyper-parameters, run options) is JSON in the file's metadata. The text file
`checkpoints/latest` names the newest complete checkpoint and is replaced only after that file is in place,
so a crash at any moment leaves the previous pointer and its file intact.

The inference file `ema.safetensors` holds only the EMA weights, with the config in its metadata.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UsageError

CHECKPOINT_FORMAT = "hdiffusion-checkpoint/1"
INFERENCE_FORMAT = "hdiffusion-inference/1"
LATEST = "latest"
BEST = "best"  # names the checkpoint of the best FID (evaluation.mark_best); never pruned


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
    """Call `write(tmp_path)`, then move the finished file to `path` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _save_safetensors(path, tensors, metadata):
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


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


def save_checkpoint(run_dir, step, model_state, ema_state, optimizer_state, info, keep_last):
    """Write checkpoint `step`, then point `latest` at it, then delete all but the newest `keep_last` and the one
    `best` names."""
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
    for old in sorted(directory.glob("step_*.safetensors"))[:-keep_last]:
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


def resolve_checkpoint_path(path):
    """Accept a checkpoint file, a run folder or its checkpoints/ folder."""
    path = Path(path)
    if path.is_dir():
        run_dir = path.parent if path.name == "checkpoints" else path
        found = latest_checkpoint(run_dir)
        if found is None:
            raise UsageError(f"{path}: no checkpoint in this folder (expected checkpoints/{LATEST})")
        return found
    if not path.exists():
        raise UsageError(f"{path}: no such checkpoint file")
    return path


def read_safetensors(path):
    """(tensors, metadata) of one of our files; a clear error for anything else."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") not in (CHECKPOINT_FORMAT, INFERENCE_FORMAT):
                raise UsageError(f"{path}: not an hdiffusion checkpoint (no '{CHECKPOINT_FORMAT}' metadata)")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except UsageError:
        raise
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise UsageError(f"{path}: not a readable safetensors checkpoint ({str(error).splitlines()[0]})") from None
    return tensors, metadata


def load_checkpoint(path) -> Checkpoint:
    path = resolve_checkpoint_path(path)
    tensors, metadata = read_safetensors(path)
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


def load_for_inference(path, use_ema=True):
    """(state_dict, config, step) from a training checkpoint or an inference file."""
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
