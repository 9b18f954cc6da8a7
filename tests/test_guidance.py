"""Classifier-free guidance and the class label of each image."""

import math

import pytest
import torch

from conftest import tiny_config
from hdiffusion.config import validate_config
from hdiffusion.denoiser import Denoiser
from hdiffusion.errors import UsageError
from hdiffusion.guidance import cfg_denoiser, choose_classes, random_classes
from hdiffusion.models import make_model
from hdiffusion.noise import get_sigmas_karras
from hdiffusion.sampling import SAMPLERS

F64 = torch.float64
NULL = 2  # two classes, 0 and 1; index 2 is the null class


class RecordingDenoiser:
    """D(x; sigma, c) = x * (1 + c) + sigma: distinct per class, and it records each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, class_cond, **extra_args):
        self.calls.append({"n": x.shape[0], "sigma": sigma.clone(), "class_cond": class_cond.clone(), **extra_args})
        return x * (1 + class_cond.to(x.dtype)).reshape(-1, 1) + sigma.reshape(-1, 1)


def test_scale_1_is_the_denoiser_itself():
    denoiser = RecordingDenoiser()
    assert cfg_denoiser(denoiser, 1.0, NULL) is denoiser
    assert cfg_denoiser(denoiser, 1.0, NULL, interval=(0.1, 1.0)) is denoiser


def test_guidance_is_one_batched_forward_of_cond_and_null():
    denoiser = RecordingDenoiser()
    x = torch.randn(3, 4, dtype=F64)
    sigma = torch.full([3], 0.7, dtype=F64)
    labels = torch.tensor([0, 1, 1])
    guided = cfg_denoiser(denoiser, 3.0, NULL)(x, sigma, class_cond=labels)
    assert len(denoiser.calls) == 1
    call = denoiser.calls[0]
    assert call["n"] == 6 and call["class_cond"].tolist() == [0, 1, 1, NULL, NULL, NULL]
    cond, uncond = denoiser(x, sigma, class_cond=labels), denoiser(x, sigma, class_cond=torch.full([3], NULL))
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))


def test_guidance_interval_applies_per_image():
    denoiser = RecordingDenoiser()
    guide = cfg_denoiser(denoiser, 4.0, NULL, interval=(0.5, 2.0))
    x, labels = torch.randn(4, 2, dtype=F64), torch.tensor([0, 1, 0, 1])
    sigma = torch.tensor([0.1, 0.5, 2.0, 5.0], dtype=F64)  # out, in, in (both ends inclusive), out
    guided = guide(x, sigma, class_cond=labels)
    cond = denoiser(x, sigma, class_cond=labels)
    uncond = denoiser(x, sigma, class_cond=torch.full([4], NULL))
    inside = torch.tensor([False, True, True, False])
    torch.testing.assert_close(guided[~inside], cond[~inside], rtol=0, atol=0)
    torch.testing.assert_close(guided[inside], (uncond + 4.0 * (cond - uncond))[inside])
    # A step with no image inside the interval is one plain conditional forward pass.
    denoiser.calls.clear()
    torch.testing.assert_close(guide(x, torch.full([4], 9.0, dtype=F64), class_cond=labels),
                               denoiser(x, torch.full([4], 9.0, dtype=F64), class_cond=labels))
    assert [c["n"] for c in denoiser.calls] == [4, 4]


def test_other_conditioning_is_repeated_for_both_halves():
    denoiser = RecordingDenoiser()
    aug_cond, flag = torch.randn(3, 9), torch.tensor(1.0)
    cfg_denoiser(denoiser, 2.0, NULL)(torch.randn(3, 2), torch.ones(3), class_cond=torch.zeros(3, dtype=torch.long),
                                      aug_cond=aug_cond, flag=flag)
    call = denoiser.calls[0]
    torch.testing.assert_close(call["aug_cond"], torch.cat([aug_cond, aug_cond]))
    assert call["flag"] is flag


def test_bad_guidance_arguments():
    with pytest.raises(ValueError, match="finite"):
        cfg_denoiser(RecordingDenoiser(), math.inf, NULL)
    with pytest.raises(ValueError, match="lo <= hi"):
        cfg_denoiser(RecordingDenoiser(), 2.0, NULL, interval=(2.0, 1.0))


def test_guidance_through_the_model_uses_its_null_class():
    config = validate_config(tiny_config(), "tiny")
    torch.manual_seed(0)
    model = make_model(config["model"], 10).eval()
    denoiser = Denoiser(model, sigma_data=0.5)
    x, sigma, labels = torch.randn(2, 1, 8, 8), torch.full([2], 1.5), torch.tensor([3, 7])
    with torch.no_grad():
        guided = cfg_denoiser(denoiser, 2.5, null_class=10)(x, sigma, class_cond=labels)
        cond = denoiser(x, sigma, class_cond=labels)
        uncond = denoiser(x, sigma, class_cond=torch.full([2], 10))
    torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), rtol=1e-4, atol=1e-5)


# Guided sampling of a class-conditional Gaussian: class c ~ N(MEANS[c], S^2), equal priors. --------------

MEANS, S = torch.tensor([-1.0, 1.0], dtype=F64), 0.5


def two_class_denoiser(x, sigma, class_cond):
    """E[x0 | x, c]; for the null class, E[x0 | x] under the two-class mixture."""
    sigma = sigma.reshape(-1, 1)
    per_class = MEANS + S**2 / (S**2 + sigma**2) * (x - MEANS)  # [N, 2]: the posterior mean for each class
    log_likelihood = -((x - MEANS) ** 2) / (2 * (S**2 + sigma**2))
    posterior = torch.softmax(log_likelihood, dim=1)
    mixture = (posterior * per_class).sum(1, keepdim=True)
    picked = per_class.gather(1, class_cond.clamp(max=1).reshape(-1, 1))
    return torch.where((class_cond == NULL).reshape(-1, 1), mixture, picked)


def guided_samples(scale, label, n=20_000):
    x_T = 80.0 * torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    sigmas = get_sigmas_karras(50, 0.002, 80.0, dtype=F64)
    labels = torch.full([n], label)
    return SAMPLERS["dpmpp_2m"](cfg_denoiser(two_class_denoiser, scale, NULL), x_T, sigmas,
                                extra_args={"class_cond": labels}, disable=True)


def test_guided_sampling_moves_from_the_mixture_to_the_class_and_beyond():
    n = 20_000
    unconditional, conditional, guided = (guided_samples(scale, 1, n) for scale in (0.0, 1.0, 3.0))
    # scale 0: the mixture (mean 0, half the samples on each side); scale 1: class 1 itself, N(1, S^2).
    assert abs(unconditional.mean().item()) < 5 * math.sqrt(1 + S**2) / math.sqrt(n)
    assert abs((unconditional > 0).double().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(n)
    assert abs(conditional.mean().item() - 1.0) < 5 * S / math.sqrt(n)
    assert abs(conditional.std().item() - S) < 5 * S / math.sqrt(2 * n)
    # scale > 1 pushes further from the other class.
    assert guided.mean().item() > 1.0 + 10 * S / math.sqrt(n) and (guided > 0).all()


# Class labels --------------------------------------------------------------------------------------------

def test_choose_classes():
    seeds = [10, 11, 12, 13, 14]
    labels, text = choose_classes(seeds, 10, class_label=3)
    assert labels.tolist() == [3] * 5 and labels.dtype == torch.long and "class 3" in text
    labels, text = choose_classes(seeds, 10, classes=[0, 1, 2])
    assert labels.tolist() == [0, 1, 2, 0, 1] and "in turn" in text
    labels, text = choose_classes(seeds, 10)
    assert labels.tolist() == random_classes(seeds, 10).tolist() and "random class" in text
    assert all(0 <= label < 10 for label in labels.tolist())
    # A random class follows its seed, not its position in the list.
    assert choose_classes([12, 99], 10)[0][0] == labels[2]
    assert choose_classes(seeds, 0) == (None, "")


@pytest.mark.parametrize("kwargs, message", [
    ({"class_label": 10}, "class 10 is out of range: this model has 10 classes (0 to 9)"),
    ({"class_label": -1}, "class -1 is out of range"),
    ({"classes": [1, 12]}, "class 12 is out of range"),
])
def test_classes_out_of_range(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        choose_classes([0, 1], 10, **kwargs)


def test_class_for_an_unconditional_model():
    with pytest.raises(UsageError, match="unconditional"):
        choose_classes([0], 0, class_label=1)
