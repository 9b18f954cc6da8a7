"""What every architecture shares around its conditioning: the checks of the call's conditioning inputs,
gradient checkpointing, and the optimizer's parameter groups.

Every model is called as model(x, c_noise, aug_cond=None, class_cond=None, mapping_cond=None) (see HDiT).
"""

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..augmentation import AUG_COND_FEATURES  # the non-leaky augmentation's conditioning vector


def check_conditioning(model, n, c_noise, aug_cond, class_cond, mapping_cond):
    """Raise ValueError, naming the model class, unless the conditioning inputs fit a batch of n and the model
    (its num_classes and mapping_cond_dim attributes). Returns aug_cond, zeros when not given (sampling)."""
    name, num_classes, mapping_cond_dim = type(model).__name__, model.num_classes, model.mapping_cond_dim
    if c_noise.shape != (n,):
        raise ValueError(f"{name}: c_noise must have shape [{n}], got {list(c_noise.shape)}")
    if aug_cond is None:
        aug_cond = c_noise.new_zeros([n, AUG_COND_FEATURES])
    elif aug_cond.shape != (n, AUG_COND_FEATURES):
        raise ValueError(f"{name}: aug_cond must have shape [{n}, {AUG_COND_FEATURES}], got {list(aug_cond.shape)}")
    if num_classes:
        if class_cond is None:
            raise ValueError(f"{name}: class_cond is required: the model has num_classes={num_classes} "
                             f"(pass index {num_classes} for the unconditional / null class)")
        if class_cond.shape != (n,) or class_cond.is_floating_point():
            raise ValueError(f"{name}: class_cond must be an integer tensor of shape [{n}], "
                             f"got {class_cond.dtype} {list(class_cond.shape)}")
    elif class_cond is not None:
        raise ValueError(f"{name}: class_cond given to an unconditional model (num_classes=0)")
    if mapping_cond_dim:
        if mapping_cond is None or mapping_cond.shape != (n, mapping_cond_dim):
            got = None if mapping_cond is None else list(mapping_cond.shape)
            raise ValueError(f"{name}: mapping_cond of shape [{n}, {mapping_cond_dim}] is required, got {got}")
    elif mapping_cond is not None:
        raise ValueError(f"{name}: mapping_cond given to a model with mapping_cond_dim=0")
    return aug_cond


def checkpoint(function, *args, enabled):
    """function(*args), recomputed in backward instead of keeping its activations when enabled."""
    if enabled and torch.is_grad_enabled():
        return _checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def param_groups(model, lr, weight_decay, decayed, scaled=frozenset(), lr_scale=1.0):
    """AdamW parameter groups of `model`: weight decay on the parameters whose id is in `decayed`, lr * lr_scale
    for those in `scaled` (HDiT's mapping network), each combination one group, empty ones left out."""
    groups = []
    for is_scaled in (False, True):
        for is_decayed in (True, False):
            params = [p for p in model.parameters() if (id(p) in scaled) == is_scaled and (id(p) in decayed) == is_decayed]
            if params:
                groups.append({"params": params, "lr": lr * lr_scale if is_scaled else lr,
                               "weight_decay": weight_decay if is_decayed else 0.0})
    return groups
