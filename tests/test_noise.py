import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from hdiffusion.noise import (
    get_sigmas_karras,
    make_sigma_density,
    sample_sigmas,
    stratified_uniform,
)

SIGMA_DATA = 0.5


# Reference CDFs, written from each density's definition and independently of the inverse CDFs under test.


def truncated(cdf, min_value, max_value):
    lo = cdf(min_value) if min_value > 0 else 0.0
    hi = 1.0 if max_value is None else cdf(max_value)
    return lambda s: np.clip((cdf(s) - lo) / (hi - lo), 0, 1)


def loglogistic_cdf(c):
    def cdf(s):
        return special.expit((np.log(s) - c["loc"]) / c["scale"])

    return truncated(cdf, c["min_value"], c["max_value"])


def v_diffusion_cdf(c):
    return truncated(lambda s: 2 / np.pi * np.arctan(np.asarray(s) / SIGMA_DATA), c["min_value"], c["max_value"])


def two_piece_normal_cdf(c):
    # Density 2 / ((std_1 + std_2) sqrt(2 pi)) exp(-(y - mean)^2 / (2 std^2)), std = std_1 left of the mean,
    # std_2 right of it, for y = log(sigma).
    mean, std_1, std_2 = c["mean"], c["std_1"], c["std_2"]

    def cdf(s):
        y = np.log(s)
        left = 2 * std_1 / (std_1 + std_2) * stats.norm.cdf(y, mean, std_1)
        right = 1 - 2 * std_2 / (std_1 + std_2) * stats.norm.sf(y, mean, std_2)
        return np.where(y < mean, left, right)

    return cdf


def kdiffusion_cosine_interpolated_sigma(t, c):
    """sigma as a function of t in k-diffusion's rand_cosine_interpolated (t = its uniform draw), restated."""
    image_d, sd = c["image_d"], SIGMA_DATA
    # k-diffusion's logsnr_min / logsnr_max: the log-SNR at min_value (the largest) and at max_value.
    logsnr_at_min_value = -2 * math.log(c["min_value"] / sd)
    logsnr_at_max_value = -2 * math.log(c["max_value"] / sd)

    def cosine(t, logsnr_a, logsnr_b):
        angle_from = math.atan(math.exp(-0.5 * logsnr_b))
        angle_to = math.atan(math.exp(-0.5 * logsnr_a))
        return -2 * np.log(np.tan(angle_from + t * (angle_to - angle_from)))

    def shifted(t, noise_d):
        shift = 2 * math.log(noise_d / image_d)
        return cosine(t, logsnr_at_min_value - shift, logsnr_at_max_value - shift) + shift

    logsnr = (1 - t) * shifted(t, c["noise_d_low"]) + t * shifted(t, c["noise_d_high"])
    return sd * np.exp(-logsnr / 2)


def cosine_interpolated_cdf(c):
    t_grid = np.linspace(0, 1, 10001)
    sigma_grid = kdiffusion_cosine_interpolated_sigma(t_grid, c)
    # The forward map runs from max_value at t = 0 down to min_value at t = 1, strictly decreasing, ...
    assert sigma_grid[0] == pytest.approx(c["max_value"]) and sigma_grid[-1] == pytest.approx(c["min_value"])
    assert (np.diff(sigma_grid) < 0).all()

    def cdf(s):
        # ... so P(sigma <= s) = P(t >= t(s)) = 1 - t(s); t(s) by bisection.
        s = np.asarray(s, dtype=np.float64)
        lo, hi = np.zeros_like(s), np.ones_like(s)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = kdiffusion_cosine_interpolated_sigma(mid, c) > s
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        return np.clip(1 - (lo + hi) / 2, 0, 1)

    return cdf


DENSITIES = {
    "lognormal": (
        {"type": "lognormal", "mean": -1.2, "std": 1.2},
        lambda c: stats.lognorm(s=c["std"], scale=math.exp(c["mean"])).cdf,
    ),
    "loglogistic": (
        {"type": "loglogistic", "loc": -0.5, "scale": 0.6, "min_value": 0.0, "max_value": None},
        loglogistic_cdf,
    ),
    "loglogistic-truncated": (
        {"type": "loglogistic", "loc": -0.5, "scale": 0.6, "min_value": 0.05, "max_value": 5.0},
        loglogistic_cdf,
    ),
    "loguniform": (
        {"type": "loguniform", "min_value": 0.002, "max_value": 80.0},
        lambda c: stats.loguniform(c["min_value"], c["max_value"]).cdf,
    ),
    "v-diffusion": ({"type": "v-diffusion", "min_value": 0.0, "max_value": None}, v_diffusion_cdf),
    "v-diffusion-truncated": ({"type": "v-diffusion", "min_value": 0.01, "max_value": 10.0}, v_diffusion_cdf),
    "cosine": ({"type": "cosine", "min_value": 1e-3, "max_value": 1e3}, v_diffusion_cdf),
    "split-lognormal": ({"type": "split-lognormal", "mean": -0.4, "std_1": 0.8, "std_2": 1.6}, two_piece_normal_cdf),
    "cosine-interpolated": (
        {
            "type": "cosine-interpolated", "image_d": 64, "noise_d_low": 32, "noise_d_high": 64,
            "min_value": 1e-3, "max_value": 1e3,
        },
        cosine_interpolated_cdf,
    ),
    "cosine-interpolated-256": (
        {
            "type": "cosine-interpolated", "image_d": 256, "noise_d_low": 32, "noise_d_high": 128,
            "min_value": 1e-2, "max_value": 80.0,
        },
        cosine_interpolated_cdf,
    ),
}


@pytest.mark.parametrize("name", DENSITIES)
def test_density_matches_its_cdf(name):
    config, reference_cdf = DENSITIES[name]
    density = make_sigma_density(config, SIGMA_DATA)
    u = torch.rand(10_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = density(u).numpy()
    assert np.isfinite(sigma).all() and (sigma > 0).all()
    assert stats.kstest(sigma, reference_cdf(config)).pvalue > 0.01


@pytest.mark.parametrize("name", DENSITIES)
def test_inverse_cdf_is_increasing_and_within_bounds(name):
    config, _ = DENSITIES[name]
    density = make_sigma_density(config, SIGMA_DATA)
    u = torch.tensor([1e-15, *torch.linspace(1e-6, 1 - 1e-6, 10_001).tolist(), 1 - 1e-15], dtype=torch.float64)
    sigma = density(u)
    # Increasing, so that stratified u gives stratified sigma.
    assert torch.isfinite(sigma).all() and (sigma.diff() >= 0).all()
    if config.get("max_value") is not None:
        # Bounded densities map the closed interval [0, 1] onto [min_value, max_value].
        sigma = density(torch.cat([u.new_zeros(1), u, u.new_ones(1)]))
        assert (sigma.diff() >= 0).all()
        assert (sigma >= config["min_value"] * (1 - 1e-12)).all()
        assert (sigma <= config["max_value"] * (1 + 1e-12)).all()
        assert sigma[0].item() == pytest.approx(config["min_value"], rel=1e-9)
        assert sigma[-1].item() == pytest.approx(config["max_value"], rel=1e-9)


def test_split_lognormal_matches_kdiffusion_sampling_procedure():
    # k-diffusion draws |n| with n ~ N(0, 1) and puts it left of the mean (scaled by std_1) with probability
    # std_1 / (std_1 + std_2), else right of it (scaled by std_2).
    config = DENSITIES["split-lognormal"][0]
    mean, std_1, std_2 = config["mean"], config["std_1"], config["std_2"]
    gen = torch.Generator().manual_seed(1)
    n = torch.randn(10_000, generator=gen, dtype=torch.float64).abs()
    left = torch.rand(10_000, generator=gen, dtype=torch.float64) < std_1 / (std_1 + std_2)
    reference = torch.where(left, mean - std_1 * n, mean + std_2 * n).exp()
    u = torch.rand(10_000, generator=gen, dtype=torch.float64)
    sigma = make_sigma_density(config, SIGMA_DATA)(u)
    assert stats.ks_2samp(sigma.numpy(), reference.numpy()).pvalue > 0.01


def test_cosine_interpolated_noise_end_follows_noise_d_low():
    # At the top of the range sigma follows the schedule shifted for noise_d_low: swapping noise_d_low and
    # noise_d_high changes the density, and the low-resolution shift puts more mass at high noise.
    base = {"type": "cosine-interpolated", "image_d": 256, "min_value": 1e-3, "max_value": 1e3}
    low_high = make_sigma_density({**base, "noise_d_low": 32, "noise_d_high": 256}, 1.0)
    high_low = make_sigma_density({**base, "noise_d_low": 256, "noise_d_high": 32}, 1.0)
    unshifted = make_sigma_density({**base, "noise_d_low": 256, "noise_d_high": 256}, 1.0)
    u = torch.tensor([0.9], dtype=torch.float64)
    assert low_high(u) > unshifted(u) * 2
    assert high_low(u) < low_high(u)


def test_stratified_uniform_covers_every_stratum_once():
    n, groups = 7, 6
    gen = torch.Generator().manual_seed(0)
    strata = []
    for group in range(groups):
        u = stratified_uniform(n, group, groups, generator=gen)
        assert u.shape == (n,) and u.dtype == torch.float64
        assert ((u >= 0) & (u < 1)).all()
        index = torch.floor(u * n * groups).long()
        assert index.tolist() == list(range(group, n * groups, groups))
        strata.append(index)
    assert sorted(torch.cat(strata).tolist()) == list(range(n * groups))


def test_stratified_uniform_within_one_stratum_is_uniform():
    u = torch.cat([stratified_uniform(1, g, 1000, generator=torch.Generator().manual_seed(g)) for g in range(1000)])
    assert stats.kstest((u * 1000 - torch.arange(1000)).numpy(), "uniform").pvalue > 0.01


@pytest.mark.parametrize("group, groups", [(-1, 4), (4, 4), (0, 0), (0.5, 4)])
def test_stratified_uniform_rejects_bad_groups(group, groups):
    with pytest.raises(ValueError):
        stratified_uniform(8, group, groups)


def test_sample_sigmas_is_stratified_in_sigma():
    config = DENSITIES["lognormal"][0]
    density = make_sigma_density(config, SIGMA_DATA)
    cdf = DENSITIES["lognormal"][1](config)
    n, groups = 16, 4
    for group in range(groups):
        sigma = sample_sigmas(density, n, group, groups, generator=torch.Generator().manual_seed(group),
                              dtype=torch.float64)
        index = np.floor(cdf(sigma.numpy()) * n * groups).astype(int)
        assert index.tolist() == list(range(group, n * groups, groups))


def test_sample_sigmas_finite_for_unbounded_densities():
    for name in ["lognormal", "loglogistic", "v-diffusion", "split-lognormal"]:
        density = make_sigma_density(DENSITIES[name][0], SIGMA_DATA)
        sigma = sample_sigmas(density, 100_000, generator=torch.Generator().manual_seed(0))
        assert sigma.dtype == torch.float32
        assert torch.isfinite(sigma).all() and (sigma > 0).all()


def test_unknown_density_raises():
    with pytest.raises(ValueError, match="unknown sigma density"):
        make_sigma_density({"type": "gaussian"}, 1.0)


def test_karras_schedule():
    sigma_min, sigma_max, rho = 0.002, 80.0, 7.0
    sigmas = get_sigmas_karras(10, sigma_min, sigma_max, rho=rho)
    assert sigmas.shape == (11,)
    assert sigmas[0].item() == pytest.approx(sigma_max, rel=1e-6)
    assert sigmas[-2].item() == pytest.approx(sigma_min, rel=1e-6)
    assert sigmas[-1].item() == 0
    assert (sigmas.diff() < 0).all()
    # Karras et al. 2022, eq. 5, at i = 3 of N = 10.
    i, N = 3, 10
    expected = (sigma_max ** (1 / rho) + i / (N - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    assert sigmas[i].item() == pytest.approx(expected, rel=1e-6)
    assert get_sigmas_karras(1, sigma_min, sigma_max).tolist() == [sigma_max, 0.0]
