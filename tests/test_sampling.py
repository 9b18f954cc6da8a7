import math

import pytest
import torch

from hdiffusion.noise import get_sigmas_karras
from hdiffusion.sampling import SAMPLERS

# Data N(MU, S^2) per dimension, for which the exact denoiser and the exact ODE solution are known.
MU, S = 0.7, 0.5
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
ORDERS = {"euler": 1, "heun": 2, "dpmpp_2m": 2}


def gaussian_denoiser(x, sigma):
    """E[x0 | x] for x0 ~ N(MU, S^2), x = x0 + sigma * noise."""
    sigma = sigma.reshape(-1, *[1] * (x.ndim - 1))
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_ode_solution(x_T, sigma):
    """The probability-flow ODE dx/dsigma = (x - D) / sigma = (x - MU) sigma / (S^2 + sigma^2), solved from
    (SIGMA_MAX, x_T): x - MU grows as sqrt(S^2 + sigma^2)."""
    return MU + (x_T - MU) * math.sqrt(S**2 + sigma**2) / math.sqrt(S**2 + SIGMA_MAX**2)


def initial_noise(n, seed):
    return SIGMA_MAX * torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name, steps", [("euler", 1000), ("heun", 100), ("dpmpp_2m", 100)])
def test_samples_have_the_data_mean_and_std(name, steps):
    n = 20_000
    sigmas = get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX, dtype=torch.float64)
    x = SAMPLERS[name](gaussian_denoiser, initial_noise(n, 0), sigmas, disable=True)
    assert torch.isfinite(x).all()
    # Within 5 standard errors of the sample mean and of the sample standard deviation.
    assert abs(x.mean().item() - MU) < 5 * S / math.sqrt(n)
    assert abs(x.std().item() - S) < 5 * S / math.sqrt(2 * n)


def final_sample_error(name, steps):
    x_T = initial_noise(16, 1)
    sigmas = get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX, dtype=torch.float64)
    x = SAMPLERS[name](gaussian_denoiser, x_T, sigmas, disable=True)
    # Every sampler here ends with x = D(x; SIGMA_MIN), the exact ODE step to 0 up to O(SIGMA_MIN^2) that does
    # not change with the step count; compare against that same step taken from the exact solution at
    # SIGMA_MIN, so that the error is the integration error alone.
    exact_at_sigma_min = exact_ode_solution(x_T, SIGMA_MIN)
    reference = gaussian_denoiser(exact_at_sigma_min, torch.full([16], SIGMA_MIN, dtype=torch.float64))
    assert (reference - exact_ode_solution(x_T, 0.0)).abs().max() < 1e-4
    return (x - reference).abs().max().item()


@pytest.mark.parametrize("name", ORDERS)
def test_convergence_order(name):
    # Doubling the steps of the Karras schedule divides the error by about 2^order.
    errors = [final_sample_error(name, steps) for steps in (32, 64, 128)]
    observed = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    for order in observed:
        assert abs(order - ORDERS[name]) < 0.25, (name, errors, observed)


@pytest.mark.parametrize("name", ORDERS)
def test_one_step_returns_the_denoised_image(name):
    x_T = initial_noise(8, 2)
    sigmas = torch.tensor([SIGMA_MAX, 0.0], dtype=torch.float64)
    x = SAMPLERS[name](gaussian_denoiser, x_T, sigmas, disable=True)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x, gaussian_denoiser(x_T, torch.full([8], SIGMA_MAX, dtype=torch.float64)))


@pytest.mark.parametrize("name", ORDERS)
def test_callback_per_step_and_last_step_ends_at_the_denoised(name):
    calls = []
    sigmas = get_sigmas_karras(6, SIGMA_MIN, SIGMA_MAX, dtype=torch.float64)
    x = SAMPLERS[name](gaussian_denoiser, initial_noise(4, 3), sigmas, callback=calls.append, disable=True)
    assert [c["i"] for c in calls] == list(range(6))
    assert all(set(c) == {"x", "i", "sigma", "denoised"} for c in calls)
    assert [c["sigma"].item() for c in calls] == sigmas[:-1].tolist()
    torch.testing.assert_close(x, calls[-1]["denoised"], rtol=0, atol=0)


def test_extra_args_reach_the_denoiser():
    seen = []

    def denoiser(x, sigma, class_cond=None):
        seen.append(class_cond)
        return gaussian_denoiser(x, sigma)

    sigmas = get_sigmas_karras(3, SIGMA_MIN, SIGMA_MAX, dtype=torch.float64)
    for sampler in SAMPLERS.values():
        seen.clear()
        sampler(denoiser, initial_noise(2, 4), sigmas, extra_args={"class_cond": "cat"}, disable=True)
        assert seen and all(c == "cat" for c in seen)


def test_samplers_work_on_image_batches_in_float32():
    x_T = SIGMA_MAX * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    sigmas = get_sigmas_karras(10, SIGMA_MIN, SIGMA_MAX)
    for sampler in SAMPLERS.values():
        x = sampler(gaussian_denoiser, x_T, sigmas, disable=True)
        assert x.shape == x_T.shape and x.dtype == torch.float32 and torch.isfinite(x).all()
