"""Non-leaking augmentation: the conditioning vector reproduces the warp, p = 0 changes nothing, the draws
follow their distributions and depend only on the generator."""

import math

import pytest
import torch

from conftest import tiny_config
from hdiffusion.augmentation import (augment, augment_batch, augmentation_matrix, random_flip, sample_aug_cond,
                                     warp)
from hdiffusion.config import validate_config
from hdiffusion.denoiser import Denoiser
from hdiffusion.models import make_model


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def coordinate_image(height, width, n=1):
    """Channels (x, y): each pixel's own coordinates, in pixels from the image center (x right, y down)."""
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5 - height / 2, torch.arange(width) + 0.5 - width / 2,
                            indexing="ij")
    return torch.stack([xs, ys]).expand(n, 2, height, width).double()


def cond(**parts):
    names = ["x_flip", "y_flip", "scale", "cos_m1", "sin", "aniso_c", "aniso_s", "t_x", "t_y"]
    return torch.tensor([[float(parts.get(name, 0)) for name in names]])


def rotation_cond(angle):
    return cond(cos_m1=math.cos(angle) - 1, sin=math.sin(angle))


def R(angle):
    return torch.tensor([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]],
                        dtype=torch.double)


def S(x, y):
    return torch.diag(torch.tensor([x, y, 1.0], dtype=torch.double))


def T(x, y):
    return torch.tensor([[1, 0, x], [0, 1, y], [0, 0, 1]], dtype=torch.double)


def chain_from_cond(c, height, width):
    """The warp of the Karras et al. pipeline composed step by step (k-diffusion's order) from parameters read
    back out of the conditioning vector: flips, scale, rotation, anisotropy along an axis, translation."""
    x_flip, y_flip, scale, cos_m1, sin, aniso_c, aniso_s, t_x, t_y = c.tolist()
    angle = math.atan2(sin, cos_m1 + 1)
    aniso, phi = math.hypot(aniso_c, aniso_s), math.atan2(aniso_s, aniso_c) / 2  # the vector holds 2 phi
    k, s = 2 ** (0.2 * aniso), 2 ** (0.2 * scale)
    return (S(1 - 2 * x_flip, 1 - 2 * y_flip) @ S(s, s) @ R(-angle) @ R(phi) @ S(k, 1 / k) @ R(-phi)
            @ T(t_x * width / 8, t_y * height / 8))


@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_conditioning_vector_reproduces_the_warp(size):
    """Each output pixel of an augmented coordinate image holds the input coordinates it was sampled from;
    the map rebuilt from aug_cond alone, step by step, predicts them."""
    height, width = size
    n = 64
    images = coordinate_image(height, width, n)
    aug_cond = sample_aug_cond(n, 1.0, generator(1))
    matrix = augmentation_matrix(aug_cond, size)
    sampled_from = warp(images, matrix.double(), mode="bilinear")  # bilinear reproduces linear images exactly
    output = coordinate_image(height, width)[0]
    homogeneous = torch.cat([output, torch.ones(1, height, width, dtype=torch.double)])
    checked = 0
    for i in range(n):
        chain = chain_from_cond(aug_cond[i], height, width)
        torch.testing.assert_close(matrix[i].double(), chain, rtol=0, atol=1e-5)
        predicted = torch.einsum("ij,jhw->ihw", chain, homogeneous)[:2]
        inside = (predicted[0].abs() < width / 2 - 1) & (predicted[1].abs() < height / 2 - 1)
        torch.testing.assert_close(sampled_from[i][:, inside], predicted[:, inside], rtol=0, atol=1e-4)
        checked += int(inside.sum())
    assert checked > n * height * width / 4


def test_known_warps():
    image = torch.rand(1, 3, 8, 8, generator=generator(2))
    for mode in ["bicubic", "bilinear"]:
        torch.testing.assert_close(warp(image, augmentation_matrix(cond(x_flip=1), (8, 8)), mode), image.flip(-1))
        torch.testing.assert_close(warp(image, augmentation_matrix(cond(y_flip=1), (8, 8)), mode), image.flip(-2))
        quarter = warp(image, augmentation_matrix(rotation_cond(math.pi / 2), (8, 8)), mode)
        # A positive angle turns the content clockwise as displayed (y points down).
        torch.testing.assert_close(quarter, torch.rot90(image, -1, dims=(-2, -1)), atol=1e-5, rtol=0)
    # t_x = 1 is a translation by W / 8 = 2 pixels; the map is output -> input, so output x reads input x + 2.
    wide = torch.rand(1, 1, 8, 16, generator=generator(3))
    shifted = warp(wide, augmentation_matrix(cond(t_x=1), (8, 16)))
    torch.testing.assert_close(shifted[..., :14], wide[..., 2:], atol=1e-5, rtol=0)


def test_augmenting_then_inverting_recovers_the_image():
    """The inverse map undoes the warp (up to interpolation) away from the borders."""
    height = width = 32
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    image = torch.stack([torch.sin(2 * xs + ys), torch.cos(2 * ys - xs)])[None].double()  # smooth
    c = cond(scale=0.5, cos_m1=math.cos(0.4) - 1, sin=math.sin(0.4), aniso_c=0.3, aniso_s=-0.5, t_x=0.2, t_y=-0.1)
    matrix = augmentation_matrix(c, (height, width)).double()
    back = warp(warp(image, matrix), torch.linalg.inv(matrix))
    center = slice(10, 22)
    torch.testing.assert_close(back[..., center, center], image[..., center, center], atol=2e-2, rtol=0)
    assert (warp(image, matrix) - image)[..., center, center].abs().max() > 0.2  # the warp itself is not small


def test_zero_probability_leaves_images_untouched():
    images = torch.rand(16, 3, 8, 8, generator=generator(4)) * 2 - 1
    augmented, aug_cond = augment(images, 0.0, generator(5))
    assert torch.equal(augmented, images) and torch.equal(aug_cond, torch.zeros(16, 9))
    g = generator(6)
    state = g.get_state()
    same, none = augment_batch(images, 0.0, False, g)
    assert same is images and none is None
    assert torch.equal(g.get_state(), state)  # no random numbers drawn: the rest of the step is unchanged


def test_unaugmented_images_pass_bit_for_bit():
    images = torch.rand(256, 1, 8, 8, generator=generator(7))
    augmented, aug_cond = augment(images, 0.1, generator(8))
    identity = (aug_cond == 0).all(1)
    assert 0 < identity.sum() < 256
    assert torch.equal(augmented[identity], images[identity])
    assert not torch.equal(augmented[~identity], images[~identity])


def test_draws_follow_their_distributions():
    n, p = 40000, 0.3
    c = sample_aug_cond(n, p, generator(9))
    applied = c != 0
    assert applied[:, 0].float().mean().item() == pytest.approx(p / 2, abs=0.01)  # x-flip: gated coin
    assert applied[:, 1].float().mean().item() == pytest.approx(p / 2, abs=0.01)
    for columns in [[2], [3, 4], [5, 6], [7, 8]]:
        assert applied[:, columns].any(1).float().mean().item() == pytest.approx(p, abs=0.01)
    full = sample_aug_cond(n, 1.0, generator(10))
    assert full[:, 2].std().item() == pytest.approx(1, abs=0.03)  # log2 scale / 0.2 ~ N(0, 1)
    angle = torch.atan2(full[:, 4], full[:, 3] + 1)
    assert angle.min() < -3 and angle.max() > 3 and angle.mean().abs() < 0.05  # the whole circle
    assert torch.hypot(full[:, 5], full[:, 6]).pow(2).mean().item() == pytest.approx(1, abs=0.05)
    assert full[:, 7:].std(0).sub(1).abs().max() < 0.03
    assert set(full[:, :2].unique().tolist()) == {0.0, 1.0}


def test_same_generator_same_augmentation():
    images = torch.rand(32, 3, 16, 16, generator=generator(11))
    a, cond_a = augment(images, 0.5, generator(12))
    b, cond_b = augment(images, 0.5, generator(12))
    c, cond_c = augment(images, 0.5, generator(13))
    assert torch.equal(a, b) and torch.equal(cond_a, cond_b)
    assert not torch.equal(cond_a, cond_c)


def test_random_flip_mirrors_about_half():
    images = torch.rand(1000, 1, 4, 4, generator=generator(14))
    flipped = random_flip(images, generator(15))
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    kept = (flipped == images).flatten(1).all(1)
    assert torch.all(mirrored ^ kept)
    assert mirrored.float().mean().item() == pytest.approx(0.5, abs=0.05)
    out, aug_cond = augment_batch(images, 0.0, True, generator(15))
    assert torch.equal(out, flipped) and aug_cond is None
    _, aug_cond = augment_batch(images, 0.2, True, generator(15))  # augmentation on: its x-flip replaces it
    assert aug_cond.shape == (1000, 9)


def test_model_takes_the_conditioning_through_the_denoiser():
    config = validate_config(tiny_config(), "tiny")
    torch.manual_seed(0)
    model = make_model(config["model"], config["dataset"]["num_classes"])
    for parameter in model.parameters():  # the fresh model's zero-initialised output would hide the conditioning
        if not parameter.detach().any():
            torch.nn.init.normal_(parameter.data, std=0.1)
    denoiser = Denoiser(model.eval(), sigma_data=0.5)  # eval: no dropout
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    augmented, aug_cond = augment(images, 1.0, generator(16))
    noise, sigma, labels = torch.randn_like(images), torch.full([4], 1.0), torch.arange(4)
    with_cond = denoiser.loss(augmented, noise, sigma, aug_cond=aug_cond, class_cond=labels)
    without = denoiser.loss(augmented, noise, sigma, class_cond=labels)
    assert with_cond.shape == (4,) and not torch.allclose(with_cond, without)
    torch.testing.assert_close(denoiser.loss(augmented, noise, sigma, aug_cond=torch.zeros(4, 9), class_cond=labels),
                               without)
