"""The flow process and its continuous-time strategies: closed forms, sampled densities, devices, errors.

Densities are checked with the Kolmogorov-Smirnov distance D = sup |F_n - F| against a CDF derived here
independently (numpy / scipy). Its critical value comes from the Dvoretzky-Kiefer-Wolfowitz inequality with
Massart's constant, P(D > eps) <= 2 exp(-2 n eps^2), so eps = sqrt(log(2 / alpha) / (2 n)) rejects a correct
sampler with probability at most alpha (1e-4; the seeds are fixed). Every such test also rejects a wrong CDF
with the same draws, so it can fail.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from lightning_speed import flow
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.timesteps import SpeeD, UniformSampling, asymmetric_probabilities
from lightning_speed.timesteps.continuous import (
    PROBABILITY_BINS,
    ContinuousSampler,
    FlowAsymmetricSampler,
    FlowChangeAwareWeights,
    FlowCosMapSampler,
    FlowLogitNormalSampler,
    FlowLossAwareSampler,
    FlowMinSNRWeights,
    FlowModeSampler,
    FlowP2Weights,
    FlowUniformSampler,
    dual_pairs,
)

ALPHA = 1e-4
N_DRAWS = 200_000


def ks_distance(samples: np.ndarray, cdf) -> float:
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = x.size
    with np.errstate(divide="ignore"):
        f = np.asarray(cdf(x), dtype=np.float64)
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - f), np.max(f - (i - 1) / n)))


def ks_critical(n: int, alpha: float = ALPHA) -> float:
    return math.sqrt(math.log(2 / alpha) / (2 * n))


def draws(sampler, n: int = N_DRAWS, seed: int = 0) -> np.ndarray:
    sampler.manual_seed(seed)
    t = sampler.sample(n)
    assert t.dtype == torch.float32 and t.shape == (n,) and t.device == sampler.device
    return t.double().numpy()


@pytest.fixture(scope="module")
def linear() -> NoiseSchedule:
    return NoiseSchedule.from_name("linear", 1000)


# ------------------------------------------------------------------ reference CDFs (derived here)
def unshift(x, s):
    return x / (s - (s - 1) * x)


def uniform_cdf(s=1.0):
    return lambda x: unshift(x, s)


def logit_normal_cdf(m=0.0, std=1.0, s=1.0):
    # a shift s adds log(s) to logit(t)
    return lambda x: stats.norm.cdf((special.logit(x) - m - math.log(s)) / std)


def mode_cdf(scale, s=1.0):
    u = np.linspace(0.0, 1.0, 1_000_001)
    f = 1 - u - scale * (np.cos(np.pi * u / 2) ** 2 - 1 + u)  # decreasing from 1 to 0
    return lambda x: 1 - np.interp(unshift(x, s), f[::-1], u[::-1])


def cosmap_cdf(s=1.0):
    return lambda x: 2 / np.pi * np.arctan2(unshift(x, s), 1 - unshift(x, s))


def asymmetric_cdf(base_cdf, tau, k):
    a = float(base_cdf(np.array(tau)))
    z = k * a + 1 - a
    return lambda x: np.where(x < tau, k * base_cdf(x), k * a + base_cdf(x) - a) / z


# ------------------------------------------------------------------ the process
def test_q_sample_is_the_straight_path_and_the_target_its_velocity():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x_t = flow.q_sample(x0, t, noise)
    torch.testing.assert_close(x_t[0], x0[0], rtol=0, atol=0)
    torch.testing.assert_close(x_t[2], noise[2], rtol=0, atol=0)
    torch.testing.assert_close(x_t[1], 0.7 * x0[1] + 0.3 * noise[1])
    # the path is linear in t, so a finite difference is its derivative exactly (up to rounding)
    h = 1e-3
    dx = (flow.q_sample(x0, t.clamp(max=1 - h) + h, noise) - flow.q_sample(x0, t.clamp(max=1 - h), noise)) / h
    torch.testing.assert_close(dx, flow.velocity(x0, noise).expand_as(dx), rtol=1e-9, atol=1e-9)
    x0_hat, eps_hat = flow.split_prediction(flow.velocity(x0, noise), x_t, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)
    assert flow.RectifiedFlow().target(x0, noise, t).equal(noise - x0)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_q_sample_moments_given_x0(t):
    n = 400_000
    x0 = torch.full((n, 1), 0.8, dtype=torch.float64)
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_t = flow.q_sample(x0, torch.full((n,), t, dtype=torch.float64), noise).flatten()
    # 5 standard errors: the mean's is t / sqrt(n), the variance's t^2 sqrt(2 / (n - 1))
    assert abs(float(x_t.mean()) - (1 - t) * 0.8) < 5 * t / math.sqrt(n)
    assert abs(float(x_t.var()) - t**2) < 5 * t**2 * math.sqrt(2 / (n - 1))


def test_snr_log_snr_and_matching_times(linear):
    t = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    expected = ((1 - t) / t) ** 2
    torch.testing.assert_close(flow.snr(t), expected)
    torch.testing.assert_close(flow.log_snr(t[1:4]), expected[1:4].log())
    assert flow.log_snr(t)[0] == math.inf and flow.log_snr(t)[-1] == -math.inf
    torch.testing.assert_close(flow.time_from_snr(flow.snr(t)), t)
    # step 700 of linear T = 1000: the flow time with the same SNR
    matched = flow.time_from_snr(linear.snr[700])
    assert float(matched) == pytest.approx(0.92322, abs=1e-5)
    assert float(flow.snr(matched)) == pytest.approx(float(linear.snr[700]), rel=1e-12)


def test_loss_is_the_per_sample_velocity_mse():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0.05, 0.4, 0.7, 1.0])

    def ideal(x, t):  # the exact velocity field of data at the single point x0: straight paths into x0
        return (x - x0) / t.view(-1, 1, 1, 1)

    assert flow.loss(ideal, x0, t, noise).abs().max() < 1e-5
    per_sample = flow.RectifiedFlow().training_losses(lambda x, t: torch.zeros_like(x), x0, t, noise)
    assert per_sample.vlb is None and per_sample.mse.dtype == torch.float32
    torch.testing.assert_close(per_sample.mse, (noise - x0).pow(2).flatten(1).mean(1))


def test_shift_map_its_inverse_and_its_log_snr():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.25, 1.0, 3.0):
        shifted = flow.shift_time(t, s)
        assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:] > shifted[:-1]).all()
        torch.testing.assert_close(flow.unshift_time(shifted, s), t)
        # logit(t') = logit(t) + log(s): the log-SNR falls by 2 log(s) at every t
        torch.testing.assert_close(flow.log_snr(shifted[1:-1]), flow.log_snr(t[1:-1]) - 2 * math.log(s))
    assert flow.shift_time(0.5, 3.0) == pytest.approx(0.75)
    torch.testing.assert_close(flow.shift_time(flow.shift_time(t, 2.0), 1.5), flow.shift_time(t, 3.0))


def test_resolution_shift_is_exp_of_a_linear_mu():
    assert flow.resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert flow.resolution_shift(4096) == pytest.approx(math.exp(1.15))
    assert flow.resolution_shift(1024) == pytest.approx(math.exp(0.5 + 0.65 * 768 / 3840))


def test_time_grid_runs_from_noise_to_data_and_is_shifted():
    grid = flow.time_grid(10, shift=3.0)
    assert grid.shape == (11,) and grid[0] == 1 and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()
    torch.testing.assert_close(grid, flow.shift_time(torch.linspace(1, 0, 11, dtype=torch.float64), 3.0))


# ------------------------------------------------------------------ solvers
@pytest.mark.parametrize("solver", [flow.euler, flow.heun])
def test_solvers_are_exact_on_the_straight_field_of_one_point(solver):
    """v(x, t) = (x - x0) / t is linear in x with straight paths: Euler lands on them at every grid time."""
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    field = lambda x, t: (x - x0) / t.view(-1, 1)  # noqa: E731
    grid = flow.time_grid(7, shift=2.5)
    out = solver(field, z, grid)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)
    partial = solver(field, z, grid[:4])
    torch.testing.assert_close(partial, (1 - grid[3]) * x0 + grid[3] * z, rtol=0, atol=1e-12)


def test_heun_is_second_order_and_euler_first_order():
    """Data N(0, sigma^2): the ideal field v = x (t - (1 - t) sigma^2) / ((1 - t)^2 sigma^2 + t^2) maps x(1) = z to sigma z."""
    sigma = 0.5
    field = lambda x, t: x * (t - (1 - t) * sigma**2) / ((1 - t) ** 2 * sigma**2 + t**2)  # noqa: E731
    z = torch.tensor([1.0, -2.0], dtype=torch.float64)

    def error(solver, steps):
        return float((solver(field, z, flow.time_grid(steps)) - sigma * z).abs().max())

    for solver, order in ((flow.heun, 2), (flow.euler, 1)):
        errors = [error(solver, n) for n in (16, 32, 64, 128)]
        observed = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
        assert all(abs(o - order) < 0.15 for o in observed[1:]), (solver.__name__, observed)


def test_sample_loop_integrates_with_the_chosen_solver_on_the_shifted_grid():
    z = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    field = lambda x, t: x * (t - (1 - t) * 0.25).view(-1, 1, 1, 1) / ((1 - t) ** 2 * 0.25 + t**2).view(-1, 1, 1, 1)  # noqa: E731
    grid = flow.time_grid(20, shift=2.0)
    assert flow.sample_loop(field, z, solver="euler", steps=20, shift=2.0).equal(flow.euler(field, z, grid))
    assert flow.sample_loop(field, z, solver="heun", steps=20, shift=2.0).equal(flow.heun(field, z, grid))


# ------------------------------------------------------------------ SpeeD's facts on the flow
def test_psi_rate_and_its_peak():
    t = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    numeric = torch.gradient(flow.psi(t), spacing=(t,))[0]
    torch.testing.assert_close(flow.psi_rate(t)[1:-1], numeric[1:-1], rtol=1e-6, atol=1e-8)
    assert float(t[flow.psi_rate(t).argmax()]) == pytest.approx(flow.PSI_RATE_PEAK, abs=1e-5)
    assert float(flow.psi_rate(torch.tensor(0.5))) == pytest.approx(2.0)
    torch.testing.assert_close(flow.psi(t), 1 / (1 + flow.snr(t)))


def test_auto_tau_is_the_pivot_rule_in_flow_time(linear):
    tau = flow.auto_tau()
    assert tau == pytest.approx(0.92101, abs=1e-5)
    t = torch.linspace(0, 1, 1_000_001, dtype=torch.float64)
    rate = torch.gradient(flow.psi(t).sqrt(), spacing=(t,))[0]
    first_below = float(t[int(torch.nonzero(rate < 0.1)[0])])
    assert first_below == pytest.approx(tau, abs=2e-6)
    # at matched SNR it lies between the linear schedule's pivot 642 and the paper's tau 700, at steps 695-696
    matched = [float(flow.time_from_snr(linear.snr[s])) for s in (642, 695, 696, 700)]
    assert matched[0] < matched[1] < tau < matched[2] < matched[3]


def test_areas_labels_and_shares():
    areas = flow.flow_areas("auto")
    tau = flow.auto_tau()
    assert areas.bounds() == {"acceleration": (0.0, 0.5), "deceleration": (0.5, tau), "convergence": (tau, 1.0)}
    t = torch.tensor([0.0, 0.49, 0.5, tau - 1e-6, tau, 1.0], dtype=torch.float64)
    assert areas.labels(t).tolist() == [0, 0, 1, 1, 2, 2]
    fractions = areas.fractions()
    assert fractions["convergence"] == pytest.approx(1 - tau) and sum(fractions.values()) == pytest.approx(1.0)
    early = flow.FlowAreas(tau=0.3)  # tau before the peak: no deceleration area
    assert early.bounds()["deceleration"] == (0.3, 0.3) and early.labels(torch.tensor([0.4])).tolist() == [2]


def test_change_aware_weights_on_the_flow():
    lam, tau = 0.6, flow.auto_tau()
    weights = FlowChangeAwareWeights(lam=lam)
    t = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    w = weights.weight(t)
    rate = torch.gradient(flow.psi(t), spacing=(t,))[0]
    u = (rate - rate.min()) / (rate.max() - rate.min())  # the discrete rule: min-max normalised d psi / dt
    below = t < tau
    torch.testing.assert_close(w[below], (1 - lam) + (2 * lam - 1) * u[below], rtol=0, atol=1e-6)
    assert (w[~below] == 1).all()
    assert float(w[0]) == pytest.approx(1 - lam) and float(weights.weight(torch.tensor(0.5))) == pytest.approx(lam)
    assert float(w[below].min()) >= 1 - lam - 1e-12 and float(w[below].max()) <= lam + 1e-12


def test_min_snr_and_p2_weights_are_their_x0_and_eps_forms_on_the_velocity_loss():
    g = torch.Generator().manual_seed(0)
    x0, noise, v_hat = (torch.randn(64, 5, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(64, generator=g, dtype=torch.float64).clamp(1e-3, 1 - 1e-3)
    x_t = flow.q_sample(x0, t, noise)
    x0_hat, eps_hat = flow.split_prediction(v_hat, x_t, t)
    mse = lambda a, b: (a - b).pow(2).mean(1)  # noqa: E731
    snr, gamma = flow.snr(t), 5.0
    v_loss = mse(v_hat, flow.velocity(x0, noise))
    torch.testing.assert_close(FlowMinSNRWeights(gamma).weight(t) * v_loss, snr.clamp(max=gamma) * mse(x0_hat, x0))
    torch.testing.assert_close(FlowP2Weights(1.0, 1.0).weight(t) * v_loss, mse(eps_hat, noise) / (1 + snr))
    # finite at both ends; Min-SNR peaks where (1 - t)^2 = gamma t^2
    ends = torch.tensor([0.0, 1.0])
    assert FlowMinSNRWeights().weight(ends).tolist() == [0.0, 0.0] and FlowP2Weights().weight(ends).tolist() == [0.0, 0.0]
    grid = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    assert float(grid[FlowMinSNRWeights(gamma).weight(grid).argmax()]) == pytest.approx(1 / (1 + math.sqrt(gamma)), abs=1e-4)


# ------------------------------------------------------------------ SpeeD at matched SNR
class LinearStepsInFlowTime(ContinuousSampler):
    """The flow times of uniform steps of a discrete schedule at equal SNR: step j owns the times from its SNR's
    to the next step's (the last step up to t = 1), each with mass 1 / T."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.steps = schedule.num_timesteps
        self.knots = torch.cat([flow.time_from_snr(schedule.snr), torch.ones(1, dtype=torch.float64)])
        super().__init__()

    def _quantile(self, u):
        x = u.double() * self.steps
        j = x.floor().long().clamp(max=self.steps - 1)
        return (self.knots[j] + (x - j) * (self.knots[j + 1] - self.knots[j])).float()

    def _cdf(self, t):
        return torch.as_tensor(np.interp(t.numpy(), self.knots.numpy(), np.arange(self.steps + 1) / self.steps))


@pytest.mark.parametrize("dual", [False, True])
def test_convergence_share_matches_discrete_speed_at_matched_snr(linear, dual):
    tau = float(flow.time_from_snr(linear.snr[700]))
    sampler = FlowAsymmetricSampler(tau=tau, k=5, dual=dual, base=LinearStepsInFlowTime(linear))
    discrete = SpeeD(tau=700, k=5, dual=dual, lam=None).bind(linear).probabilities().double()
    expected = float(discrete[700:].sum())
    assert expected == pytest.approx(300 / 3800 / (2 if dual else 1))  # 7.9 %, 3.9 % with dual pairs
    assert sampler.areas.shares(sampler.cdf_at)["convergence"] == pytest.approx(expected, rel=1e-6)
    if not dual:
        assert float(asymmetric_probabilities(1000, 700, 5)[700:].sum()) == pytest.approx(expected)
    t = draws(sampler)
    share, n = float(np.mean(t >= tau)), t.size
    assert abs(share - expected) < 5 * math.sqrt(expected * (1 - expected) / n)


def test_flow_speed_shares_with_the_uniform_base():
    """Uniform flow t already draws the convergence area as rarely as discrete SpeeD with k = 5 (7.9 %)."""
    tau = flow.auto_tau()
    sampler = FlowAsymmetricSampler(k=5, dual=False)
    expected = (1 - tau) / (5 * tau + 1 - tau)
    assert sampler.areas.shares(sampler.cdf_at)["convergence"] == pytest.approx(expected)
    np.testing.assert_allclose(sampler.probabilities().numpy()[:900], 5 / (1 + tau * 4) / PROBABILITY_BINS, rtol=1e-5)
    assert flow.flow_areas().fractions()["convergence"] == pytest.approx(0.0790, abs=1e-4)


def test_dual_pairs_about_the_pivot():
    sampler = FlowAsymmetricSampler(tau=0.8, k=5, dual=True)
    sampler.manual_seed(0)
    t = sampler.sample(9)
    primary, partners = t[:5], t[5:]
    torch.testing.assert_close(partners, dual_pairs(primary, sampler.pivot)[:4])
    assert sampler.pivot == flow.auto_tau()  # whatever tau is
    assert float(FlowAsymmetricSampler().sample(10_000)[5001:].max()) <= max(sampler.pivot, 1 - sampler.pivot)


# ------------------------------------------------------------------ sampled densities
SAMPLER_CASES = [
    ("uniform", lambda: FlowUniformSampler(), uniform_cdf(), uniform_cdf(2.0)),
    ("uniform shift 3", lambda: FlowUniformSampler(shift=3.0), uniform_cdf(3.0), uniform_cdf()),
    ("logit-normal", lambda: FlowLogitNormalSampler(), logit_normal_cdf(), uniform_cdf()),
    ("logit-normal 0.5 0.7 shift 2", lambda: FlowLogitNormalSampler(0.5, 0.7, 2.0), logit_normal_cdf(0.5, 0.7, 2.0),
     logit_normal_cdf(0.5, 0.7)),
    ("mode 1.29", lambda: FlowModeSampler(), mode_cdf(1.29), uniform_cdf()),
    ("mode -0.8 shift 3", lambda: FlowModeSampler(-0.8, shift=3.0), mode_cdf(-0.8, 3.0), mode_cdf(-0.8)),
    ("cosmap", lambda: FlowCosMapSampler(), cosmap_cdf(), uniform_cdf()),
    ("cosmap shift 0.5", lambda: FlowCosMapSampler(shift=0.5), cosmap_cdf(0.5), cosmap_cdf()),
    ("asymmetric", lambda: FlowAsymmetricSampler(tau=0.7, k=5, dual=False), asymmetric_cdf(uniform_cdf(), 0.7, 5),
     uniform_cdf()),
    ("asymmetric on logit-normal shift 3", lambda: FlowAsymmetricSampler(0.9, 3, False, FlowLogitNormalSampler(shift=3.0)),
     asymmetric_cdf(logit_normal_cdf(s=3.0), 0.9, 3), logit_normal_cdf(s=3.0)),
]


@pytest.mark.parametrize("build, reference, wrong", [c[1:] for c in SAMPLER_CASES], ids=[c[0] for c in SAMPLER_CASES])
def test_sampler_density_kolmogorov_smirnov(build, reference, wrong):
    sampler = build()
    t = draws(sampler)
    assert t.min() >= 0 and t.max() <= 1
    critical = ks_critical(t.size)
    assert ks_distance(t, reference) < critical
    assert ks_distance(t, wrong) > critical  # the same draws reject another distribution
    x = np.linspace(0, 1, 1001)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(sampler.cdf_at(x).numpy(), reference(x), atol=1e-6)
    probs = sampler.probabilities()
    assert probs.shape == (PROBABILITY_BINS,) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)


def test_cosmap_and_mode_match_sd3s_densities():
    x = np.array([0.1, 0.37, 0.5, 0.9])
    cosmap_density = lambda t: 2 / (np.pi - 2 * np.pi * t + 2 * np.pi * t**2)  # noqa: E731
    integral = [integrate.quad(cosmap_density, 0, v)[0] for v in x]
    np.testing.assert_allclose(FlowCosMapSampler().cdf_at(x).numpy(), integral, rtol=1e-10)
    # mode sampling is symmetric about 1/2 and uniform at scale 0
    np.testing.assert_allclose(FlowModeSampler(1.29).cdf_at(1 - x).numpy(), 1 - FlowModeSampler(1.29).cdf_at(x).numpy(), atol=1e-12)
    np.testing.assert_allclose(FlowModeSampler(0.0).cdf_at(x).numpy(), x, atol=1e-12)


@pytest.mark.parametrize("tau", ["auto", 0.95])
def test_dual_sampling_primaries_and_partners_follow_their_distributions(tau):
    sampler = FlowAsymmetricSampler(tau=tau, k=5, dual=True)
    n = 2 * N_DRAWS
    t = draws(sampler, n)
    primary, partners = t[: n // 2 + 1], t[n // 2 + 1 :]
    g = asymmetric_cdf(uniform_cdf(), sampler.tau, 5)
    m = sampler.pivot
    h = lambda x: g(np.clip(m + x, 0, 1)) - g(np.clip(m - x, 0, 1))  # noqa: E731
    assert ks_distance(primary, g) < ks_critical(primary.size)
    assert ks_distance(partners, h) < ks_critical(partners.size)
    assert ks_distance(partners, g) > ks_critical(partners.size)
    x = np.linspace(0, 1, 501)
    np.testing.assert_allclose(sampler.cdf_at(x).numpy(), 0.5 * (g(x) + h(x)), atol=1e-12)


def test_loss_aware_sampler_on_bins():
    bins, history = 50, 10
    sampler = FlowLossAwareSampler(bins=bins, history=history)
    t = draws(sampler)
    assert ks_distance(t, uniform_cdf()) < ks_critical(t.size)  # uniform until every bin has its history
    centres = (torch.arange(bins, dtype=torch.float32) + 0.5) / bins
    losses = 1.0 + torch.arange(bins, dtype=torch.float32)  # sqrt(E[L^2]) = 1 + b
    for _ in range(history):
        sampler.update(centres, losses)
    assert bool(sampler.warm)
    p = (1 + np.arange(bins)) / np.sum(1 + np.arange(bins)) * (1 - 0.001) + 0.001 / bins
    np.testing.assert_allclose(sampler.probabilities().numpy(), p, rtol=1e-5)
    t = draws(sampler, seed=1)
    density_cdf = lambda x: np.interp(x, np.arange(bins + 1) / bins, np.concatenate([[0], np.cumsum(p)]))  # noqa: E731
    assert ks_distance(t, density_cdf) < ks_critical(t.size)
    assert ks_distance(t, uniform_cdf()) > ks_critical(t.size)
    np.testing.assert_allclose(sampler.cdf_at(np.linspace(0, 1, 101)).numpy(), density_cdf(np.linspace(0, 1, 101)), atol=1e-6)
    # 1 / (bins p_b) makes the estimate of the uniform-t mean of f(t) = t^2 unbiased
    w = sampler.importance_weight(torch.from_numpy(t).float()).double().numpy()
    np.testing.assert_allclose(w[:5], 1 / (bins * p[np.minimum((t[:5] * bins).astype(int), bins - 1)]), rtol=1e-5)
    estimate = w * t**2
    assert abs(estimate.mean() - 1 / 3) < 5 * estimate.std() / math.sqrt(t.size)
    assert sampler.bin_of(torch.tensor([0.0, 1.0])).tolist() == [0, bins - 1]


def test_continuous_samplers_replay_from_their_seed_and_state():
    sampler = FlowLogitNormalSampler(shift=3.0)
    sampler.manual_seed(7)
    first = sampler.sample(5)
    state = sampler.extra_state()
    after = sampler.sample(5)
    again = FlowLogitNormalSampler(shift=3.0)
    again.manual_seed(7)
    assert again.sample(5).equal(first)
    restored = FlowLogitNormalSampler(shift=3.0)
    restored.load_extra_state(state)
    assert restored.sample(5).equal(after)


# ------------------------------------------------------------------ devices and host syncs
def all_strategies():
    samplers = [FlowUniformSampler(shift=3.0), FlowLogitNormalSampler(), FlowModeSampler(), FlowCosMapSampler(),
                FlowLossAwareSampler(bins=4, history=1), FlowAsymmetricSampler(),
                FlowAsymmetricSampler(dual=False, base=FlowLogitNormalSampler(shift=2.0))]
    weights = [FlowMinSNRWeights(), FlowP2Weights(), FlowChangeAwareWeights()]
    return samplers, weights


def run_steps(samplers, weights, device, steps=3):
    for sampler in samplers:
        sampler.manual_seed(0)
        for _ in range(steps):
            t = sampler.sample(33)
            assert t.device == torch.device(device) and t.dtype == torch.float32 and t.shape == (33,)
            for w in weights:
                assert w.weight(t).device == t.device
            imp = sampler.importance_weight(t)
            assert imp is None or imp.device == t.device
            sampler.update(t, torch.rand(33, device=device))
            x0 = torch.randn(33, 2, 4, 4, device=device)
            per_sample = flow.loss(lambda x, s: x * s.view(-1, 1, 1, 1), x0, t)
            assert per_sample.shape == (33,) and per_sample.device == t.device


def test_no_host_reads_in_draws_weights_and_updates_on_cpu(monkeypatch):
    """On the CPU a sync cannot be observed; instead every way of reading a value to the host is refused."""
    samplers, weights = all_strategies()

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(flow, "_check_range", lambda t, name: None)  # the loss's value check runs on the CPU only
    run_steps(samplers, weights, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_draws_weights_updates_and_loss_on_cuda_never_sync():
    samplers, weights = all_strategies()
    for sampler in samplers:
        sampler.to("cuda")
        sampler.manual_seed(0)
        sampler.sample(1)  # builds the generator outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_steps(samplers, weights, f"cuda:{torch.cuda.current_device()}")
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: flow.shift_time(0.5, 0.0), ValueError, "shift must be a positive number"),
        (lambda: flow.shift_time(0.5, -1.0), ValueError, "shift must be a positive number"),
        (lambda: flow.time_grid(10, shift=float("nan")), ValueError, "shift must be a positive number"),
        (lambda: FlowUniformSampler(shift=0), ValueError, "shift must be a positive number"),
        (lambda: flow.shift_time(1.5, 3.0), ValueError, r"t must be a number in \[0, 1\]"),
        (lambda: flow.shift_time(torch.tensor([0.2, -0.1]), 3.0), ValueError, r"flow times in \[0, 1\]"),
        (lambda: flow.loss(lambda x, t: x, torch.zeros(2, 3), torch.tensor([0.5, 1.2])), ValueError,
         r"from 0.5 to 1.2"),
        (lambda: flow.loss(lambda x, t: x, torch.zeros(2, 3), torch.tensor([0.5, float("nan")])), ValueError,
         r"flow times in \[0, 1\]"),
        (lambda: flow.loss(lambda x, t: x, torch.zeros(2, 3), torch.tensor([0, 700])), ValueError,
         "not as integer steps"),
        (lambda: flow.loss(lambda x, t: x, torch.zeros(2, 3), torch.tensor([0.5])), ValueError, r"shaped \(2,\)"),
        (lambda: flow.loss(lambda x, t: x[:, :1], torch.zeros(2, 3), torch.tensor([0.5, 0.5])), ValueError,
         "out_channels"),
        (lambda: flow.euler(lambda x, t: x, torch.zeros(1), [0.0, 1.0]), ValueError, "strictly decreasing"),
        (lambda: flow.sample_loop(lambda x, t: x, torch.zeros(1, 1), solver="rk4"), ValueError, "Unknown flow solver"),
        (lambda: flow.time_from_snr(-1.0), ValueError, "SNR values must be >= 0"),
        (lambda: flow.resolution_shift(1024, base_tokens=4096, max_tokens=256), ValueError, "must be larger"),
        (lambda: flow.auto_tau(1.0), ValueError, "threshold"),
        (lambda: FlowAsymmetricSampler(tau=700), ValueError, "time_from_snr"),
        (lambda: FlowAsymmetricSampler(tau=0.0), ValueError, r"tau must be a number in \(0, 1\)"),
        (lambda: FlowAsymmetricSampler(tau="half"), ValueError, "'auto'"),
        (lambda: FlowAsymmetricSampler(k=0), ValueError, "suppression intensity"),
        (lambda: FlowAsymmetricSampler(base=UniformSampling()), TypeError, "continuous sampler"),
        (lambda: FlowChangeAwareWeights(lam=0.4), ValueError, r"lam must be a number in \[0.5, 1\]"),
        (lambda: FlowChangeAwareWeights(tau=1.0), ValueError, "tau"),
        (lambda: FlowModeSampler(scale=2.0), ValueError, "not monotone"),
        (lambda: FlowLogitNormalSampler(std=0), ValueError, "std must be a positive number"),
        (lambda: FlowLossAwareSampler(bins=0), ValueError, "bins"),
        (lambda: FlowP2Weights(k=0), ValueError, "P2's k must be a positive number.*infinite for k = 0"),
        (lambda: FlowMinSNRWeights(gamma=0), ValueError, "gamma"),
    ],
)
def test_bad_input_is_refused_with_the_cause(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_integer_tau_message_names_the_matched_flow_time():
    with pytest.raises(ValueError) as info:
        FlowChangeAwareWeights(tau=700)
    assert re.search(r"0\.923 for step 700", str(info.value))
