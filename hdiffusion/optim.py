"""Optimizers and learning-rate schedules.

Schedules are pure functions of the optimizer step, so a resumed run needs only the step to continue, and a
new `--lr` on resume takes effect: the LR is recomputed from the base LR every step, never read back from
the optimizer state.
"""

import torch


def make_optimizer(optimizer_config, param_groups):
    """The fused torch optimizer: one kernel per step and device, and it can skip a step on the device (it honours
    a found_inf tensor, as under a gradient scaler: see training.step_unless), so skipping never syncs the host."""
    kind = optimizer_config["type"]
    if kind == "adamw":
        return torch.optim.AdamW(param_groups, lr=optimizer_config["lr"], betas=tuple(optimizer_config["betas"]),
                                 eps=optimizer_config["eps"], weight_decay=optimizer_config["weight_decay"],
                                 fused=True)
    if kind == "sgd":
        return torch.optim.SGD(param_groups, lr=optimizer_config["lr"], momentum=optimizer_config["momentum"],
                               nesterov=optimizer_config["nesterov"], weight_decay=optimizer_config["weight_decay"],
                               fused=True)
    raise ValueError(f"unknown optimizer type {kind!r}")


def warmup_factor(step, warmup):
    """k-diffusion's exponential warm-up: 1 - warmup**(step + 1); warmup = 0 disables it."""
    return 1.0 - warmup ** (step + 1)


def decay_factor(step, sched_config):
    """The schedule's multiplier on the base LR at optimizer step `step` (0-based), before warm-up."""
    kind = sched_config["type"]
    if kind == "constant":
        return 1.0
    if kind == "inverse":
        return (1.0 + step / sched_config["inv_gamma"]) ** -sched_config["power"]
    if kind == "exponential":
        return sched_config["decay"] ** (step / sched_config["num_steps"])
    raise ValueError(f"unknown lr_sched type {kind!r}")


def scheduled_lr(base_lr, step, sched_config):
    """k-diffusion's order: the decayed LR is floored at min_lr, then scaled by the warm-up."""
    decayed = max(base_lr * decay_factor(step, sched_config), sched_config["min_lr"])
    return warmup_factor(step, sched_config["warmup"]) * decayed


def set_learning_rates(optimizer, base_lrs, step, sched_config):
    """Set each group's LR for this step; `base_lrs` are the groups' LRs before scheduling."""
    for group, base_lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = scheduled_lr(base_lr, step, sched_config)
    return optimizer.param_groups[0]["lr"]
