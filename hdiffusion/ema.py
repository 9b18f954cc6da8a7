"""Exponential moving average of the weights, with k-diffusion's (and Karras et al.'s) EMA warm-up."""

import torch


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
def ema_update(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameters and floating-point buffers alike."""
    model_params = dict(model.named_parameters())
    for name, ema_param in ema_model.named_parameters():
        ema_param.lerp_(model_params[name].detach().to(ema_param.dtype), 1.0 - decay)
    model_buffers = dict(model.named_buffers())
    for name, ema_buffer in ema_model.named_buffers():
        ema_buffer.copy_(model_buffers[name])
