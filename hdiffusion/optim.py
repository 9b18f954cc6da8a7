"""Optimizers and learning-rate schedules.

Schedules are pure functions of the optimizer step, so a resumed run needs only the step to continue, and a
new `--lr` on resume takes effect: the LR is recomputed from the base LR every step, never read back from
the optimizer state.
"""

import torch


def make_optimizer(optimizer_config, param_groups):
    kind = optimizer_config["type"]
    if kind == "adamw":
        return torch.optim.AdamW(param_groups, lr=optimizer_config["lr"], betas=tuple(optimizer_config["betas"]),
                                 eps=optimizer_config["eps"], weight_decay=optimizer_config["weight_decay"])
    if kind == "sgd":
        return torch.optim.SGD(param_groups, lr=optimizer_config["lr"], momentum=optimizer_config["momentum"],
                               nesterov=optimizer_config["nesterov"], weight_decay=optimizer_config["weight_decay"])
    raise ValueError(f"unknown optimizer type {kind!r}")


def warmup_factor(step, warmup):
    """k-diffusion's exponential warm-up: 1 - warmup**(step + 1); warmup = 0 disables it."""
    return 1.0 - warmup ** (step + 1)


def lr_factor(step, sched_config):
    """The multiplier on the base LR at optimizer step `step` (0-based), before the min_lr floor."""
    kind = sched_config["type"]
    if kind == "constant":
        decay = 1.0
    elif kind == "inverse":
        decay = (1.0 + step / sched_config["inv_gamma"]) ** -sched_config["power"]
    elif kind == "exponential":
        decay = sched_config["decay"] ** (step / sched_config["num_steps"])
    else:
        raise ValueError(f"unknown lr_sched type {kind!r}")
    return warmup_factor(step, sched_config["warmup"]) * decay


def set_learning_rates(optimizer, base_lrs, step, sched_config):
    """Set each group's LR for this step; `base_lrs` are the groups' LRs before scheduling."""
    factor = lr_factor(step, sched_config)
    for group, base_lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = max(base_lr * factor, sched_config["min_lr"])
    return optimizer.param_groups[0]["lr"]
