"""Samplers of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3
with sigma(t) = t, s(t) = 1).

Every sampler is a plain function sample_NAME(denoiser, x, sigmas, extra_args=None, callback=None,
disable=None): denoiser(x, sigma_batch, **extra_args) returns the denoised D; sigmas decreases and ends in 0;
callback({"x", "i", "sigma", "denoised"}) is called once per step, before the step; disable turns off the
progress bar. The last step, to sigma = 0, returns the denoised image of the step before it.
"""

import torch
from tqdm.auto import trange


def to_d(x, sigma, denoised):
    """The ODE derivative dx/dsigma = (x - D) / sigma (Karras et al. 2022, eq. 3 / Alg. 1 line 4)."""
    return (x - denoised) / sigma


def _steps(sigmas, disable):
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {list(sigmas.shape)}")
    return trange(len(sigmas) - 1, disable=disable)


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without its second-order step)."""
    extra_args = {} if extra_args is None else extra_args
    ones = x.new_ones([x.shape[0]])
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "denoised": denoised})
        x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, extra_args=None, callback=None, disable=None):
    """Heun's second-order method (Karras et al. 2022, Alg. 2 with S_churn = 0): an Euler step, then the
    trapezoidal rule on the derivatives at both ends; the last step, to sigma = 0, stays Euler (Alg. 2 line 9)."""
    extra_args = {} if extra_args is None else extra_args
    ones = x.new_ones([x.shape[0]])
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "denoised": denoised})
        d = to_d(x, sigma, denoised)
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = to_d(x_euler, sigma_next, denoiser(x_euler, sigma_next * ones, **extra_args))
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), in k-diffusion's formulation.

    In lambda = -log(sigma) the ODE is solved exactly for a denoised image that is linear in lambda, with
    step h = lambda_next - lambda: x_next = (sigma_next / sigma) x - expm1(-h) D. D is extrapolated from this
    step's and the last step's denoised images, D = (1 + 1/(2r)) denoised - 1/(2r) old_denoised with
    r = h_last / h. The first step has no history and is first order; the last step, to sigma = 0, has
    sigma_next / sigma = 0 and expm1(-h) = -1, so it returns the denoised image exactly.
    """
    extra_args = {} if extra_args is None else extra_args
    ones = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "denoised": denoised})
        if sigma_next == 0:
            x = denoised
        else:
            h = torch.log(sigma) - torch.log(sigma_next)
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (torch.log(sigmas[i - 1]) - torch.log(sigma)) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old_denoised
            x = (sigma_next / sigma) * x - torch.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}
