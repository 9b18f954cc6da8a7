"""Fully sharded data parallelism (train.py --fsdp): each process holds 1/N of the weights, gradients, optimizer
state and EMA, for models whose training state does not fit one GPU.

torch's FSDP2 (`fully_shard`) shards each block of the model (the units compile_blocks compiles) and the rest of
it: a block's weights are gathered just before it runs and freed after, gradients are reduce-scattered. Every
process still computes its own part of the batch, exactly as under DDP, and the run is DDP's up to rounding (the
optimizer and the EMA run over shards, whose lengths change how vector kernels round: equal to 1e-6 on CPU,
tested). Checkpoints hold full tensors in the same layout as unsharded runs, so a run can resume with or without
--fsdp, on any number of processes.
"""

import warnings
from contextlib import contextmanager, nullcontext

from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard

from .models import blocks

_FULL_ON_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on process 0's CPU only


def shard_model(model, device):
    """Shard `model` in place over all processes: each block, then the rest (embeddings, mapping network, in and
    out projections). Returns it."""
    # FSDP warns that the model returns a view (HDiT's movedim), on which an in-place op would skip its backward
    # hook; the denoiser only uses it out of place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    model.to(device)
    for block in blocks(model):
        fully_shard(block, reshard_after_forward=True)
    # The root too (FSDP's default keeps its weights gathered after a forward, for the backward): the EMA model
    # runs forwards only, and must hold shards when it is updated.
    fully_shard(model, reshard_after_forward=True)
    return model


def is_sharded(model):
    return isinstance(model, FSDPModule)


@contextmanager
def gradient_sync(accelerator, model, sync):
    """Synchronise the gradients in this backward pass or not (gradient accumulation: only the last micro-batch
    needs to)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
        yield
    else:
        with nullcontext() if sync else accelerator.no_sync(model):
            yield


def model_state(model):
    """The model's state dict with full tensors: of a sharded model gathered onto process 0 (a collective: every
    process calls it; the others get {})."""
    if is_sharded(model):
        return get_model_state_dict(model, options=_FULL_ON_MAIN)
    return model.state_dict()


def _parameter_names(model, optimizer):
    """The names of the optimizer's parameters in torch's order (group by group), i.e. the name of index i."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(model, optimizer):
    """optimizer.state_dict() as an unsharded run has it (states keyed by parameter index, full tensors); of a
    sharded model gathered onto process 0 (a collective; the others get {})."""
    if not is_sharded(model):
        return optimizer.state_dict()
    by_name = get_optimizer_state_dict(model, optimizer, options=_FULL_ON_MAIN)
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return {"state": {index[name]: state for name, state in by_name["state"].items()},
            "param_groups": [dict(group, params=[index[name] for name in group["params"]])
                             for group in by_name["param_groups"]]}


def load_optimizer_state(model, optimizer, state_dict):
    """optimizer.load_state_dict for a state in torch's layout (optimizer_state's), sharding it if the model is."""
    if not is_sharded(model):
        optimizer.load_state_dict(state_dict)
        return
    names = _parameter_names(model, optimizer)
    if len(names) != sum(len(group["params"]) for group in state_dict["param_groups"]):
        raise ValueError("the optimizer state has a different number of parameters than the model")
    by_name = {"state": {names[i]: state for i, state in state_dict["state"].items()},
               "param_groups": [dict(group, params=[names[i] for i in group["params"]])
                                for group in state_dict["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
