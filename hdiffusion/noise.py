"""Training noise-level densities and sampling sigma schedules.

Every training density is written as its inverse CDF, sigma = icdf(u) for u in (0, 1), increasing in u. A
uniform u gives a draw from the density, and a stratified u (one draw per equal stratum of (0, 1), spread over
processes and gradient-accumulation steps) gives a stratified draw of sigma with lower variance of the loss.
The inverse CDFs work in float64 and are vectorised over a tensor u.
"""

import functools
import math

import torch

# sample_sigmas keeps u this far inside (0, 1), where unbounded inverse CDFs stay finite.
_U_EPS = 2.0**-50


def stratified_uniform(n, group, groups, generator=None, device=None):
    """n stratified uniform draws in [0, 1), float64, for one of `groups` callers sharing one global batch.

    The global batch of n * groups draws splits (0, 1) into n * groups equal strata; caller `group` gets
    strata group, group + groups, group + 2 * groups, ..., with one uniform draw inside each. With
    groups = num_processes * grad_accum_steps and group = process_index * grad_accum_steps + accumulation_step,
    the draws of one optimizer step cover every stratum exactly once.
    """
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n}")
    if int(groups) != groups or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups}")
    if int(group) != group or not 0 <= group < groups:
        raise ValueError(f"group must be an integer in [0, {groups}), got {group}")
    n, group, groups = int(n), int(group), int(groups)
    strata = torch.arange(group, n * groups, groups, dtype=torch.float64, device=device)
    offsets = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    return (strata + offsets) / (n * groups)


def _as_float64(u):
    return torch.as_tensor(u, dtype=torch.float64)


def lognormal_icdf(u, mean, std):
    """Lognormal: log(sigma) ~ N(mean, std^2) (EDM's P_mean, P_std, Karras et al. 2022 Sec. 5)."""
    return torch.exp(mean + std * torch.special.ndtri(_as_float64(u)))


def _logistic_cdf(log_sigma, loc, scale):
    z = (log_sigma - loc) / scale
    # The two forms of the sigmoid, so that exp never overflows.
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def loglogistic_icdf(u, loc, scale, min_value=0.0, max_value=None):
    """Log-logistic: log(sigma) ~ Logistic(loc, scale), truncated to [min_value, max_value].

    Truncation maps u into [cdf(min_value), cdf(max_value)], so every u lands inside the bounds.
    """
    cdf_min = 0.0 if min_value <= 0 else _logistic_cdf(math.log(min_value), loc, scale)
    cdf_max = 1.0 if max_value is None else _logistic_cdf(math.log(max_value), loc, scale)
    p = cdf_min + _as_float64(u) * (cdf_max - cdf_min)
    return torch.exp(loc + scale * torch.logit(p))


def loguniform_icdf(u, min_value, max_value):
    """Log-uniform: log(sigma) ~ U(log min_value, log max_value)."""
    log_min, log_max = math.log(min_value), math.log(max_value)
    return torch.exp(log_min + _as_float64(u) * (log_max - log_min))


def v_diffusion_icdf(u, sigma_data, min_value=0.0, max_value=None):
    """The v-diffusion (cosine) density, truncated to [min_value, max_value].

    A uniform timestep t on the cosine schedule alpha = cos(pi t / 2), sigma_vp = sin(pi t / 2) (Salimans & Ho
    2022) gives sigma = sigma_data tan(pi t / 2), so cdf(sigma) = 2/pi atan(sigma / sigma_data).
    """
    cdf_min = 2 / math.pi * math.atan(min_value / sigma_data)
    cdf_max = 1.0 if max_value is None else 2 / math.pi * math.atan(max_value / sigma_data)
    p = cdf_min + _as_float64(u) * (cdf_max - cdf_min)
    return sigma_data * torch.tan(math.pi / 2 * p)


def split_lognormal_icdf(u, mean, std_1, std_2):
    """Split lognormal: log(sigma) has the two-piece normal density, std_1 left of mean and std_2 right of it.

    The density is 2 / ((std_1 + std_2) sqrt(2 pi)) exp(-(y - mean)^2 / (2 std^2)), continuous at the mode,
    so the left half holds probability w = std_1 / (std_1 + std_2) (k-diffusion's rand_split_log_normal). Its CDF
    is 2 w Phi((y - mean) / std_1) below the mean and w + (1 - w)(2 Phi((y - mean) / std_2) - 1) above it;
    inverting each piece gives the two branches below.
    """
    u = _as_float64(u)
    w = std_1 / (std_1 + std_2)
    left = mean + std_1 * torch.special.ndtri((u / (2 * w)).clamp(max=0.5))
    right = mean + std_2 * torch.special.ndtri(((u - w) / (2 * (1 - w)) + 0.5).clamp(min=0.5))
    return torch.exp(torch.where(u < w, left, right))


def _shifted_cosine_sigma(t, sigma_data, min_value, max_value, noise_d, image_d):
    """The shifted cosine schedule of simple diffusion (Hoogeboom et al. 2023, Sec. 3.1) on t in [0, 1].

    The cosine schedule sigma / sigma_data = tan(pi t / 2), restricted to [min_value, max_value], with its
    log-SNR shifted by 2 log(noise_d / image_d) and its endpoints kept: with r = noise_d / image_d,
    sigma(t) = sigma_data / r * tan(lerp(atan(r min_value / sigma_data), atan(r max_value / sigma_data), t)),
    so sigma(0) = min_value and sigma(1) = max_value. r < 1 (noise_d < image_d) moves mass to higher noise.
    """
    r = noise_d / image_d
    angle_min = math.atan(r * min_value / sigma_data)
    angle_max = math.atan(r * max_value / sigma_data)
    return sigma_data / r * torch.tan(angle_min + t * (angle_max - angle_min))


def cosine_interpolated_icdf(u, image_d, noise_d_low, noise_d_high, sigma_data, min_value, max_value):
    """Simple diffusion's interpolated cosine density (Hoogeboom et al. 2023), as k-diffusion's
    rand_cosine_interpolated draws it.

    With t in [0, 1] running from the clean end (sigma = min_value) to the noise end (sigma = max_value), the
    log-SNR interpolates between two shifted cosine schedules: the one shifted for noise_d_high at t = 0 and the
    one shifted for noise_d_low at t = 1, i.e. log sigma(t) = (1 - t) log sigma_high(t) + t log sigma_low(t).
    So high noise levels follow the schedule shifted for the low resolution noise_d_low (the larger shift when
    noise_d_low < noise_d_high <= image_d) and low noise levels the one for noise_d_high. sigma(t) is increasing,
    so a uniform t is its own CDF value: icdf(u) = sigma(u).

    k-diffusion writes the same map with t reversed (its t = 0 is the noise end, weighted fully to noise_d_low)
    and names its log-SNR bounds logsnr_min = -2 log(min_value / sigma_data), which is the largest log-SNR;
    the distribution of sigma is the same.
    """
    t = _as_float64(u)
    sigma_low = _shifted_cosine_sigma(t, sigma_data, min_value, max_value, noise_d_low, image_d)
    sigma_high = _shifted_cosine_sigma(t, sigma_data, min_value, max_value, noise_d_high, image_d)
    return torch.exp(torch.lerp(torch.log(sigma_high), torch.log(sigma_low), t))


def _require(condition, message):
    if not condition:
        raise ValueError(message)


def _check_bounds(kind, min_value, max_value, allow_zero_min):
    _require(min_value > 0 or (allow_zero_min and min_value == 0),
             f"{kind} min_value must be {'non-negative' if allow_zero_min else 'positive'}, got {min_value}")
    _require(max_value is None or max_value > min_value,
             f"{kind} max_value must exceed min_value, got {min_value} and {max_value}")


def make_sigma_density(density_config, sigma_data):
    """The inverse CDF u -> sigma of a training density config (filled in by the config loader)."""
    c = density_config
    kind = c.get("type")
    if kind == "lognormal":
        _require(c["std"] > 0, f"lognormal std must be positive, got {c['std']}")
        return functools.partial(lognormal_icdf, mean=c["mean"], std=c["std"])
    if kind == "loglogistic":
        _require(c["scale"] > 0, f"loglogistic scale must be positive, got {c['scale']}")
        _check_bounds(kind, c["min_value"], c["max_value"], allow_zero_min=True)
        return functools.partial(
            loglogistic_icdf, loc=c["loc"], scale=c["scale"], min_value=c["min_value"], max_value=c["max_value"]
        )
    if kind == "loguniform":
        _require(c["max_value"] is not None, "loguniform needs a finite max_value")
        _check_bounds(kind, c["min_value"], c["max_value"], allow_zero_min=False)
        return functools.partial(loguniform_icdf, min_value=c["min_value"], max_value=c["max_value"])
    if kind in ("v-diffusion", "cosine"):
        _check_bounds(kind, c["min_value"], c["max_value"], allow_zero_min=True)
        return functools.partial(
            v_diffusion_icdf, sigma_data=sigma_data, min_value=c["min_value"], max_value=c["max_value"]
        )
    if kind == "split-lognormal":
        _require(c["std_1"] > 0 and c["std_2"] > 0, "split-lognormal std_1 and std_2 must be positive")
        return functools.partial(split_lognormal_icdf, mean=c["mean"], std_1=c["std_1"], std_2=c["std_2"])
    if kind == "cosine-interpolated":
        _require(c["max_value"] is not None, "cosine-interpolated needs a finite max_value")
        _check_bounds(kind, c["min_value"], c["max_value"], allow_zero_min=False)
        for key in ("image_d", "noise_d_low", "noise_d_high"):
            _require(c[key] > 0, f"cosine-interpolated {key} must be positive, got {c[key]}")
        return functools.partial(
            cosine_interpolated_icdf,
            image_d=c["image_d"],
            noise_d_low=c["noise_d_low"],
            noise_d_high=c["noise_d_high"],
            sigma_data=sigma_data,
            min_value=c["min_value"],
            max_value=c["max_value"],
        )
    raise ValueError(
        f"unknown sigma density type {kind!r}; expected one of lognormal, loglogistic, loguniform, "
        "v-diffusion, cosine, split-lognormal, cosine-interpolated"
    )


def sample_sigmas(density, n, group=0, groups=1, generator=None, device=None, dtype=torch.float32):
    """n training noise levels: a stratified u (see stratified_uniform) through the inverse CDF `density`."""
    u = stratified_uniform(n, group, groups, generator=generator, device=device)
    return density(u.clamp(_U_EPS, 1 - _U_EPS)).to(dtype)


def _check_schedule(n, sigma_min, sigma_max):
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min} and {sigma_max}")
    return int(n)


def _append_zero(sigmas, dtype):
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device=None, dtype=torch.float32):
    """The Karras et al. 2022 sampling schedule (eq. 5): n sigmas from sigma_max down to sigma_min, evenly
    spaced in sigma^(1/rho), followed by a final 0 (n + 1 entries)."""
    n = _check_schedule(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64, device=device)
    inv_rho_max, inv_rho_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho, dtype)


def get_sigmas_exponential(n, sigma_min, sigma_max, device=None, dtype=torch.float32):
    """n sigmas evenly spaced in log(sigma) from sigma_max to sigma_min, then 0: even steps in DPM-Solver's
    lambda = -log(sigma) (Lu et al. 2022's "logSNR" schedule)."""
    n = _check_schedule(n, sigma_min, sigma_max)
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64, device=device)
    return _append_zero(log_sigmas.exp(), dtype)


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1.0, device=None, dtype=torch.float32):
    """k-diffusion's polyexponential schedule: log(sigma) = log(sigma_min) + ramp^rho (log(sigma_max) -
    log(sigma_min)) with ramp from 1 to 0, then 0. rho = 1 is the exponential schedule; rho > 1 puts more steps
    at low noise."""
    n = _check_schedule(n, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, n, dtype=torch.float64, device=device) ** rho
    return _append_zero(torch.exp(math.log(sigma_min) + ramp * (math.log(sigma_max) - math.log(sigma_min))), dtype)


def get_sigmas_vp(n, sigma_min, sigma_max, beta_d=19.9, beta_min=0.1, device=None, dtype=torch.float32):
    """The VP schedule: n steps evenly spaced in the time t of the VP SDE, sigma(t) = sqrt(exp(beta_d t^2 / 2 +
    beta_min t) - 1) (Song et al. 2021; Karras et al. 2022, Table 1), then 0. The defaults are the continuous
    form of DDPM's linear betas (1e-4 to 0.02 over 1000 steps), so this is DDIM's uniform timestep spacing.

    t runs between the times of sigma_max and sigma_min, sigma^-1(s) = (sqrt(beta_min^2 + 2 beta_d log(1 + s^2))
    - beta_min) / beta_d, so the schedule keeps the model's range; k-diffusion's get_sigmas_vp (t from 1 to
    1e-3) is the range sigma(1e-3) ~ 0.01 to sigma(1) ~ 152."""
    n = _check_schedule(n, sigma_min, sigma_max)

    def t_of(sigma):
        return (math.sqrt(beta_min**2 + 2 * beta_d * math.log1p(sigma**2)) - beta_min) / beta_d

    t = torch.linspace(t_of(sigma_max), t_of(sigma_min), n, dtype=torch.float64, device=device)
    return _append_zero(torch.expm1(beta_d * t**2 / 2 + beta_min * t).sqrt(), dtype)


# name -> schedule(n, sigma_min, sigma_max, device=None, dtype=torch.float32, **options): n + 1 sigmas ending in 0.
SCHEDULES = {
    "karras": get_sigmas_karras,
    "exponential": get_sigmas_exponential,
    "polyexponential": get_sigmas_polyexponential,
    "vp": get_sigmas_vp,
}
