"""Classifier-free guidance, and the class label of each image.

Class-conditional models here have a class embedding with num_classes + 1 entries; index num_classes is the
null class that training substitutes for the label with probability dataset.cond_dropout_rate, so one network
gives both the conditional D(x; sigma, c) and the unconditional D(x; sigma, null).
"""

import math

import torch

from .errors import UsageError


def _rows(t, x):
    return t.reshape(-1, *[1] * (x.ndim - 1))


def _doubled(value, n):
    """A conditioning value for the batch [x; x]: per-image tensors repeat, anything else passes through."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
        return torch.cat([value, value])
    return value


def cfg_denoiser(denoiser, scale, null_class, interval=None):
    """The classifier-free guided denoiser (Ho & Salimans 2022, eq. 6, with w + 1 written as scale):

        D_w(x; sigma, c) = D(x; sigma, null) + scale (D(x; sigma, c) - D(x; sigma, null)).

    scale = 1 is no guidance: the denoiser itself comes back, one forward pass of N images. Otherwise both terms
    come from one forward pass of the batch [x; x] with labels [c; null]. Guidance applies to all channels of D
    (equivalently of eps = (x - D) / sigma: both are affine in the network output with the same coefficients).

    interval = (lo, hi) guides only images whose sigma lies in [lo, hi] and gives the others D(x; sigma, c),
    exactly (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"); a step with no image inside
    the interval costs one pass of N images. The guided denoiser takes class_cond as a keyword (a LongTensor of
    labels in [0, num_classes)), like the model.
    """
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale}")
    lo, hi = (0.0, math.inf) if interval is None else (float(interval[0]), float(interval[1]))
    if not 0 <= lo <= hi:
        raise ValueError(f"guidance interval needs 0 <= lo <= hi, got {interval}")
    if scale == 1:
        return denoiser

    def guided(x, sigma, class_cond, **extra_args):
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        inside = (sigma >= lo) & (sigma <= hi)
        # Only an interval needs `inside` on the host, to skip the doubled pass: reading it waits for the GPU.
        if interval is not None and not inside.any():
            return denoiser(x, sigma, class_cond=class_cond, **extra_args)
        n = x.shape[0]
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                        class_cond=torch.cat([class_cond, torch.full_like(class_cond, null_class)]),
                        **{k: _doubled(v, n) for k, v in extra_args.items()})
        cond, uncond = both[:n], both[n:]
        return torch.where(_rows(inside, x), uncond + scale * (cond - uncond), cond)

    return guided


def random_classes(seeds, num_classes):
    """A class per seed, drawn from the seed itself so that it too is reproducible per image."""
    return torch.tensor([int(torch.randint(num_classes, (), generator=torch.Generator().manual_seed(s + 2**40)))
                         for s in seeds], dtype=torch.long)


def choose_classes(seeds, num_classes, class_label=None, classes=None):
    """(labels, description): one class label per seed, or (None, "") for an unconditional model.

    class_label: every image gets it. classes: a list cycled in seed order (image i gets classes[i % len]), so
    `--classes 0,1,2,3 --grid 4x4` puts one class per column. Neither: a random class per seed, drawn from the
    seed (random_classes). Labels out of [0, num_classes) are a UsageError.
    """
    chosen = [class_label] if class_label is not None else classes
    if not num_classes:
        if chosen:
            raise UsageError("--class/--classes need a class-conditional model; this one is unconditional")
        return None, ""
    for label in chosen or []:
        if not 0 <= label < num_classes:
            raise UsageError(f"class {label} is out of range: this model has {num_classes} classes "
                             f"(0 to {num_classes - 1})")
    if class_label is not None:
        return torch.full([len(seeds)], class_label, dtype=torch.long), f"class {class_label}"
    if classes:
        labels = torch.tensor([classes[i % len(classes)] for i in range(len(seeds))], dtype=torch.long)
        return labels, f"classes {','.join(map(str, classes))} in turn"
    return random_classes(seeds, num_classes), f"no class given: a random class per seed (of {num_classes})"
