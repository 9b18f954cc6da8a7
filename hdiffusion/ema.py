"""Exponential moving average of the weights, with k-diffusion's (and Karras et al.'s) EMA warm-up."""

import torch


def local(tensor):
    """This process's shard of a sharded (FSDP) parameter, a DTensor; else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def ema_decay(num_updates, ema_config):
    """decay = 1 - (1 + t / inv_gamma)**-power, clamped to [min_value, max_value]; 0 before start_at.

    Early in training this averages over about the last t / power steps, so the EMA tracks the fast-moving
    weights instead of being dominated by the random initialisation.
    """
    t = num_updates - ema_config["start_at"]
    if t < 0:
        return 0.0
    value = 1.0 - (1.0 + t / ema_config["inv_gamma"]) ** -ema_config["power"]
    return min(max(value, ema_config["min_value"]), ema_config["max_value"])


@torch.no_grad()
def ema_update(ema_model, model, decay, apply=None):
    """ema <- decay * ema + (1 - decay) * model, parameters and floating-point buffers alike.

    ema_model is a deep copy of model, so their parameters come in the same order; fused foreach kernels over all
    of them run every optimizer step instead of a kernel per tensor. `apply`, a 0-d bool tensor, makes the update
    conditional on the device (false: the EMA stays as it is) without the host reading it.
    """
    # Sharded models (FSDP) are updated shard by shard: the EMA is sharded as the model is.
    ema_params = [local(p) for p in ema_model.parameters()]
    model_params = [local(p.detach()) for p in model.parameters()]
    if apply is None:
        torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    else:
        updates = torch._foreach_sub(model_params, ema_params)
        torch._foreach_mul_(updates, apply * (1.0 - decay))  # a tensor factor: no host sync
        torch._foreach_add_(ema_params, updates)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)
