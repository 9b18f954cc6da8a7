"""Samplers, noise sources and sigma schedules, on denoisers whose optimum is known in closed form."""

import inspect
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hdiffusion.guidance import cfg_denoiser
from hdiffusion.noise import SCHEDULES, get_sigmas_exponential, get_sigmas_karras, get_sigmas_polyexponential
from hdiffusion.sampling import (
    SAMPLERS,
    SDE_SAMPLERS,
    BrownianTreeNoise,
    SeededNoise,
    dpm_fast_orders,
    keyed_normal,
    lms_coefficients,
    make_noise_sampler,
    mix64_,
)

# Data N(MU, S^2) per dimension, for which the exact denoiser and the exact ODE solution are known.
MU, S = 0.7, 0.5
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
F64 = torch.float64


def gaussian_denoiser(x, sigma):
    """E[x0 | x] for x0 ~ N(MU, S^2), x = x0 + sigma * noise."""
    sigma = sigma.reshape(-1, *[1] * (x.ndim - 1))
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_ode_solution(x_T, sigma):
    """The probability-flow ODE dx/dsigma = (x - D) / sigma = (x - MU) sigma / (S^2 + sigma^2), solved from
    (SIGMA_MAX, x_T): x - MU grows as sqrt(S^2 + sigma^2)."""
    return MU + (x_T - MU) * math.sqrt(S**2 + sigma**2) / math.sqrt(S**2 + SIGMA_MAX**2)


def initial_noise(n, seed, *shape):
    return SIGMA_MAX * torch.randn(n, *(shape or (1,)), generator=torch.Generator().manual_seed(seed), dtype=F64)


def karras(steps, dtype=F64):
    return get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX, dtype=dtype)


STOCHASTIC = [name for name in SAMPLERS if "noise_sampler" in inspect.signature(SAMPLERS[name]).parameters]


# Convergence --------------------------------------------------------------------------------------------

# name: (expected order, options that make it an ODE solver, step counts, tolerance on the observed order).
ORDERS = {
    "euler": (1, {}, (32, 64, 128), 0.25),
    "ddim": (1, {}, (32, 64, 128), 0.25),
    "euler_ancestral": (1, {"eta": 0}, (32, 64, 128), 0.25),
    "heun": (2, {}, (32, 64, 128), 0.25),
    "dpm_2": (2, {}, (32, 64, 128), 0.25),
    "dpm_2_ancestral": (2, {"eta": 0}, (32, 64, 128), 0.25),
    "dpmpp_2m": (2, {}, (32, 64, 128), 0.25),
    "dpmpp_2s_ancestral": (2, {"eta": 0}, (32, 64, 128), 0.25),
    "dpmpp_sde": (2, {"eta": 0}, (32, 64, 128), 0.25),
    "dpmpp_2m_sde": (2, {"eta": 0}, (32, 64, 128), 0.25),
    "dpmpp_2m_sde_heun": (2, {"eta": 0}, (32, 64, 128), 0.25),
    "dpmpp_3m_sde": (3, {"eta": 0}, (32, 64, 128), 0.25),
    "dpm_fast": (3, {}, (32, 64, 128), 0.45),  # steps = model evaluations; orders [3, ..., 3] + [2, 1] / [1] / [2]
    "lms": (4, {}, (256, 512, 1024), 0.2),  # order 4 shows late on the Karras schedule's uneven steps
}


def final_sample_error(name, steps, **options):
    x_T = initial_noise(16, 1)
    x = SAMPLERS[name](gaussian_denoiser, x_T, karras(steps), disable=True, **options)
    # Every sampler here ends with x = D(x; SIGMA_MIN), the exact ODE step to 0 up to O(SIGMA_MIN^2) that does
    # not change with the step count; compare against that same step taken from the exact solution at
    # SIGMA_MIN, so that the error is the integration error alone.
    exact_at_sigma_min = exact_ode_solution(x_T, SIGMA_MIN)
    reference = gaussian_denoiser(exact_at_sigma_min, torch.full([16], SIGMA_MIN, dtype=F64))
    assert (reference - exact_ode_solution(x_T, 0.0)).abs().max() < 1e-4
    return (x - reference).abs().max().item()


def test_every_sampler_has_a_convergence_order_test():
    assert set(ORDERS) | {"dpm_adaptive"} == set(SAMPLERS)


@pytest.mark.parametrize("name", ORDERS)
def test_convergence_order(name):
    # Doubling the steps of the Karras schedule divides the error by about 2^order.
    order, options, steps, tolerance = ORDERS[name]
    errors = [final_sample_error(name, n, **options) for n in steps]
    observed = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    for value in observed:
        assert abs(value - order) < tolerance, (name, errors, observed)


@pytest.mark.parametrize("name, steps", [("euler", 1000), ("ddim", 1000), ("heun", 100), ("dpm_2", 100),
                                         ("lms", 100), ("dpmpp_2m", 100), ("dpm_fast", 100), ("dpm_adaptive", 2)])
def test_ode_samples_have_the_data_mean_and_std(name, steps):
    n = 20_000
    x = SAMPLERS[name](gaussian_denoiser, initial_noise(n, 0), karras(steps), disable=True)
    assert torch.isfinite(x).all()
    # Within 5 standard errors of the sample mean and of the sample standard deviation.
    assert abs(x.mean().item() - MU) < 5 * S / math.sqrt(n)
    assert abs(x.std().item() - S) < 5 * S / math.sqrt(2 * n)


def test_dpmpp_3m_is_third_order_where_k_diffusions_coefficient_is_second():
    # k-diffusion's 3M adds -phi_3 d2 for the second difference; the Taylor term is -2 phi_3 d2 (see the
    # docstring). Rebuilding the step with k-diffusion's coefficient, the order drops to about 2.
    def k_diffusion_3m(denoiser, x, sigmas):
        history = []
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoiser(x, sigma * x.new_ones([x.shape[0]]))
            if sigma_next == 0:
                return denoised
            h = torch.log(sigma / sigma_next)
            x = torch.exp(-h) * x - torch.expm1(-h) * denoised
            phi_2 = torch.expm1(-h) / h + 1
            if len(history) == 2:
                (d_1, h_1), (d_2, h_2) = history
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h - 0.5) * (d1_0 - d1_1) / (r0 + r1)
            elif history:
                x = x + phi_2 * (denoised - history[0][0]) / (history[0][1] / h)
            history = [(denoised, h)] + history[:1]
        return x

    x_T = initial_noise(16, 1)
    reference = gaussian_denoiser(exact_ode_solution(x_T, SIGMA_MIN), torch.full([16], SIGMA_MIN, dtype=F64))
    errors = [(k_diffusion_3m(gaussian_denoiser, x_T, karras(n)) - reference).abs().max().item() for n in (128, 256)]
    assert abs(math.log2(errors[0] / errors[1]) - 2) < 0.25
    assert final_sample_error("dpmpp_3m_sde", 256, eta=0) < errors[1] / 4


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_meets_its_tolerance(order):
    x_T = initial_noise(64, 1)
    reference = gaussian_denoiser(exact_ode_solution(x_T, SIGMA_MIN), torch.full([64], SIGMA_MIN, dtype=F64))
    evaluations = []
    for tolerance in (1e-2, 1e-3, 1e-4):
        count = [0]

        def counting_denoiser(x, sigma):
            count[0] += 1
            return gaussian_denoiser(x, sigma)

        x = SAMPLERS["dpm_adaptive"](counting_denoiser, x_T, karras(10), disable=True, order=order, rtol=tolerance,
                                     atol=tolerance)
        assert (x - reference).abs().max().item() < 5 * tolerance
        evaluations.append(count[0])
    assert evaluations == sorted(evaluations) and evaluations[0] < evaluations[-1]


def test_dpm_adaptive_steps_each_image_on_its_own():
    x_T = initial_noise(6, 2)
    together = SAMPLERS["dpm_adaptive"](gaussian_denoiser, x_T, karras(10), disable=True)
    alone = torch.cat([SAMPLERS["dpm_adaptive"](gaussian_denoiser, x_T[i:i + 1], karras(10), disable=True)
                       for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=0, atol=0)


def test_dpm_fast_orders_spend_the_budget():
    for nfe in range(1, 20):
        orders = dpm_fast_orders(nfe)
        assert sum(orders) == nfe and set(orders) <= {1, 2, 3}
    assert dpm_fast_orders(9) == [3, 3, 2, 1] and dpm_fast_orders(10) == [3, 3, 3, 1]
    assert dpm_fast_orders(11) == [3, 3, 3, 2] and dpm_fast_orders(0) == []


# DDIM ---------------------------------------------------------------------------------------------------

def test_ddim_is_ddim_euler_and_dpm_solver_1():
    x_T = initial_noise(8, 3)
    sigmas = get_sigmas_exponential(12, SIGMA_MIN, SIGMA_MAX, dtype=F64)
    x = SAMPLERS["ddim"](gaussian_denoiser, x_T, sigmas, disable=True)
    torch.testing.assert_close(x, SAMPLERS["euler"](gaussian_denoiser, x_T, sigmas, disable=True),
                               rtol=1e-12, atol=1e-12)
    # Song et al. 2021's DDIM (eq. 12, eta = 0) on the VP process x_vp = x sqrt(abar), abar = 1 / (1 + sigma^2),
    # with eps and x0 predicted from the same denoiser; and DPM-Solver-1 x - sigma_next (e^h - 1) eps.
    x_vp, x_dpm = x_T / math.sqrt(1 + SIGMA_MAX**2), x_T
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        abar, abar_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        x_edm = x_vp / math.sqrt(abar)
        x0 = gaussian_denoiser(x_edm, torch.full([8], sigma, dtype=F64))
        eps = (x_vp - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        x_vp = math.sqrt(abar_next) * x0 + math.sqrt(1 - abar_next) * eps
        if sigma_next > 0:
            eps_dpm = (x_dpm - gaussian_denoiser(x_dpm, torch.full([8], sigma, dtype=F64))) / sigma
            x_dpm = x_dpm - sigma_next * math.expm1(math.log(sigma / sigma_next)) * eps_dpm
    torch.testing.assert_close(x, x_vp, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x, gaussian_denoiser(x_dpm, torch.full([8], sigmas[-2].item(), dtype=F64)),
                               rtol=1e-9, atol=1e-9)


# Every sampler: steps, callbacks, arguments, dtypes -----------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_step_count_ends_exactly_at_sigma_0(name, steps):
    calls = []
    sigmas = karras(steps)
    x = SAMPLERS[name](gaussian_denoiser, initial_noise(4, 4), sigmas, callback=calls.append, disable=True)
    assert torch.isfinite(x).all()
    # The last evaluation is at the last nonzero sigma, and the sampler returns its denoised image exactly.
    assert torch.all(torch.as_tensor(calls[-1]["sigma"]) == sigmas[-2])
    torch.testing.assert_close(x, calls[-1]["denoised"], rtol=0, atol=0)
    assert [c["i"] for c in calls] == list(range(len(calls)))
    assert all(set(c) == {"x", "i", "sigma", "denoised"} for c in calls)
    if name not in ("dpm_fast", "dpm_adaptive"):  # these two place their own steps
        assert [c["sigma"].item() for c in calls] == sigmas[:-1].tolist()


def test_one_step_returns_the_denoised_image():
    x_T = initial_noise(8, 2)
    sigmas = torch.tensor([SIGMA_MAX, 0.0], dtype=F64)
    for name, sampler in SAMPLERS.items():
        x = sampler(gaussian_denoiser, x_T, sigmas, disable=True)
        torch.testing.assert_close(x, gaussian_denoiser(x_T, torch.full([8], SIGMA_MAX, dtype=F64)), msg=name)


def test_extra_args_reach_the_denoiser():
    seen = []

    def denoiser(x, sigma, class_cond=None):
        seen.append(class_cond)
        return gaussian_denoiser(x, sigma)

    for sampler in SAMPLERS.values():
        seen.clear()
        sampler(denoiser, initial_noise(2, 4), karras(3), extra_args={"class_cond": "cat"}, disable=True)
        assert seen and all(c == "cat" for c in seen)


def test_samplers_work_on_image_batches_in_float32():
    x_T = SIGMA_MAX * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    for name, sampler in SAMPLERS.items():
        x = sampler(gaussian_denoiser, x_T, karras(10, torch.float32), disable=True)
        assert x.shape == x_T.shape and x.dtype == torch.float32 and torch.isfinite(x).all(), name


def test_eta_0_and_no_churn_are_the_deterministic_samplers():
    x_T, sigmas = initial_noise(8, 6), karras(10)

    def run(name, **options):
        return SAMPLERS[name](gaussian_denoiser, x_T, sigmas, disable=True, **options)

    pairs = [(run("euler_ancestral", eta=0), run("euler")), (run("dpm_2_ancestral", eta=0), run("dpm_2")),
             (run("dpmpp_2m_sde", eta=0), run("dpmpp_2m")), (run("dpmpp_sde", eta=0), run("dpmpp_2s_ancestral", eta=0)),
             (run("euler", s_churn=0.0), run("ddim"))]
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 noise levels"):
        SAMPLERS["euler"](gaussian_denoiser, initial_noise(2, 0), torch.tensor([1.0]), disable=True)
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        SAMPLERS["dpm_adaptive"](gaussian_denoiser, initial_noise(2, 0), karras(3), disable=True, order=4)
    with pytest.raises(ValueError, match="solver_type"):
        SAMPLERS["dpmpp_2m_sde"](gaussian_denoiser, initial_noise(2, 0), karras(3), disable=True, solver_type="rk4")


# Stochastic samplers: the target distribution -----------------------------------------------------------

# A correlated 2-D Gaussian: D(x; sigma) = mean + cov (cov + sigma^2 I)^-1 (x - mean).
MEAN = torch.tensor([0.7, -0.3], dtype=F64)
COV = torch.tensor([[0.25, 0.1], [0.1, 0.09]], dtype=F64)
EIGENVALUES, EIGENVECTORS = torch.linalg.eigh(COV)


def gaussian_2d_denoiser(x, sigma):
    shrink = EIGENVALUES / (EIGENVALUES + sigma[:, None] ** 2)
    return MEAN + (shrink * ((x - MEAN) @ EIGENVECTORS)) @ EIGENVECTORS.T


class PathNoise:
    """One Brownian motion in log(sigma) per row, sampled exactly at a known set of points, all rows at once:
    the statistics tests' fast stand-in for the per-seed Brownian tree."""

    def __init__(self, sigmas, shape, generator):
        self.u = sorted({self._u(s) for s in sigmas})
        steps = torch.tensor([1.0] + [b - a for a, b in zip(self.u, self.u[1:])], dtype=F64)
        draws = torch.randn(len(self.u), *shape, generator=generator, dtype=F64)
        self.w = (draws * steps.sqrt().reshape(-1, *[1] * len(shape))).cumsum(0)

    @staticmethod
    def _u(sigma):
        return round(math.log(float(sigma)), 9) if sigma > 0 else -100.0  # churn draws over (sigma_min, 0) too

    def __call__(self, sigma, sigma_next):
        a, b = (self.u.index(self._u(s)) for s in (sigma, sigma_next))
        return (self.w[a] - self.w[b]) / math.sqrt(abs(self.u[a] - self.u[b]))


# name: (options, steps); first-order samplers need more steps for a bias below the sampling error.
STOCHASTIC_CASES = {
    "euler (churn)": ("euler", {"s_churn": 20.0}, 1000),
    "heun (churn)": ("heun", {"s_churn": 20.0}, 200),
    "dpm_2 (churn)": ("dpm_2", {"s_churn": 20.0}, 200),
    "euler_ancestral": ("euler_ancestral", {}, 1000),
    "dpm_2_ancestral": ("dpm_2_ancestral", {}, 200),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {}, 200),
    "dpmpp_sde": ("dpmpp_sde", {}, 200),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, 200),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde_heun", {}, 200),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {}, 100),
}


def sample_2d(name, options, steps, noise="path", n=20_000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x_T = SIGMA_MAX * torch.randn(n, 2, generator=generator, dtype=F64)
    sigmas = karras(steps)
    midpoints = (sigmas[:-2] * sigmas[1:-1]).sqrt()  # dpmpp_sde's sigma_mid (r = 1/2)
    if noise == "path":
        noise_sampler = PathNoise(sigmas.tolist() + midpoints.tolist(), x_T.shape, generator)
    else:
        noise_sampler = lambda sigma, sigma_next: torch.randn(x_T.shape, generator=generator, dtype=F64)  # noqa: E731
    return SAMPLERS[name](gaussian_2d_denoiser, x_T, sigmas, disable=True, noise_sampler=noise_sampler, **options)


def standard_errors(x):
    """Largest |estimate - truth| / standard error over the mean and the covariance entries."""
    n = x.shape[0]
    mean_z = (x.mean(0) - MEAN) / (COV.diagonal() / n).sqrt()
    variances = COV.diagonal()
    cov_z = (torch.cov(x.T) - COV) / ((variances[:, None] * variances[None, :] + COV**2) / n).sqrt()
    return mean_z.abs().max().item(), cov_z.abs().max().item()


def test_every_stochastic_sampler_has_a_distribution_test():
    assert {case[0] for case in STOCHASTIC_CASES.values()} == set(STOCHASTIC)


@pytest.mark.parametrize("case", STOCHASTIC_CASES)
def test_stochastic_samples_have_the_target_mean_and_covariance(case):
    name, options, steps = STOCHASTIC_CASES[case]
    x = sample_2d(name, options, steps)
    assert torch.isfinite(x).all()
    mean_z, cov_z = standard_errors(x)
    assert mean_z < 5 and cov_z < 5, (mean_z, cov_z)


def test_dpmpp_sde_needs_one_brownian_path():
    # Its two draws per step overlap; drawn independently, the covariance comes out biased at the same steps.
    _, path_z = standard_errors(sample_2d("dpmpp_sde", {}, 100))
    _, independent_z = standard_errors(sample_2d("dpmpp_sde", {}, 100, noise="independent"))
    assert path_z < 5 < independent_z and 2 * path_z < independent_z


def test_two_points_are_hit_in_proportion():
    # Data on two points, -1 with probability 0.3 and +1 with 0.7: D is the posterior mean, a logistic in x.
    def denoiser(x, sigma):
        sigma = sigma.reshape(-1, *[1] * (x.ndim - 1))
        return torch.tanh(x / sigma**2 + 0.5 * math.log(0.7 / 0.3))

    n = 20_000
    for name, options in [("dpmpp_2m", {}), ("heun", {}), ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {}),
                          ("euler_ancestral", {})]:
        generator = torch.Generator().manual_seed(1)
        x_T = SIGMA_MAX * torch.randn(n, 1, generator=generator, dtype=F64)
        noise = {"noise_sampler": (lambda s, t: torch.randn(x_T.shape, generator=generator, dtype=F64))
                 } if name in STOCHASTIC else {}
        x = SAMPLERS[name](denoiser, x_T, karras(100), disable=True, **options, **noise)
        assert (x.abs() - 1).abs().max() < 1e-3, name
        assert abs((x > 0).double().mean().item() - 0.7) < 5 * math.sqrt(0.21 / n), name


# Per-seed noise -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SAMPLERS)
def test_image_depends_on_its_seed_alone(name):
    seeds = [11, 3, 7, 0, 5]
    sigmas, shape = karras(6), (2, 3)

    def sample(seed_list):
        x_T = torch.stack([initial_noise(1, s, *shape)[0] for s in seed_list])
        options = {}
        if name in STOCHASTIC:
            options["noise_sampler"] = make_noise_sampler(name, seed_list, shape, sigmas, dtype=F64)
        return SAMPLERS[name](gaussian_denoiser, x_T, sigmas, disable=True, **options)

    together = sample(seeds)
    for split in ([[11, 3], [7, 0, 5]], [[5], [0, 7, 3, 11]]):
        parts = {s: row for part in split for s, row in zip(part, sample(part))}
        torch.testing.assert_close(torch.stack([parts[s] for s in seeds]), together, rtol=0, atol=0)


def test_stochastic_samplers_use_the_seed():
    sigmas, shape = karras(6), (3,)
    x_T = initial_noise(1, 0, *shape).expand(2, *shape)  # same start, two seeds
    for name in STOCHASTIC:
        options = {"s_churn": 5.0} if name in ("euler", "heun", "dpm_2") else {}
        noise_sampler = make_noise_sampler(name, [0, 1], shape, sigmas, dtype=F64)
        x = SAMPLERS[name](gaussian_denoiser, x_T, sigmas, disable=True, noise_sampler=noise_sampler, **options)
        assert (x[0] - x[1]).abs().max() > 1e-3, name


def test_noise_sources_per_sampler():
    sigmas = karras(5)
    for name in STOCHASTIC:
        noise = make_noise_sampler(name, [0], (1,), sigmas)
        assert isinstance(noise, BrownianTreeNoise if name in SDE_SAMPLERS else SeededNoise)


def test_seeded_noise_rows_follow_their_seeds():
    a, b = SeededNoise([4, 9], (3,), dtype=F64), SeededNoise([9], (3,), dtype=F64)
    for _ in range(3):
        torch.testing.assert_close(a(1.0, 0.5)[1], b(1.0, 0.5)[0], rtol=0, atol=0)
    initial = torch.randn(3, generator=torch.Generator().manual_seed(9), dtype=F64)
    assert not torch.allclose(SeededNoise([9], (3,), dtype=F64)(1.0, 0.5)[0], initial)


def test_brownian_tree_is_one_fixed_path():
    # log-sigma range [0, 1]: the points e^0.25, e^0.5, e^0.75 lie exactly on the tree's grid.
    tree = BrownianTreeNoise([5, 6, 7], (2,), 1.0, math.e, dtype=F64)
    s1, s2, s3 = math.exp(0.75), math.exp(0.5), math.exp(0.25)
    a, b, whole = tree(s1, s2), tree(s2, s3), tree(s1, s3)
    torch.testing.assert_close(whole * math.sqrt(0.5), (a + b) * math.sqrt(0.25), rtol=0, atol=1e-12)
    # Asked in another order, in another batch, the path is the same.
    other = BrownianTreeNoise([7, 5], (2,), 1.0, math.e, dtype=F64)
    torch.testing.assert_close(other(s1, s3), whole[[2, 0]], rtol=0, atol=1e-12)
    torch.testing.assert_close(other(s2, s1), a[[2, 0]], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="finer than the Brownian tree's resolution"):
        tree(1.5, 1.5 * (1 + 1e-7))


def test_brownian_tree_increments_are_brownian():
    n = 3000
    tree = BrownianTreeNoise(range(n), (), SIGMA_MIN, SIGMA_MAX, dtype=F64)
    first, second, both = tree(SIGMA_MAX, 10.0), tree(10.0, 1.0), tree(SIGMA_MAX, 1.0)
    tolerance = 5 / math.sqrt(n)
    for draw in (first, second, both):
        assert abs(draw.mean()) < tolerance and abs(draw.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1]) < tolerance  # disjoint: independent
    # Overlapping: corr(W(a, b), W(a, c)) = sqrt(|a - b| / |a - c|) in log sigma.
    expected = math.sqrt(math.log(SIGMA_MAX / 10.0) / math.log(SIGMA_MAX))
    assert abs(torch.corrcoef(torch.stack([first, both]))[0, 1] - expected) < tolerance


def test_sde_samples_converge_as_steps_grow_on_one_path():
    # The same seeds through the Brownian tree at 2N steps land near the N-step samples; fresh noise per step
    # (the ancestral samplers' source) gives unrelated samples.
    x_T = initial_noise(8, 7)

    def sample(steps, source):
        sigmas = karras(steps)
        noise = source(list(range(8)), (1,), sigmas, dtype=F64)
        return SAMPLERS["dpmpp_2m_sde"](gaussian_denoiser, x_T, sigmas, disable=True, noise_sampler=noise)

    def brownian(*args, **kwargs):
        return make_noise_sampler("dpmpp_2m_sde", *args, **kwargs)

    def fresh(seeds, shape, sigmas, dtype):
        return SeededNoise(seeds, shape, dtype=dtype)

    tree_gaps = [(sample(n, brownian) - sample(2 * n, brownian)).abs().mean().item() for n in (25, 50, 100)]
    fresh_gap = (sample(100, fresh) - sample(200, fresh)).abs().mean().item()
    assert tree_gaps[0] > tree_gaps[1] > tree_gaps[2] and tree_gaps[2] < fresh_gap / 4


def test_brownian_tree_reuses_its_path_without_changing_it():
    # W at a node is fixed by the seeds, so a tree that keeps its last path gives what fresh trees give, asked
    # down the schedule, back up, and between (dpmpp_sde's midpoints).
    points = karras(12)[:-1].tolist()
    points += [points[3], math.sqrt(points[3] * points[4]), points[0], points[-1]]
    tree = BrownianTreeNoise([3, 1], (2,), SIGMA_MIN, SIGMA_MAX, dtype=F64)
    for a, b in zip(points[:-1], points[1:]):
        fresh = BrownianTreeNoise([3, 1], (2,), SIGMA_MIN, SIGMA_MAX, dtype=F64)
        torch.testing.assert_close(tree(a, b), fresh(a, b), rtol=0, atol=0)


# The counter-based generator behind the per-seed noise ------------------------------------------------

def splitmix64_output(state):
    """splitmix64's output function on Python integers (Steele, Lea & Flood 2014): the reference for mix64_."""
    z = state % 2**64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
    return z ^ (z >> 31)


def as_int64(value):
    return value - 2**64 if value >= 2**63 else value


def test_mix64_is_splitmix64_in_int64():
    states = [0, 1, 2**62 + 12345, 2**63 - 1, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15, 0xDEADBEEF << 30]
    mixed = mix64_(torch.tensor([as_int64(s) for s in states]))
    assert mixed.tolist() == [as_int64(splitmix64_output(s)) for s in states]
    assert splitmix64_output(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF  # splitmix64's first number from seed 0


def test_keyed_normal_is_standard_normal_without_correlations():
    # Consecutive keys, the least random a hash can be given: 1000 rows of 1000.
    keys = torch.arange(1000)
    z = keyed_normal(keys, (1000,), dtype=F64)
    values, n = z.flatten(), z.numel()
    assert abs(values.mean()) < 5 / math.sqrt(n) and abs(values.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((values**4).mean() - 3) < 5 * math.sqrt(96 / n)  # var(z^4) = 105 - 9
    # Kolmogorov-Smirnov against the normal CDF: 1.95 / sqrt(n) is the 0.1% critical value.
    cdf = torch.special.ndtr(values.sort().values)
    steps = torch.arange(n + 1, dtype=F64) / n
    assert torch.maximum(steps[1:] - cdf, cdf - steps[:-1]).max() < 1.95 / math.sqrt(n)
    assert values.abs().max() < 8.3

    def corr(a, b):
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()

    limit = 5 / math.sqrt(n)
    for a, b in [(z[:, :-1], z[:, 1:]),  # neighbouring elements
                 (z[:-1], z[1:]),  # neighbouring keys
                 (z, keyed_normal(keys, (1000,), offset=1000, dtype=F64)),  # a key's next block of its stream
                 (z, keyed_normal(keys ^ 2**62, (1000,), dtype=F64))]:  # keys one high bit apart
        assert abs(corr(a, b)) < limit and abs(corr(a**2, b**2)) < limit


def test_keyed_normal_row_depends_on_its_key_alone():
    keys = torch.tensor([5, -3, 2**62, 7])
    batch = keyed_normal(keys, (2, 3))
    assert batch.shape == (4, 2, 3) and batch.dtype == torch.float32
    torch.testing.assert_close(keyed_normal(keys[[3, 0]], (2, 3)), batch[[3, 0]], rtol=0, atol=0)
    torch.testing.assert_close(keyed_normal(keys, (2, 3)), batch, rtol=0, atol=0)
    # Counter-based: a block at offset 6 is elements 6 to 11 of the key's one stream.
    stream = keyed_normal(keys, (24,))
    torch.testing.assert_close(keyed_normal(keys, (2, 3), offset=6).flatten(1), stream[:, 6:12], rtol=0, atol=0)
    # Every dtype draws the same numbers, rounded to it.
    torch.testing.assert_close(keyed_normal(keys, (2, 3), dtype=F64).float(), batch, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_per_seed_noise_is_the_same_on_cpu_and_gpu():
    keys = torch.arange(64) * 7919 - 2**40
    torch.testing.assert_close(keyed_normal(keys.cuda(), (3, 16, 16), offset=123, dtype=F64).cpu(),
                               keyed_normal(keys, (3, 16, 16), offset=123, dtype=F64), rtol=1e-12, atol=1e-12)
    sigmas = karras(8)
    for name in ("euler_ancestral", "dpmpp_sde"):
        cpu = make_noise_sampler(name, [4, 9], (3,), sigmas)
        gpu = make_noise_sampler(name, [4, 9], (3,), sigmas.cuda(), device="cuda")
        for sigma, sigma_next in zip(sigmas[:-2].tolist(), sigmas[1:-1].tolist()):
            torch.testing.assert_close(gpu(sigma, sigma_next).cpu(), cpu(sigma, sigma_next))


# Host reads: on a GPU, reading a tensor's value waits for every kernel queued before it -----------------

class HostReads(TorchDispatchMode):
    """Counts the reads of tensor values by the host (float(t), bool(t), t.item(), a boolean mask's size)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", [name for name in SAMPLERS if name != "dpm_adaptive"])  # it has to, every step
def test_samplers_read_the_schedule_once_not_at_every_step(name):
    # So that the host can queue the next steps while the GPU runs this one.
    def host_reads(steps):
        sigmas = karras(steps)
        options = {"s_churn": 5.0} if name in ("euler", "heun", "dpm_2") else {}
        if name in STOCHASTIC:
            options["noise_sampler"] = make_noise_sampler(name, [0, 1], (3,), sigmas, dtype=F64)
        with HostReads() as reads:
            SAMPLERS[name](gaussian_denoiser, initial_noise(2, 0, 3), sigmas, disable=True, **options)
        return reads.count

    assert host_reads(12) == host_reads(3)


def test_guidance_reads_no_values_without_an_interval():
    def denoiser(x, sigma, class_cond):
        return x / (1 + sigma[:, None] ** 2) + class_cond[:, None]

    x, sigma, labels = torch.ones(4, 2), torch.full([4], 3.0), torch.tensor([0, 1, 0, 1])
    for interval, expected_reads in [(None, 0), ((1.0, 5.0), 1)]:
        with HostReads() as reads:
            cfg_denoiser(denoiser, 2.0, null_class=2, interval=interval)(x, sigma, class_cond=labels)
        assert reads.count == expected_reads


# Coefficients and schedules -----------------------------------------------------------------------------

def test_lms_coefficients_integrate_polynomials_exactly():
    sigmas = karras(10).numpy()
    for order in (1, 2, 3, 4):
        i = 5
        coefficients = lms_coefficients(sigmas, i, order)
        for power in range(order):  # a derivative that is a polynomial of degree < order in sigma
            values = [sigmas[i - j] ** power for j in range(order)]
            exact = (sigmas[i + 1] ** (power + 1) - sigmas[i] ** (power + 1)) / (power + 1)
            assert sum(c * v for c, v in zip(coefficients, values)) == pytest.approx(exact, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("n", [1, 2, 10])
def test_schedules_run_from_sigma_max_to_sigma_min_then_0(name, n):
    sigmas = SCHEDULES[name](n, SIGMA_MIN, SIGMA_MAX, dtype=F64)
    assert len(sigmas) == n + 1 and sigmas[-1] == 0 and sigmas[0] == pytest.approx(SIGMA_MAX)
    if n > 1:
        assert sigmas[-2] == pytest.approx(SIGMA_MIN)
    assert torch.all(sigmas[:-1] > sigmas[1:])


def test_schedule_spacings():
    n = 10
    log_sigmas = get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX, dtype=F64)[:-1].log()
    steps = log_sigmas[:-1] - log_sigmas[1:]
    torch.testing.assert_close(steps, steps[:1].expand(n - 1))
    torch.testing.assert_close(get_sigmas_polyexponential(n, SIGMA_MIN, SIGMA_MAX, rho=1.0, dtype=F64),
                               get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX, dtype=F64))
    karras_steps = get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX, rho=7.0, dtype=F64)[:-1] ** (1 / 7)
    torch.testing.assert_close(karras_steps.diff(), karras_steps.diff()[:1].expand(n - 1))
    # vp: even in the VP SDE's time t, where log(1 + sigma^2) = beta_d t^2 / 2 + beta_min t.
    sigmas = SCHEDULES["vp"](n, SIGMA_MIN, SIGMA_MAX, dtype=F64)[:-1]
    t = ((0.1**2 + 2 * 19.9 * torch.log1p(sigmas**2)).sqrt() - 0.1) / 19.9
    torch.testing.assert_close(t.diff(), t.diff()[:1].expand(n - 1))
    with pytest.raises(ValueError, match="sigma_min <= sigma_max"):
        get_sigmas_karras(5, 1.0, 0.5)
