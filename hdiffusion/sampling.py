"""Samplers of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3
with sigma(t) = t, s(t) = 1) and of its reverse-time SDEs, with k-diffusion's names.

Every sampler is a plain function sample_NAME(denoiser, x, sigmas, extra_args=None, callback=None,
disable=None, ...): denoiser(x, sigma_batch, **extra_args) returns the denoised D; sigmas decreases and ends in 0;
callback({"x", "i", "sigma", "denoised"}) is called once per step, before the step; disable turns off the
progress bar. The last step, to sigma = 0, returns the denoised image of the step before it, exactly.

The stochastic samplers take noise_sampler(sigma, sigma_next) -> a standard normal batch like x (k-diffusion's
convention, with sigma and sigma_next as Python floats); by default they draw from torch's global generator (the
SDE samplers through a Brownian tree seeded from it, as k-diffusion does). For images that depend on their seed
alone, pass make_noise_sampler(name, seeds, ...): row i of every draw then comes from seeds[i] only (a Brownian
tree for the SDE samplers), so image i is the same whatever batch it is sampled in.

The samplers decide their control flow (the last step, churn, a step that ends at sigma = 0) from a host copy of
the schedule, read once per call, and do the math on the schedule's tensors: an `if` on a GPU tensor waits for
every kernel queued before it, so the host could never queue the next step while the GPU runs this one. Where a
decision depends on a computed value (sigma_down), it is computed for all steps at once, by the same tensor ops,
and read back once too. dpm_adaptive alone waits on the GPU every step: accepting a step needs its error.

In lambda = -log(sigma), the DPM-Solver family's time, a step from sigma to sigma_next has h = log(sigma /
sigma_next), and the ODE reads dx/dlambda = D - x: in data prediction it integrates exactly for a D that is
polynomial in lambda (Lu et al. 2022, "DPM-Solver++"), which is what the dpmpp samplers assume.
"""

import functools
import hashlib
import math
import struct

import numpy as np
import torch
from tqdm.auto import tqdm, trange


def to_d(x, sigma, denoised):
    """The ODE derivative dx/dsigma = (x - D) / sigma (Karras et al. 2022, eq. 3 / Alg. 1 line 4)."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma, sigma_next, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step: go deterministically to sigma_down, then add fresh noise of
    std sigma_up, so that sigma_down^2 + sigma_up^2 = sigma_next^2. sigma_up is DDIM's eq. 16 (Song et al. 2021)
    in the EDM parameterisation, eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2): eta = 1 is DDPM's
    ancestral sampling, eta = 0 the deterministic ODE step."""
    if not eta:
        return sigma_next, sigma_next * 0
    sigma_up = torch.minimum(sigma_next, eta * sigma_next * (1 - sigma_next**2 / sigma**2).sqrt())
    return (sigma_next**2 - sigma_up**2).sqrt(), sigma_up


def _sigmas_down_host(sigmas, eta):
    """Every step's sigma_down (get_ancestral_step) as Python floats, for the samplers' test of sigma_down = 0:
    the same tensor ops as the step's own (exactly rounded, so elementwise the same values), on all steps at
    once and read back once."""
    return get_ancestral_step(sigmas[:-1], sigmas[1:], eta)[0].tolist()


def default_noise_sampler(x):
    """Standard normal noise like x from torch's global generator, fresh at every call."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def default_brownian_noise(x, sigmas):
    """The SDE samplers' default, as in k-diffusion: a Brownian tree per image over the schedule, seeded from
    torch's global generator."""
    seeds = torch.randint(0, 2**62, [x.shape[0]]).tolist()
    return brownian_noise(seeds, x.shape[1:], sigmas, device=x.device, dtype=x.dtype)


def _rows(t, x):
    """A per-image [N] tensor shaped [N, 1, ..., 1] to broadcast over x."""
    return t.reshape(-1, *[1] * (x.ndim - 1))


def _model(denoiser, x, extra_args):
    """D(x, sigma) with sigma a scalar or a per-image [N] tensor, always passed to the denoiser as [N]."""
    extra_args = {} if extra_args is None else extra_args
    ones = x.new_ones([x.shape[0]])
    return lambda x, sigma: denoiser(x, sigma * ones, **extra_args)


def _report(callback, i, x, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "denoised": denoised})


def _steps(sigmas, disable):
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {list(sigmas.shape)}")
    return trange(len(sigmas) - 1, disable=disable)


def _churn_gammas(sigmas, s_churn, s_tmin, s_tmax):
    """Karras et al. 2022, Alg. 2's gamma of every step, as Python floats: min(s_churn / steps, sqrt(2) - 1) where
    sigma is in [s_tmin, s_tmax], else 0. The range test runs on the schedule's tensor, in its dtype as a test of
    each sigma would, for all steps at once: one read back to the host per sampling call."""
    inside = ((sigmas[:-1] >= s_tmin) & (sigmas[:-1] <= s_tmax)).tolist()
    return [min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if step_inside else 0.0 for step_inside in inside]


def _churn(x, sigma, gamma, s_noise, noise):
    """Karras et al. 2022, Alg. 2's churn: raise the noise level to sigma_hat = (1 + gamma) sigma by adding
    noise() of std sqrt(sigma_hat^2 - sigma^2); returns (x_hat, sigma_hat). gamma = 0 (s_churn = 0, the default)
    leaves x as it is."""
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + noise() * s_noise * (sigma_hat**2 - sigma**2).sqrt(), sigma_hat


# Karras et al. 2022: Euler, Heun and the DPM-Solver-2-like midpoint method, with churn ------------------

@torch.no_grad()
def sample_euler(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0, noise_sampler=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without its second-order step),
    with Alg. 2's churn (s_churn > 0 makes it stochastic)."""
    model = _model(denoiser, x, extra_args)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    sigmas_host, gammas = sigmas.tolist(), _churn_gammas(sigmas, s_churn, s_tmin, s_tmax)
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        noise = functools.partial(noise_sampler, sigmas_host[i], sigmas_host[i + 1])
        x, sigma_hat = _churn(x, sigma, gammas[i], s_noise, noise)
        denoised = model(x, sigma_hat)
        _report(callback, i, x, sigma, denoised)
        x = denoised if sigmas_host[i + 1] == 0 else x + to_d(x, sigma_hat, denoised) * (sigma_next - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None):
    """Ancestral sampling with Euler steps: an Euler step to sigma_down, then fresh noise of std sigma_up
    (get_ancestral_step). eta = 0 is sample_euler."""
    model = _model(denoiser, x, extra_args)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    sigmas_host = sigmas.tolist()
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigmas_host[i + 1] == 0:
            x = denoised
            continue
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if eta:
            x = x + noise_sampler(sigmas_host[i], sigmas_host[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0, noise_sampler=None):
    """Heun's second-order method (Karras et al. 2022, Alg. 2): churn, an Euler step, then the trapezoidal
    rule on the derivatives at both ends; the last step, to sigma = 0, stays Euler (Alg. 2 line 9)."""
    model = _model(denoiser, x, extra_args)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    sigmas_host, gammas = sigmas.tolist(), _churn_gammas(sigmas, s_churn, s_tmin, s_tmax)
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        noise = functools.partial(noise_sampler, sigmas_host[i], sigmas_host[i + 1])
        x, sigma_hat = _churn(x, sigma, gammas[i], s_noise, noise)
        denoised = model(x, sigma_hat)
        _report(callback, i, x, sigma, denoised)
        if sigmas_host[i + 1] == 0:
            x = denoised
            continue
        d = to_d(x, sigma_hat, denoised)
        x_euler = x + d * (sigma_next - sigma_hat)
        d_next = to_d(x_euler, sigma_next, model(x_euler, sigma_next))
        x = x + (d + d_next) / 2 * (sigma_next - sigma_hat)
    return x


def _dpm_2_step(model, x, sigma, sigma_next, denoised):
    """The midpoint method with its midpoint in log sigma, sigma_mid = sqrt(sigma sigma_next), where
    DPM-Solver-2 puts it (Lu et al. 2022, Alg. 1 with r1 = 1/2): an Euler step to sigma_mid, then the whole step
    with the derivative there. Second order: sigma_mid is the arithmetic midpoint up to O(h^2)."""
    sigma_mid = (sigma * sigma_next).sqrt()
    x_mid = x + to_d(x, sigma, denoised) * (sigma_mid - sigma)
    return x + to_d(x_mid, sigma_mid, model(x_mid, sigma_mid)) * (sigma_next - sigma)


@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0, noise_sampler=None):
    """k-diffusion's DPM2: Karras et al. 2022's Alg. 2 with the Heun step replaced by the DPM-Solver-2-like
    midpoint step (_dpm_2_step), churn included; the last step, to sigma = 0, is Euler."""
    model = _model(denoiser, x, extra_args)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    sigmas_host, gammas = sigmas.tolist(), _churn_gammas(sigmas, s_churn, s_tmin, s_tmax)
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        noise = functools.partial(noise_sampler, sigmas_host[i], sigmas_host[i + 1])
        x, sigma_hat = _churn(x, sigma, gammas[i], s_noise, noise)
        denoised = model(x, sigma_hat)
        _report(callback, i, x, sigma, denoised)
        x = denoised if sigmas_host[i + 1] == 0 else _dpm_2_step(model, x, sigma_hat, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None):
    """Ancestral sampling with DPM2 steps: a midpoint step to sigma_down, then noise of std sigma_up.
    eta = 0 is sample_dpm_2."""
    model = _model(denoiser, x, extra_args)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    sigmas_host, sigmas_down_host = sigmas.tolist(), _sigmas_down_host(sigmas, eta)
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigmas_host[i + 1] == 0:
            x = denoised
            continue
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = denoised if sigmas_down_host[i] == 0 else _dpm_2_step(model, x, sigma, sigma_down, denoised)
        if eta:
            x = x + noise_sampler(sigmas_host[i], sigmas_host[i + 1]) * s_noise * sigma_up
    return x


# Linear multistep and DDIM ------------------------------------------------------------------------------

def lms_coefficients(sigmas, i, order):
    """Adams-Bashforth weights for the step sigmas[i] -> sigmas[i + 1] in sigma, on the derivatives at
    sigmas[i], sigmas[i - 1], ..., sigmas[i - order + 1]: weight j is the integral over the step of the Lagrange
    polynomial that is 1 at sigmas[i - j] and 0 at the other nodes. Gauss-Legendre quadrature with `order`
    points is exact for these polynomials (degree order - 1)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    nodes = sigmas[i - np.arange(order)]
    start, end = sigmas[i], sigmas[i + 1]
    points, weights = np.polynomial.legendre.leggauss(order)
    tau = start + (end - start) * (points + 1) / 2
    coefficients = []
    for j in range(order):
        basis = np.prod([(tau - nodes[k]) / (nodes[j] - nodes[k]) for k in range(order) if k != j], axis=0)
        coefficients.append((end - start) / 2 * float(np.sum(weights * basis)))
    return coefficients


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """The linear multistep (Adams-Bashforth) method in sigma of order `order` on the ODE derivatives, as in
    k-diffusion and Karras et al. 2022's "LMS" (Liu et al. 2022, PNDM, use the same family). The first steps
    use what history there is (orders 1, 2, ...); the last step, to sigma = 0, is Euler."""
    model = _model(denoiser, x, extra_args)
    sigmas_cpu = sigmas.detach().cpu().double().numpy()
    derivatives = []
    for i in _steps(sigmas, disable):
        sigma = sigmas[i]
        denoised = model(x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigmas_cpu[i + 1] == 0:
            x = denoised
            continue
        derivatives = [to_d(x, sigma, denoised)] + derivatives[:order - 1]
        coefficients = lms_coefficients(sigmas_cpu, i, len(derivatives))
        x = x + sum(c * d for c, d in zip(coefficients, derivatives))
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, extra_args=None, callback=None, disable=None):
    """Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0), for users coming from DDIM.

    DDIM's x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, divided by sqrt(abar_prev), is in the EDM
    parameterisation (x = x_vp / sqrt(abar), sigma = sqrt((1 - abar) / abar)) x_next = D + sigma_next eps with
    eps = (x - D) / sigma: the Euler step x + (sigma_next - sigma) (x - D) / sigma (Karras et al. 2022, Sec. 3,
    and DDIM's own eq. 14) and DPM-Solver-1 (Lu et al. 2022, eq. 3.7). So ddim gives euler's images up to
    rounding; DDIM's uniform timesteps on the DDPM schedule are --schedule vp.
    """
    model = _model(denoiser, x, extra_args)
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        _report(callback, i, x, sigma, denoised)
        x = denoised + sigma_next * (x - denoised) / sigma
    return x


# DPM-Solver (Lu et al. 2022): noise prediction eps = (x - D) / sigma, fixed and adaptive steps ------------

def _phi_1(h):
    """(e^h - 1) / h, with its limit 1 at h = 0 (rows that have finished in dpm_adaptive take h = 0)."""
    return torch.where(h == 0, torch.ones_like(h), torch.expm1(h) / h)


class _DPMSolver:
    """The single-step DPM-Solver updates of Lu et al. 2022 in the EDM parameterisation (alpha = 1, sigma =
    e^-lambda), on per-image [N] tensors lam (the current lambda) and h (the step in lambda)."""

    def __init__(self, model, x):
        self.model, self.x = model, x

    def eps(self, x, lam):
        sigma = torch.exp(-lam)
        return (x - self.model(x, sigma)) / _rows(sigma, x)

    def _r(self, t):
        return _rows(t, self.x)

    def step_1(self, x, lam, h, eps):
        """DPM-Solver-1 (eq. 3.7): x - sigma_next (e^h - 1) eps, the Euler step."""
        return x - self._r(torch.exp(-(lam + h)) * torch.expm1(h)) * eps

    def step_2(self, x, lam, h, eps, r1=0.5):
        """DPM-Solver-2 (Alg. 1), with eps at lambda + r1 h; returns (x_next, eps there)."""
        s1 = lam + r1 * h
        u1 = x - self._r(torch.exp(-s1) * torch.expm1(r1 * h)) * eps
        eps_1 = self.eps(u1, s1)
        sigma_next = torch.exp(-(lam + h))
        x_next = (x - self._r(sigma_next * torch.expm1(h)) * eps
                  - self._r(sigma_next / (2 * r1) * torch.expm1(h)) * (eps_1 - eps))
        return x_next, eps_1

    def step_3(self, x, lam, h, eps, eps_1=None, r1=1 / 3, r2=2 / 3):
        """DPM-Solver-3 (Alg. 2); eps_1, the eps at lambda + r1 h, may come from a DPM-Solver-2 step (r1 = 1/3)."""
        s1, s2 = lam + r1 * h, lam + r2 * h
        if eps_1 is None:
            eps_1 = self.eps(x - self._r(torch.exp(-s1) * torch.expm1(r1 * h)) * eps, s1)
        u2 = (x - self._r(torch.exp(-s2) * torch.expm1(r2 * h)) * eps
              - self._r(torch.exp(-s2) * r2 / r1 * (_phi_1(r2 * h) - 1)) * (eps_1 - eps))
        eps_2 = self.eps(u2, s2)
        sigma_next = torch.exp(-(lam + h))
        return (x - self._r(sigma_next * torch.expm1(h)) * eps
                - self._r(sigma_next / r2 * (_phi_1(h) - 1)) * (eps_2 - eps))

    def step(self, x, lam, h, eps, order):
        if order == 1:
            return self.step_1(x, lam, h, eps)
        if order == 2:
            return self.step_2(x, lam, h, eps)[0]
        return self.step_3(x, lam, h, eps)


def _solver_end(sigmas):
    """(sigma_end, denoise): dpm_fast and dpm_adaptive solve down to sigmas[-2] and denoise there when the
    schedule ends in 0 (lambda = infinity is out of reach), else they solve down to sigmas[-1]."""
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {list(sigmas.shape)}")
    return (sigmas[-2], True) if sigmas[-1] == 0 else (sigmas[-1], False)


def dpm_fast_orders(nfe):
    """DPM-Solver-fast's orders for a budget of nfe evaluations (Lu et al. 2022): as many third-order
    steps as fit, then [2, 1], [1] or [2] to use the rest."""
    if nfe < 1:
        return []
    steps = nfe // 3 + 1
    if nfe % 3 == 0:
        return [3] * (steps - 2) + [2, 1]
    return [3] * (steps - 1) + [nfe % 3]


@torch.no_grad()
def sample_dpm_fast(denoiser, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver-fast (Lu et al. 2022): len(sigmas) - 1 model evaluations in all, spent on steps
    uniform in lambda between sigmas[0] and the last nonzero sigma with orders from dpm_fast_orders, and one
    final evaluation that denoises to sigma = 0. The schedule's interior points are not used."""
    model = _model(denoiser, x, extra_args)
    sigma_end, denoise = _solver_end(sigmas)
    orders = dpm_fast_orders(len(sigmas) - 1 - denoise)
    solver = _DPMSolver(model, x)
    ones = x.new_ones([x.shape[0]])
    lams = torch.linspace(-math.log(sigmas[0]), -math.log(sigma_end), len(orders) + 1, dtype=torch.float64).tolist()
    for i in trange(len(orders) + denoise, disable=disable):
        if i == len(orders):
            denoised = model(x, sigma_end)
            _report(callback, i, x, sigma_end, denoised)
            return denoised
        lam, h = lams[i], lams[i + 1] - lams[i]
        denoised = model(x, math.exp(-lam))
        _report(callback, i, x, x.new_full([], math.exp(-lam)), denoised)  # a fill: new_tensor would copy and wait
        eps = (x - denoised) / math.exp(-lam)
        x = solver.step(x, lam * ones, h * ones, eps, orders[i])
    return x


@torch.no_grad()
def sample_dpm_adaptive(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, order=3, rtol=0.05,
                        atol=0.0078, h_init=0.05, h_max=1.0, safety=0.9):
    """DPM-Solver-12 (order=2) or -23 (order=3) with embedded error control (Lu et al. 2022, adaptive step
    size): each step computes a lower- and a higher-order solution from shared evaluations, accepts when their
    scaled RMS difference E = ||(x_high - x_low) / delta|| <= 1 with delta = max(atol, rtol max(|x_low|, |x|)),
    and sets the next step h <- h clamp(safety E^(-1/order), 0.2, 2.5) (Hairer, Norsett & Wanner, Solving ODEs I,
    II.4), at most h_max in lambda: the embedded estimate misses much of the error of steps far beyond h = 1 (on
    a Gaussian, DPM-Solver-23 accepted h = 2.7 and ended 160x off its tolerance; capped, within 3x).

    Each image has its own lambda, step size and error, so image i takes the same steps whatever batch it is
    in (the denoiser gets per-image sigmas); the loop runs until every image has reached the last nonzero sigma,
    then denoises to 0. Only sigmas[0] and the last nonzero sigma are used. The defaults are the paper's for
    images in [-1, 1] (atol 0.0078, about one 8-bit level). callback gets per-image sigmas.
    """
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive order must be 2 or 3, got {order}")
    model = _model(denoiser, x, extra_args)
    sigma_end, denoise = _solver_end(sigmas)
    solver = _DPMSolver(model, x)
    lam = x.new_full([x.shape[0]], -math.log(sigmas[0]))
    lam_end = x.new_full([x.shape[0]], -math.log(sigma_end))
    h = torch.full_like(lam, h_init)
    eps, i = None, 0
    # The only sampler that waits for the GPU at every step: whether to go on, to accept a step and to evaluate
    # the model again depends on the error just computed there, so the host cannot queue the next step ahead.
    with tqdm(disable=disable, unit="step") as progress:
        while (lam < lam_end).any():
            active = lam < lam_end
            h = h.clamp(max=h_max)
            last = h >= lam_end - lam
            h = torch.where(active, torch.minimum(h, lam_end - lam), 0)  # finished rows stand still
            if eps is None:
                denoised = model(x, torch.exp(-lam))
                _report(callback, i, x, torch.exp(-lam), denoised)
                eps, i = (x - denoised) / _rows(torch.exp(-lam), x), i + 1
            if order == 2:
                x_low = solver.step_1(x, lam, h, eps)
                x_high, _ = solver.step_2(x, lam, h, eps)
            else:
                x_low, eps_1 = solver.step_2(x, lam, h, eps, r1=1 / 3)
                x_high = solver.step_3(x, lam, h, eps, eps_1)
            delta = torch.maximum(x.new_tensor(atol), rtol * torch.maximum(x_low.abs(), x.abs()))
            error = ((x_high - x_low) / delta).pow(2).flatten(1).mean(1).sqrt()
            if not torch.isfinite(error).all():
                raise FloatingPointError("dpm_adaptive: the error estimate is not finite")
            accept = active & (error <= 1)
            x = torch.where(_rows(accept, x), x_high, x)
            lam = torch.where(accept, torch.where(last, lam_end, lam + h), lam)
            h = h * (safety * error.pow(-1 / order)).clamp(0.2, 2.5)
            if accept.any():
                eps = None
            progress.update()
    if not denoise:
        return x
    denoised = model(x, sigma_end)
    _report(callback, i, x, sigma_end, denoised)
    return denoised


# DPM-Solver++ (Lu et al. 2022b): data prediction, single-step, multistep and SDE -------------------------

@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                              s_noise=1.0, noise_sampler=None):
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1 with r = 1/2) to sigma_down, then noise of std sigma_up.

    With r = 1/2 the step uses only the denoised image at the midpoint sigma_mid = sqrt(sigma sigma_down):
    x_mid = (sigma_mid / sigma) x - expm1(-h/2) D, x_next = (sigma_down / sigma) x - expm1(-h) D(x_mid).
    eta = 0 is the deterministic DPM-Solver++(2S)."""
    model = _model(denoiser, x, extra_args)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    sigmas_host, sigmas_down_host = sigmas.tolist(), _sigmas_down_host(sigmas, eta)
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigmas_host[i + 1] == 0:
            x = denoised
            continue
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        if sigmas_down_host[i] == 0:
            x = denoised
        else:
            h = torch.log(sigma / sigma_down)
            sigma_mid = (sigma * sigma_down).sqrt()
            x_mid = (sigma_mid / sigma) * x - torch.expm1(-h / 2) * denoised
            x = (sigma_down / sigma) * x - torch.expm1(-h) * model(x_mid, sigma_mid)
        if eta:
            x = x + noise_sampler(sigmas_host[i], sigmas_host[i + 1]) * s_noise * sigma_up
    return x


def _ancestral_dpmpp_1(x, sigma, sigma_next, denoised, eta, noise):
    """The first-order DPM-Solver++ step to sigma_down, x_down = D + (sigma_down / sigma)(x - D) (= DDIM), then
    noise() * sigma_up: an ancestral step whose D may be any estimate over the step."""
    sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
    x = denoised + (sigma_down / sigma) * (x - denoised)
    return x + noise() * sigma_up if eta else x


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=0.5):
    """DPM-Solver++ SDE, k-diffusion's single-step stochastic second-order method (two evaluations a step).

    An ancestral first-order step to sigma_mid = sigma^(1-r) sigma_next^r gives D_mid there; the whole step is
    then an ancestral step with the D that is linear in lambda through both, D + (D_mid - D) / (2r) (the
    DPM-Solver++(2S) combination, Lu et al. 2022b, Alg. 1). Its two noise draws, over (sigma, sigma_mid) and
    (sigma, sigma_next), overlap: with a Brownian tree they are correlated as the path makes them.
    eta = 0 is a deterministic second-order single-step solver."""
    model = _model(denoiser, x, extra_args)
    noise_sampler = default_brownian_noise(x, sigmas) if noise_sampler is None else noise_sampler
    sigmas_host = sigmas.tolist()
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigmas_host[i + 1] == 0:
            x = denoised
            continue
        sigma_mid = sigma ** (1 - r) * sigma_next**r
        sigma_mid_host = sigmas_host[i] ** (1 - r) * sigmas_host[i + 1] ** r  # for the noise sampler
        x_mid = _ancestral_dpmpp_1(x, sigma, sigma_mid, denoised, eta,
                                   lambda: noise_sampler(sigmas_host[i], sigma_mid_host) * s_noise)
        denoised_mid = model(x_mid, sigma_mid)
        denoised_d = denoised + (denoised_mid - denoised) / (2 * r)
        x = _ancestral_dpmpp_1(x, sigma, sigma_next, denoised_d, eta,
                               lambda: noise_sampler(sigmas_host[i], sigmas_host[i + 1]) * s_noise)
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
    model = _model(denoiser, x, extra_args)
    old_denoised, sigmas_host = None, sigmas.tolist()
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigmas_host[i + 1] == 0:
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


def _sde_noise(noise_sampler, sigma, sigma_next, h, eta, s_noise):
    """The noise of an SDE-DPM-Solver++ step (Lu et al. 2022b; eta = 1: the reverse SDE): std
    sigma_next sqrt(1 - e^(-2 eta h)), the variance the step's contraction e^(-eta h) takes away. The samplers
    pass sigma and sigma_next as Python floats, so that the noise sampler need not read them from the GPU."""
    return noise_sampler(sigma, sigma_next) * s_noise * sigma_next * (-torch.expm1(-2 * eta * h)).sqrt()


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, SDE-DPM-Solver++(2M); eta interpolates to the
    ODE, eta = 0 with solver_type="midpoint" being sample_dpmpp_2m).

    With z = (1 + eta) h, the exact solution of the SDE for D linear in lambda, D(u) = D + u D', is
    x_next = (sigma_next / sigma) e^(-eta h) x + (1 - e^-z) D + h phi_2 D' + noise, phi_2 = 1 - (1 - e^-z) / z.
    D' h comes from the last step's D, D' h = (D - D_old) / r with r = h_last / h; "heun" uses phi_2 as it
    is, "midpoint" its approximation (1 - e^-z) / 2. The first step has no history and is first order."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    model = _model(denoiser, x, extra_args)
    noise_sampler = default_brownian_noise(x, sigmas) if noise_sampler is None else noise_sampler
    old_denoised, h_last, sigmas_host = None, None, sigmas.tolist()
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigmas_host[i + 1] == 0:
            x = denoised
            continue
        h = torch.log(sigma / sigma_next)
        z = (1 + eta) * h
        x = (sigma_next / sigma) * torch.exp(-eta * h) * x - torch.expm1(-z) * denoised
        if old_denoised is not None:
            slope = (denoised - old_denoised) / (h_last / h)
            phi_2 = 1 + torch.expm1(-z) / z if solver_type == "heun" else -torch.expm1(-z) / 2
            x = x + phi_2 * slope
        if eta:
            x = x + _sde_noise(noise_sampler, sigmas_host[i], sigmas_host[i + 1], h, eta, s_noise)
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None):
    """DPM-Solver++(3M) SDE: sample_dpmpp_2m_sde's step with D quadratic in lambda through the last three
    denoised images; eta = 0 is the deterministic DPM-Solver++(3M), third order.

    With u the lambda offset from this step's start and D(u) = D + u D' + u^2/2 D'', the exact step adds
    h phi_2 D' + h^2 (-phi_3) D'' to the first-order one, phi_2 = 1 + expm1(-z) / z and
    phi_3 = phi_2 / z - 1/2 (both negated integrals of e^(-(1+eta)(h-u)) (u/h)^k / k!). The divided differences
    give d1 = h D'(0) and d2 = h^2 D''(0) / 2, so the D'' term is -2 phi_3 d2. k-diffusion (and DPM-Solver's
    reference code) add -phi_3 d2, half of it, which makes the solver second order; this one measures third.
    """
    model = _model(denoiser, x, extra_args)
    noise_sampler = default_brownian_noise(x, sigmas) if noise_sampler is None else noise_sampler
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None
    sigmas_host = sigmas.tolist()
    for i in _steps(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigmas_host[i + 1] == 0:
            x = denoised
            continue
        h = torch.log(sigma / sigma_next)
        z = (1 + eta) * h
        x = (sigma_next / sigma) * torch.exp(-eta * h) * x - torch.expm1(-z) * denoised
        phi_2 = 1 + torch.expm1(-z) / z
        if denoised_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / z - 0.5
            x = x + phi_2 * d1 - 2 * phi_3 * d2
        elif denoised_1 is not None:
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta:
            x = x + _sde_noise(noise_sampler, sigmas_host[i], sigmas_host[i + 1], h, eta, s_noise)
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
    return x


SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "ddim": sample_ddim,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": functools.partial(sample_dpmpp_2m_sde, solver_type="heun"),
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
}

# The samplers whose noise should be one Brownian path per image; the other stochastic ones draw independent
# noise per step.
SDE_SAMPLERS = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")


# Per-image noise ----------------------------------------------------------------------------------------

_STREAM, _TREE = 1, 2  # purposes in the derived seeds, apart from the initial noise (the seed itself)


def derive_seed(*keys):
    """A 64-bit key from integer keys in [0, 2^63), e.g. (seed, purpose): a hash (BLAKE2b) of the keys, so keys
    that differ in any way give unrelated keys and independent streams."""
    return int.from_bytes(hashlib.blake2b(struct.pack(f"<{len(keys)}q", *keys), digest_size=8).digest(), "little")


def _int64(value):
    """An integer modulo 2^64 as the int64 with the same bits: torch has no uint64 arithmetic, but int64 + and *
    wrap modulo 2^64 just as uint64 would, and ^ and & act on the bits alike. Constants >= 2^63 become negative."""
    value &= 2**64 - 1
    return value - 2**64 if value >= 2**63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)  # splitmix64's increment, 2^64 / golden ratio
_MIX_1, _MIX_2 = _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _xor_shift_right_(z, bits, scratch):
    """z ^= z >>> bits in place, >>> the logical shift: torch's >> copies the sign bit, so mask the copies off."""
    torch.bitwise_right_shift(z, bits, out=scratch).bitwise_and_((1 << (64 - bits)) - 1)
    return z.bitwise_xor_(scratch)


def mix64_(z):
    """splitmix64's output function (Steele, Lea & Flood 2014, with Stafford's "Mix13" constants), in place on an
    int64 tensor, elementwise: a bijection of 64-bit words in which every output bit depends on every input bit.
    splitmix64's n-th number from state s is mix64(s + n * golden). In place, because on CPU fresh tensors cost
    more than the arithmetic."""
    scratch = torch.empty_like(z)
    _xor_shift_right_(z, 30, scratch).mul_(_MIX_1)
    _xor_shift_right_(z, 27, scratch).mul_(_MIX_2)
    return _xor_shift_right_(z, 31, scratch)


def keyed_normal(keys, shape, offset=0, dtype=torch.float32):
    """Standard normals [len(keys), *shape] from a counter-based generator: element j of row r is a function of
    keys[r] (an int64 tensor of row keys) and of its counter offset + j alone.

    So a row is the same whatever rows are drawn with it, as a torch.Generator per row would make it, but the
    whole batch comes from one handful of elementwise kernels on the keys' device instead of one launch per row.
    The counter is hashed to splitmix64's stream, mix64((offset + j + 1) golden), and the row key is mixed in by
    one more mix64 of their xor. The top 53 bits of the result, made odd, give t = 2u - 1 for u the midpoint of
    one of 2^52 equal cells of (0, 1), and the normal is Phi^-1(u) = sqrt(2) erfinv(t), in float64 (|z| < 8.3;
    erfinv rather than ndtri, which is slower on CPU). The integer hash is exact on every device, so CPU and GPU
    draw the same noise up to erfinv's rounding, and every dtype the same noise up to its own. A draw of
    shape-sized blocks numbered d uses offset d * numel(shape): blocks of one row never overlap.

    On a GPU it runs compiled into one kernel (_fused_keyed_normal), the same numbers.
    """
    return (_fused_keyed_normal() if keys.is_cuda else _keyed_normal)(keys, shape, offset, dtype)


@functools.cache
def _fused_keyed_normal():
    """_keyed_normal compiled (dynamic shapes, so once per process and dtype): eager, its ~20 elementwise passes
    over the batch cost a GPU several milliseconds per draw at 64 x 3 x 128 x 128, fused it writes the batch once.
    Measured by benchmarks/bench_sampling.py."""
    return torch.compile(_keyed_normal, dynamic=True, fullgraph=True)


def _keyed_normal(keys, shape, offset, dtype):
    count = math.prod(shape)
    counters = torch.arange(offset + 1, offset + count + 1, device=keys.device, dtype=torch.int64)
    z = mix64_(keys.reshape(-1, 1) ^ mix64_(counters * _GOLDEN))
    z >>= 11  # the top 53 bits as a signed integer, made odd: in (-2^52, 2^52), exact in float64
    z |= 1
    t = z.to(torch.float64).mul_(2.0**-52)  # in (-1, 1), never +-1
    return t.erfinv_().mul_(math.sqrt(2)).to(dtype).reshape(len(keys), *shape)


def _row_keys(seeds, purpose, device):
    """keyed_normal's row keys for one purpose, derive_seed(seed, purpose) per image. They are copied to the
    device once, when a noise source is made: a copy at every draw would wait for the GPU. The draw number or
    tree node goes into the counter instead, a plain integer that needs no copy."""
    return torch.tensor([_int64(derive_seed(int(s), purpose)) for s in seeds], dtype=torch.int64, device=device)


class SeededNoise:
    """noise(sigma, sigma_next) -> independent N(0, I) draws: draw d of row i is block d of keyed_normal's
    stream for seeds[i], so a row's noise depends on its seed and on how many draws came before, never on the
    other rows. Drawn on `device`, the same on CPU and GPU up to float rounding."""

    def __init__(self, seeds, shape, device="cpu", dtype=torch.float32):
        self.shape, self.dtype = tuple(shape), dtype
        self.keys = _row_keys(seeds, _STREAM, device)
        self.draws = 0

    def __call__(self, sigma, sigma_next):
        noise = keyed_normal(self.keys, self.shape, self.draws * math.prod(self.shape), self.dtype)
        self.draws += 1
        return noise


class BrownianTreeNoise:
    """noise(sigma, sigma_next) -> (W(u_next) - W(u)) / sqrt(|u_next - u|): the normalised increment of a
    Brownian motion W per image, over u = log(sigma) rescaled from [log sigma_min, log sigma_max] to [0, 1].

    W is a Brownian tree (Levy's construction by bisection, as in torchsde's BrownianTree): W(0) = 0,
    W(1) ~ N(0, I), and each dyadic midpoint, given the ends of its interval, is the Brownian bridge
    (W_lo + W_hi) / 2 + sqrt(len / 4) z, with z block `node` of keyed_normal's stream for the seed (the node
    numbered by its grid point), so W at any point is fixed by the seed alone, in whatever order or batch it is
    asked for. Query points are rounded to the 2^depth grid; the increment is normalised by the rounded length,
    so every draw is exactly N(0, I), draws over disjoint steps are independent, and overlapping ones (dpmpp_sde's)
    are correlated as the path makes them. A schedule with more steps samples the same path more finely, so SDE
    samples converge as the steps grow.

    A new point costs one keyed_normal draw of the batch per node of its bisection path, at most depth + 1; W at
    the nodes of the last path is kept (W at a node never changes), so a point near the last one, the next
    step's, draws only the nodes below where their paths part. The last four points are kept too. Drawn on
    `device`, like SeededNoise.
    """

    def __init__(self, seeds, shape, sigma_min, sigma_max, device="cpu", dtype=torch.float32, depth=16):
        if not 0 < sigma_min <= sigma_max:
            raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min} and {sigma_max}")
        self.shape, self.dtype, self.cells = tuple(shape), dtype, 2**depth
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.log_min = math.log(self.sigma_min)
        self.log_span = math.log(self.sigma_max) - self.log_min or 1.0  # one noise level: any span will do
        self.keys = _row_keys(seeds, _TREE, device)
        self.path = {0: torch.zeros(len(self.keys), *self.shape, device=device, dtype=dtype)}  # node -> W there
        self.points = {}  # the last few points asked for -> W there (consecutive steps share an end)

    def _grid(self, sigma):
        sigma = min(max(float(sigma), self.sigma_min), self.sigma_max)
        return round((math.log(sigma) - self.log_min) / self.log_span * self.cells)

    def _normal(self, node):
        """A batch of N(0, I), row i keyed by (seeds[i], node)."""
        return keyed_normal(self.keys, self.shape, node * math.prod(self.shape), self.dtype)

    def _w(self, k):
        """W at grid point k, by bisection from [0, cells] down to the interval that has k at an end. W at a grid
        point never changes, so W at the last path's nodes and the last points is reused, as an end or a node."""
        known = self.path | self.points
        if k in known:
            return known[k]
        lo, hi = 0, self.cells
        path = {lo: known[lo], hi: known[hi] if hi in known else self._normal(hi)}
        while k not in (lo, hi):
            mid = (lo + hi) // 2
            if mid in known:
                path[mid] = known[mid]
            else:
                bridge_std = ((hi - lo) / self.cells / 4) ** 0.5
                path[mid] = (path[lo] + path[hi]) / 2 + bridge_std * self._normal(mid)
            lo, hi = (lo, mid) if k < mid else (mid, hi)
        self.path = path
        self.points = dict(list(self.points.items())[-3:]) | {k: path[k]}
        return path[k]

    def __call__(self, sigma, sigma_next):
        lo, hi = sorted((self._grid(sigma), self._grid(sigma_next)))
        if lo == hi:
            raise ValueError(f"the step from sigma {float(sigma):.6g} to {float(sigma_next):.6g} is finer than the "
                             f"Brownian tree's resolution (1/{self.cells} of the log-sigma range)")
        return (self._w(hi) - self._w(lo)) / ((hi - lo) / self.cells) ** 0.5


def brownian_noise(seeds, shape, sigmas, device="cpu", dtype=torch.float32):
    """A BrownianTreeNoise over the range of the schedule's nonzero sigmas (read from the host copy: a masked
    min on the GPU would wait for it several times)."""
    positive = [sigma for sigma in torch.as_tensor(sigmas).tolist() if sigma > 0]
    return BrownianTreeNoise(seeds, shape, min(positive), max(positive), device=device, dtype=dtype)


def make_noise_sampler(name, seeds, shape, sigmas, device="cpu", dtype=torch.float32):
    """The per-image noise for sampler `name` and one seed per image: a Brownian tree over the schedule for the
    SDE samplers, whose accuracy depends on one consistent path (dpmpp_sde's two overlapping draws per step),
    independent per-seed draws for the others (ancestral steps, churn), which are cheaper."""
    if name in SDE_SAMPLERS:
        return brownian_noise(seeds, shape, sigmas, device=device, dtype=dtype)
    return SeededNoise(seeds, shape, device=device, dtype=dtype)
