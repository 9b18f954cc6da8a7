import math

import pytest
import torch
from torch import nn

from hdiffusion.denoiser import Denoiser, edm_scalings, loss_weight

SIGMAS = [1e-3, 0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 80.0, 500.0]


class ConvNet(nn.Module):
    """An arbitrary network F(c_in x, c_noise) with a noise-level input and optional class conditioning."""

    def __init__(self, channels=3, num_classes=4):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, 8, 3, padding=1)
        self.noise_proj = nn.Linear(1, 8)
        self.class_emb = nn.Embedding(num_classes, 8)
        self.conv_out = nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, x, c_noise, class_cond=None):
        h = self.conv_in(x) + self.noise_proj(c_noise[:, None].to(x.dtype))[:, :, None, None]
        if class_cond is not None:
            h = h + self.class_emb(class_cond)[:, :, None, None]
        return self.conv_out(torch.tanh(h))


def make_net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return ConvNet().to(dtype)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_scalings_equal_edm_table_1(sigma_data):
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sigma_data)
    for i, s in enumerate(SIGMAS):
        assert c_skip[i].item() == pytest.approx(sigma_data**2 / (s**2 + sigma_data**2), rel=1e-12)
        assert c_out[i].item() == pytest.approx(s * sigma_data / math.sqrt(s**2 + sigma_data**2), rel=1e-12)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + sigma_data**2), rel=1e-12)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("sigma", [1e-4, 1e-5, 1e-6])
def test_denoised_tends_to_input_as_sigma_vanishes(sigma):
    sigma_data = 0.5
    net = make_net()
    model = Denoiser(net, sigma_data=sigma_data)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigma_batch = torch.full([4], sigma, dtype=torch.float64)
    with torch.no_grad():
        denoised = model(x, sigma_batch)
        _, _, c_in, c_noise = edm_scalings(sigma_batch, sigma_data)
        network_output = net(c_in[:, None, None, None] * x, c_noise)
    # D - x = (c_skip - 1) x + c_out F with 1 - c_skip = sigma^2 / (sigma^2 + sd^2) <= sigma^2 / sd^2 and
    # c_out <= sigma, so |D - x| <= sigma^2 / sd^2 |x| + sigma |F|.
    bound = sigma**2 / sigma_data**2 * x.abs() + sigma * network_output.abs()
    assert ((denoised - x).abs() <= bound * (1 + 1e-9) + 1e-15).all()
    assert (denoised - x).abs().max() < 10 * sigma * (1 + network_output.abs().max())


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_weightings_on_the_denoised_error(sigma_data):
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()

    def weight_on_denoised(weighting, gamma=None):
        # weight_F (F - F*)^2 = weight_F / c_out^2 (D - D*)^2
        return loss_weight(sigma, sigma_data, weighting, gamma) / c_out**2

    torch.testing.assert_close(weight_on_denoised("karras"), 1 / c_out**2, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        weight_on_denoised("soft-min-snr"), 1 / (sigma**2 + sigma_data**2), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(weight_on_denoised("soft-min-snr", 5.0), 1 / (sigma**2 + 1 / 5.0), rtol=1e-12, atol=0)
    torch.testing.assert_close(weight_on_denoised("snr"), 1 / sigma**2, rtol=1e-12, atol=0)


def test_unknown_weighting_raises():
    with pytest.raises(ValueError, match="weighting"):
        loss_weight(torch.ones(2), 1.0, "min-snr")
    with pytest.raises(ValueError, match="weighting"):
        Denoiser(make_net(), weighting="eps")


def weight_on_denoised_reference(sigma, sigma_data, weighting, gamma):
    if weighting == "karras":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    if weighting == "soft-min-snr":
        gamma = sigma_data**-2 if gamma is None else gamma
        return 1 / (sigma**2 + 1 / gamma)
    return 1 / sigma**2


@pytest.mark.parametrize(
    "weighting, gamma", [("karras", None), ("soft-min-snr", None), ("soft-min-snr", 5.0), ("snr", None)]
)
def test_loss_equals_weighted_denoised_error(weighting, gamma):
    sigma_data = 0.5
    model = Denoiser(make_net(), sigma_data=sigma_data, weighting=weighting, soft_min_snr_gamma=gamma)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 3, 8, 8, generator=gen, dtype=torch.float64) * sigma_data
    noise = torch.randn(6, 3, 8, 8, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 80.0], dtype=torch.float64)
    class_cond = torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        loss = model.loss(x0, noise, sigma, class_cond=class_cond)
        denoised = model(x0 + sigma[:, None, None, None] * noise, sigma, class_cond=class_cond)
    weight_d = weight_on_denoised_reference(sigma, sigma_data, weighting, gamma)
    expected = weight_d * ((denoised - x0) ** 2).mean((1, 2, 3))
    assert loss.shape == (6,)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)


def test_conditioning_reaches_inner_model():
    model = Denoiser(make_net(), sigma_data=0.5)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([1.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        a = model(x, sigma, class_cond=torch.tensor([0, 0]))
        b = model(x, sigma, class_cond=torch.tensor([1, 1]))
    assert not torch.allclose(a, b)


class ExactTarget(nn.Module):
    """The optimal network for data concentrated at the points x0 (one per batch element): it recovers sigma
    from c_noise and outputs F* = (x0 - c_skip x) / c_out, so that D(x; sigma) = x0 exactly."""

    def __init__(self, x0, sigma_data):
        super().__init__()
        self.x0, self.sigma_data = x0, sigma_data

    def forward(self, scaled_x, c_noise):
        sigma = torch.exp(4 * c_noise)[:, None, None, None]
        x = scaled_x * (sigma**2 + self.sigma_data**2).sqrt()
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        return (self.x0 - c_skip * x) / c_out


@pytest.mark.parametrize("weighting", ["karras", "soft-min-snr", "snr"])
def test_loss_is_zero_at_the_optimum(weighting):
    sigma_data = 0.5
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 3, 8, 8, generator=gen, dtype=torch.float64) * sigma_data
    noise = torch.randn(5, 3, 8, 8, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    model = Denoiser(ExactTarget(x0, sigma_data), sigma_data=sigma_data, weighting=weighting)
    loss = model.loss(x0, noise, sigma)
    assert loss.abs().max() < 1e-18
    torch.testing.assert_close(model(x0 + sigma[:, None, None, None] * noise, sigma), x0)
    # A network off the target has a positive loss.
    assert (Denoiser(make_net(), sigma_data=sigma_data, weighting=weighting).loss(x0, noise, sigma) > 0).all()


def test_loss_in_float32_under_bf16_autocast():
    sigma_data = 0.5
    model = Denoiser(make_net(dtype=torch.float32), sigma_data=sigma_data)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 3, 8, 8, generator=gen)
    noise = torch.randn(4, 3, 8, 8, generator=gen)
    sigma = torch.tensor([0.01, 0.5, 2.0, 80.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(x0, noise, sigma)
    loss.sum().backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    reference = model.loss(x0, noise, sigma).detach()
    torch.testing.assert_close(loss.detach(), reference, rtol=0.1, atol=0)


def test_scalar_sigma_broadcasts_over_batch():
    model = Denoiser(make_net(), sigma_data=0.5)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 2.0), model(x, torch.full([3], 2.0, dtype=torch.float64)))
