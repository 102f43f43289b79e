"""The flow process and the time-step strategies bound to a flow: closed forms, sampled densities, devices, errors.

Densities are checked with the Kolmogorov-Smirnov distance D = sup |F_n - F| against a CDF derived here
independently (numpy / scipy). Its critical value comes from the Dvoretzky-Kiefer-Wolfowitz inequality with
Massart's constant, P(D > eps) <= 2 exp(-2 n eps^2), so eps = sqrt(log(2 / alpha) / (2 n)) rejects a correct
sampler with probability at most alpha (1e-4; the seeds are fixed). Every such test also rejects a wrong CDF
with the same draws, so it can fail.
"""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from lightning_speed import flow
from lightning_speed.flow import FlowSchedule
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.timesteps import (
    AsymmetricDensity,
    CLTSSampling,
    ConstantWeighting,
    CosMapSampling,
    CurriculumSampling,
    EDMLogNormalSampling,
    LaplaceLogSNRSampling,
    LogitNormalSampling,
    LossAwareSampling,
    LossDecreaseSampling,
    MinSNRWeighting,
    ModeSampling,
    P2Weighting,
    SpeeD,
    StratifiedSampling,
    TimestepStrategy,
    UniformSampling,
    asymmetric_probabilities,
    dual_pairs,
)
from lightning_speed.timesteps.base import PROBABILITY_BINS

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


def on_flow(strategy, shift: float = 1.0):
    return strategy.bind(FlowSchedule(shift))


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


def laplace_log_snr_cdf(mu=0.0, b=0.5, s=1.0):
    # t <= x exactly when the unshifted log-SNR -2 logit(t) is at least that of x
    return lambda x: stats.laplace.sf(-2 * special.logit(unshift(x, s)), loc=mu, scale=b)


def edm_cdf(p_mean=-1.2, p_std=1.2, s=1.0):
    # sigma = sqrt(1 / SNR) = t / (1 - t) of the unshifted time is log-normal, and increases with t
    return lambda x: stats.lognorm.cdf(unshift(x, s) / (1 - unshift(x, s)), p_std, scale=math.exp(p_mean))


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


def test_half_precision_data_keeps_the_flow_time_exact():
    """bf16 data (precision="bf16-true") with float32 times: x_t and the estimates use t itself, not t rounded to bf16
    (2^-8 apart in [0.5, 1): at t = 0.99 the signal's coefficient 1 - t would be off by 22 %). Computed in float32,
    each value is within a few float32 roundings of the float64 closed form: 8 eps32 of its terms' size."""
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(3, 2, 4, 4, generator=g).bfloat16() for _ in range(2))
    t = torch.tensor([0.3, 0.9, 0.99])
    t64, size = t.double().view(-1, 1, 1, 1), float((x0.double().abs() + noise.double().abs()).max())
    tol = 8 * torch.finfo(torch.float32).eps * size
    x_t = flow.q_sample(x0, t, noise)
    torch.testing.assert_close(x_t.double(), (1 - t64) * x0.double() + t64 * noise.double(), rtol=0, atol=tol)
    v = flow.velocity(x0, noise)
    x0_hat, eps_hat = flow.split_prediction(v, x0, t)  # x_t = x0 in bf16 stands in for a state kept in bf16
    torch.testing.assert_close(x0_hat.double(), x0.double() - t64 * v.double(), rtol=0, atol=tol)
    torch.testing.assert_close(eps_hat.double(), x0.double() + (1 - t64) * v.double(), rtol=0, atol=tol)


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


@pytest.mark.parametrize("solver", [flow.euler, flow.heun])
def test_solvers_integrate_half_precision_noise_in_float32(solver):
    """A constant field v = c moves x(1) to x(0) = x(1) - c. Steps of c / 50 are below bf16's spacing near |x| = 2
    (2^-7), so a state kept in the noise's bf16 would stay where it started. In float32 the error is that of the bf16
    increments h c (the network's dtype: relative 2^-9 each, c 2^-9 in all, twice for Heun's average) plus a few
    float32 roundings of |x| + |c| per step: 100 eps32 of it bounds those."""
    c = 0.375  # exact in bf16
    noise = (torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 2).bfloat16()
    out = solver(lambda x, t: torch.full_like(x, c, dtype=torch.bfloat16), noise, flow.time_grid(50))
    assert out.dtype == torch.float32
    tol = c * 2**-8 + 100 * torch.finfo(torch.float32).eps * (float(noise.float().abs().max()) + c)
    torch.testing.assert_close(out.double(), noise.double() - c, rtol=0, atol=tol)


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
    weights = on_flow(SpeeD(lam=lam))
    t = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    w = weights.weight(t)
    rate = torch.gradient(flow.psi(t), spacing=(t,))[0]
    u = (rate - rate.min()) / (rate.max() - rate.min())  # the discrete rule: min-max normalised d psi / dt
    below = t < tau
    torch.testing.assert_close(w[below], (1 - lam) + (2 * lam - 1) * u[below], rtol=0, atol=1e-6)
    assert (w[~below] == 1).all()
    assert float(w[0]) == pytest.approx(1 - lam) and float(weights.weight(torch.tensor(0.5))) == pytest.approx(lam)
    assert float(w[below].min()) >= 1 - lam - 1e-12 and float(w[below].max()) <= lam + 1e-12
    # the documented values; the shift moves draws, not weights (they are functions of the process time)
    points = torch.tensor([0.25, 0.9], dtype=torch.float64)
    assert weights.weight(points).tolist() == pytest.approx([0.496, 0.4 + 0.2 * 0.09 / 0.82**2], abs=1e-12)
    assert on_flow(SpeeD(lam=lam), 3.0).weight(points).equal(weights.weight(points))
    assert on_flow(SpeeD(lam=None)).weight(points).tolist() == [1.0, 1.0]


def test_min_snr_and_p2_weights_are_their_x0_and_eps_forms_on_the_velocity_loss():
    g = torch.Generator().manual_seed(0)
    x0, noise, v_hat = (torch.randn(64, 5, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(64, generator=g, dtype=torch.float64).clamp(1e-3, 1 - 1e-3)
    x_t = flow.q_sample(x0, t, noise)
    x0_hat, eps_hat = flow.split_prediction(v_hat, x_t, t)
    mse = lambda a, b: (a - b).pow(2).mean(1)  # noqa: E731
    snr, gamma = flow.snr(t), 5.0
    v_loss = mse(v_hat, flow.velocity(x0, noise))
    min_snr, p2 = on_flow(MinSNRWeighting(gamma)), on_flow(P2Weighting(1.0, 1.0, scale=2.0))
    torch.testing.assert_close(min_snr.weight(t) * v_loss, snr.clamp(max=gamma) * mse(x0_hat, x0))
    torch.testing.assert_close(p2.weight(t) * v_loss, 2.0 * mse(eps_hat, noise) / (1 + snr))
    # finite at both ends; Min-SNR peaks where (1 - t)^2 = gamma t^2, at 0.309 with w = 0.477 for gamma = 5
    ends = torch.tensor([0.0, 1.0])
    assert min_snr.weight(ends).tolist() == [0.0, 0.0] and p2.weight(ends).tolist() == [0.0, 0.0]
    grid = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    peak = 1 / (1 + math.sqrt(gamma))
    assert float(grid[min_snr.weight(grid).argmax()]) == pytest.approx(peak, abs=1e-4)
    assert float(min_snr.weight(torch.tensor(peak, dtype=torch.float64))) == pytest.approx((1 - peak) ** 2)
    assert on_flow(ConstantWeighting()).weight(t).equal(torch.ones(64))


# ------------------------------------------------------------------ SpeeD at matched SNR
class LinearStepsInFlowTime:
    """The flow times of uniform steps of a discrete schedule at equal SNR: step j owns the times from its SNR's
    to the next step's (the last step up to t = 1), each with mass 1 / T."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.steps = schedule.num_timesteps
        self.knots = torch.cat([flow.time_from_snr(schedule.snr), torch.ones(1, dtype=torch.float64)])

    def quantile(self, u):
        x = u.double() * self.steps
        j = x.floor().long().clamp(max=self.steps - 1)
        return (self.knots[j] + (x - j) * (self.knots[j + 1] - self.knots[j])).float()

    def cdf(self, t):
        return torch.as_tensor(np.interp(t.numpy(), self.knots.numpy(), np.arange(self.steps + 1) / self.steps))


@pytest.mark.parametrize("dual", [False, True])
def test_convergence_share_matches_discrete_speed_at_matched_snr(linear, dual):
    """SpeeD on a flow whose base puts time at the SNRs of uniform linear steps draws the convergence area as often
    as discrete SpeeD: 300 / 3800 = 7.9 %, 3.9 % with dual pairs (whose partners stay below 0.921 < 0.923)."""
    tau = float(flow.time_from_snr(linear.snr[700]))
    sampler = on_flow(SpeeD(tau=tau, k=5, dual=dual, lam=None))
    base = LinearStepsInFlowTime(linear)
    sampler.density = AsymmetricDensity(base.quantile, base.cdf, tau, 5)
    discrete = SpeeD(tau=700, k=5, dual=dual, lam=None).bind(linear).probabilities().double()
    expected = float(discrete[700:].sum())
    assert expected == pytest.approx(300 / 3800 / (2 if dual else 1))
    shares = flow.FlowAreas(sampler.resolved_tau).shares(sampler.cdf_at)
    assert shares["convergence"] == pytest.approx(expected, rel=1e-6)
    if not dual:
        assert float(asymmetric_probabilities(1000, 700, 5)[700:].sum()) == pytest.approx(expected)
    t = draws(sampler)
    share, n = float(np.mean(t >= tau)), t.size
    assert abs(share - expected) < 5 * math.sqrt(expected * (1 - expected) / n)


@pytest.mark.parametrize("shift, convergence", [(1.0, 0.0790), (3.0, 0.2046)])
def test_flow_speed_shares_on_the_shifted_uniform_default(shift, convergence):
    """The areas are in process time, after the shift: the shifted uniform default puts 1 - unshift(tau) there
    (7.9 %, 20.5 % at shift 3), and SpeeD draws that mass k times less densely: c / (k (1 - c) + c)."""
    tau = flow.auto_tau()
    above = 1 - float(flow.unshift_time(tau, shift))
    assert above == pytest.approx(convergence, abs=1e-4)
    assert on_flow(UniformSampling(), shift).cdf_at(tau).item() == pytest.approx(1 - above)
    sampler = on_flow(SpeeD(k=5, dual=False, lam=None), shift)
    expected = above / (5 * (1 - above) + above)
    assert flow.FlowAreas(sampler.resolved_tau).shares(sampler.cdf_at)["convergence"] == pytest.approx(expected)
    if shift == 1.0:  # the discrete P(t) with T = 1: k / (1 + tau (k - 1)) below tau
        below = 5 / (1 + tau * 4) / PROBABILITY_BINS
        np.testing.assert_allclose(sampler.probabilities().numpy()[:900], below, rtol=1e-5)


def test_dual_pairs_about_the_pivot():
    sampler = on_flow(SpeeD(tau=0.8, k=5, dual=True), 2.0)
    sampler.manual_seed(0)
    t = sampler.sample(9)
    primary, partners = t[:5], t[5:]
    torch.testing.assert_close(partners, dual_pairs(primary, sampler.pivot)[:4])
    assert sampler.pivot == flow.auto_tau()  # whatever tau and the shift are
    assert float(on_flow(SpeeD()).sample(10_000)[5001:].max()) <= max(sampler.pivot, 1 - sampler.pivot)


# ------------------------------------------------------------------ sampled densities
SAMPLER_CASES = [
    ("uniform", lambda: on_flow(UniformSampling()), uniform_cdf(), uniform_cdf(2.0)),
    ("uniform shift 3", lambda: on_flow(UniformSampling(), 3.0), uniform_cdf(3.0), uniform_cdf()),
    ("logit-normal", lambda: on_flow(LogitNormalSampling()), logit_normal_cdf(), uniform_cdf()),
    ("logit-normal 0.5 0.7 shift 2", lambda: on_flow(LogitNormalSampling(0.5, 0.7), 2.0),
     logit_normal_cdf(0.5, 0.7, 2.0), logit_normal_cdf(0.5, 0.7)),
    ("mode 1.29", lambda: on_flow(ModeSampling()), mode_cdf(1.29), uniform_cdf()),
    ("mode -0.8 shift 3", lambda: on_flow(ModeSampling(-0.8), 3.0), mode_cdf(-0.8, 3.0), mode_cdf(-0.8)),
    ("cosmap", lambda: on_flow(CosMapSampling()), cosmap_cdf(), uniform_cdf()),
    ("cosmap shift 0.5", lambda: on_flow(CosMapSampling(), 0.5), cosmap_cdf(0.5), cosmap_cdf()),
    ("speed", lambda: on_flow(SpeeD(tau=0.7, k=5, dual=False)), asymmetric_cdf(uniform_cdf(), 0.7, 5), uniform_cdf()),
    ("speed shift 3", lambda: on_flow(SpeeD(tau=0.9, k=3, dual=False), 3.0), asymmetric_cdf(uniform_cdf(3.0), 0.9, 3),
     uniform_cdf(3.0)),
    ("loss-aware, cold, shift 2", lambda: on_flow(LossAwareSampling(bins=7), 2.0), uniform_cdf(2.0), uniform_cdf()),
    ("laplace log-SNR", lambda: on_flow(LaplaceLogSNRSampling()), laplace_log_snr_cdf(), logit_normal_cdf()),
    ("laplace log-SNR 1 0.8 shift 3", lambda: on_flow(LaplaceLogSNRSampling(1.0, 0.8), 3.0),
     laplace_log_snr_cdf(1.0, 0.8, 3.0), laplace_log_snr_cdf(1.0, 0.8)),
    ("edm log-normal", lambda: on_flow(EDMLogNormalSampling()), edm_cdf(), logit_normal_cdf()),
    ("edm log-normal 0.4 0.6 shift 2", lambda: on_flow(EDMLogNormalSampling(0.4, 0.6), 2.0), edm_cdf(0.4, 0.6, 2.0),
     edm_cdf(0.4, 0.6)),
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


@pytest.mark.parametrize("build", [c[1] for c in SAMPLER_CASES] + [
    lambda: on_flow(CurriculumSampling(LogitNormalSampling(), switch=0.5)),
    lambda: on_flow(StratifiedSampling(UniformSampling()), 3.0),
    lambda: on_flow(LossDecreaseSampling(bins=8)),
], ids=[c[0] for c in SAMPLER_CASES] + ["curriculum", "stratified", "loss-decrease"])
def test_flow_times_are_drawn_in_float32_under_a_half_precision_default(build):
    """Under bf16-true Lightning makes bfloat16 the default dtype inside each step: the draws stay float32, not
    bfloat16's 128 values per octave (4096 float32 draws from 2^24 values collide in about 0.5 pairs; in bfloat16 in
    hundreds)."""
    sampler = build()
    sampler.manual_seed(0)
    if isinstance(sampler, CurriculumSampling):
        sampler.set_step(1, 4)  # mixing the early strategy with the uniform
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        t = sampler.sample(4096)
    finally:
        torch.set_default_dtype(previous)
    assert t.dtype == torch.float32 and torch.unique(t).numel() >= 4096 - 10


def test_timestep_strategy_draws_the_shifted_uniform_default_in_the_open_interval():
    timesteps = TimestepStrategy(FlowSchedule(3.0))
    timesteps.sampler.manual_seed(0)
    t = timesteps.sample(N_DRAWS, "cpu")
    assert t.dtype == torch.float32 and t.shape == (N_DRAWS,) and timesteps.process == "flow"
    assert float(t.min()) > 0 and float(t.max()) < 1
    assert ks_distance(t.double().numpy(), uniform_cdf(3.0)) < ks_critical(N_DRAWS)
    assert ks_distance(t.double().numpy(), uniform_cdf()) > ks_critical(N_DRAWS)
    assert timesteps.prediction == "velocity" and timesteps.num_timesteps is None and timesteps.tau is None
    # draws that float32 rounds onto an end (SNR inf or 0) are kept inside: logit-normal far out in either tail
    for mean, end in ((-200.0, 2.0**-24), (40.0, 1 - 2.0**-24)):
        timesteps.install(LogitNormalSampling(mean=mean))
        assert timesteps.sample(8).tolist() == [pytest.approx(end, rel=0, abs=0)] * 8


def test_curriculum_on_a_flow_mixes_its_early_strategy_with_the_shifted_uniform():
    early = SpeeD(tau=0.8, k=5, dual=False, lam=None)
    curriculum = on_flow(CurriculumSampling(early, switch=0.5), 2.0)
    assert curriculum.resolved_tau == 0.8 and early.process == "flow"
    curriculum.set_step(50, 200)  # a = 1 - 50 / 100
    assert curriculum.share == 0.5
    reference = lambda x: 0.5 * asymmetric_cdf(uniform_cdf(2.0), 0.8, 5)(x) + 0.5 * unshift(x, 2.0)  # noqa: E731
    t = draws(curriculum)
    assert ks_distance(t, reference) < ks_critical(t.size)
    assert ks_distance(t, uniform_cdf(2.0)) > ks_critical(t.size)
    np.testing.assert_allclose(curriculum.cdf_at(np.linspace(0, 1, 101)).numpy(), reference(np.linspace(0, 1, 101)),
                               atol=1e-12)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_edm_log_normal_on_a_flow_is_logit_normal(shift):
    """On a rectified flow ln sigma = logit(t): EDM's N(p_mean, p_std^2) in ln sigma is the logit-normal density."""
    edm, logit_normal = on_flow(EDMLogNormalSampling(-0.7, 0.9), shift), on_flow(LogitNormalSampling(-0.7, 0.9), shift)
    x = np.linspace(0, 1, 101)
    np.testing.assert_allclose(edm.cdf_at(x).numpy(), logit_normal.cdf_at(x).numpy(), atol=1e-15)
    assert np.array_equal(draws(edm, 1000), draws(logit_normal, 1000))


def test_laplace_on_a_flow_puts_its_log_snr_where_the_table_puts_it(linear):
    """The flow form and the discrete table are the same density in log-SNR: the mass between two log-SNRs."""
    mu, b = 0.5, 0.7
    table = LaplaceLogSNRSampling(mu, b).bind(linear)
    lam = torch.log(linear.snr).double()
    a, c = 200, 600  # the table's steps a..c cover the log-SNRs between the midpoints around them
    upper, lower = float(lam[a - 1] + lam[a]) / 2, float(lam[c] + lam[c + 1]) / 2
    on_table = float(table.probs.double()[a:c + 1].sum())
    sampler = on_flow(LaplaceLogSNRSampling(mu, b))
    t_at = lambda value: flow.time_from_snr(math.exp(value))  # noqa: E731  (SNR falls as t grows)
    on_flow_mass = float(sampler.cdf_at(t_at(lower)) - sampler.cdf_at(t_at(upper)))
    assert on_flow_mass == pytest.approx(on_table, rel=2.0**-24)  # each float32 table entry within 2^-24 of its value


def test_cosmap_and_mode_match_sd3s_densities():
    x = np.array([0.1, 0.37, 0.5, 0.9])
    cosmap_density = lambda t: 2 / (np.pi - 2 * np.pi * t + 2 * np.pi * t**2)  # noqa: E731
    integral = [integrate.quad(cosmap_density, 0, v)[0] for v in x]
    np.testing.assert_allclose(on_flow(CosMapSampling()).cdf_at(x).numpy(), integral, rtol=1e-10)
    # mode sampling is symmetric about 1/2 and uniform at scale 0
    mode = on_flow(ModeSampling(1.29))
    np.testing.assert_allclose(mode.cdf_at(1 - x).numpy(), 1 - mode.cdf_at(x).numpy(), atol=1e-12)
    np.testing.assert_allclose(on_flow(ModeSampling(0.0)).cdf_at(x).numpy(), x, atol=1e-12)


@pytest.mark.parametrize("tau, shift", [("auto", 1.0), (0.95, 1.0), ("auto", 3.0)])
def test_dual_sampling_primaries_and_partners_follow_their_distributions(tau, shift):
    sampler = on_flow(SpeeD(tau=tau, k=5, dual=True), shift)
    n = 2 * N_DRAWS
    t = draws(sampler, n)
    primary, partners = t[: n // 2 + 1], t[n // 2 + 1 :]
    g = asymmetric_cdf(uniform_cdf(shift), sampler.resolved_tau, 5)
    m = sampler.pivot
    h = lambda x: g(np.clip(m + x, 0, 1)) - g(np.clip(m - x, 0, 1))  # noqa: E731
    assert ks_distance(primary, g) < ks_critical(primary.size)
    assert ks_distance(partners, h) < ks_critical(partners.size)
    assert ks_distance(partners, g) > ks_critical(partners.size)
    x = np.linspace(0, 1, 501)
    np.testing.assert_allclose(sampler.cdf_at(x).numpy(), 0.5 * (g(x) + h(x)), atol=1e-12)


@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_loss_aware_sampler_on_bins(shift):
    """Bins of equal width in the unshifted time u (t = shift(u)); 1 / (bins p_b) keeps the objective of the
    shifted uniform default unbiased."""
    bins, history = 50, 10
    sampler = on_flow(LossAwareSampling(bins=bins, history=history), shift)
    t = draws(sampler)
    assert ks_distance(t, uniform_cdf(shift)) < ks_critical(t.size)  # the default until every bin has its history
    centres = flow.shift_time((torch.arange(bins, dtype=torch.float64) + 0.5) / bins, shift).float()
    losses = 1.0 + torch.arange(bins, dtype=torch.float32)  # sqrt(E[L^2]) = 1 + b
    for _ in range(history):
        sampler.update(centres, losses)
    assert bool(sampler.warm)
    p = (1 + np.arange(bins)) / np.sum(1 + np.arange(bins)) * (1 - 0.001) + 0.001 / bins
    np.testing.assert_allclose(sampler.probs.numpy(), p, rtol=1e-5)
    t = draws(sampler, seed=1)
    edges, cumulative = np.arange(bins + 1) / bins, np.concatenate([[0], np.cumsum(p)])
    density_cdf = lambda x: np.interp(unshift(x, shift), edges, cumulative)  # noqa: E731
    assert ks_distance(t, density_cdf) < ks_critical(t.size)
    assert ks_distance(t, uniform_cdf(shift)) > ks_critical(t.size)
    x = np.linspace(0, 1, 101)
    np.testing.assert_allclose(sampler.cdf_at(x).numpy(), density_cdf(x), atol=1e-6)
    # 1 / (bins p_b) makes the estimate of the default's mean of f(t) = t^2 unbiased
    u = unshift(t, shift)
    w = sampler.importance_weight(torch.from_numpy(t).float()).double().numpy()
    np.testing.assert_allclose(w[:5], 1 / (bins * p[np.minimum((u[:5] * bins).astype(int), bins - 1)]), rtol=1e-5)
    estimate = w * t**2
    exact = integrate.quad(lambda v: float(flow.shift_time(v, shift)) ** 2, 0, 1)[0]
    assert abs(estimate.mean() - exact) < 5 * estimate.std() / math.sqrt(t.size)
    assert sampler.slot_of(torch.tensor([0.0, 1.0])).tolist() == [0, bins - 1]


@pytest.mark.parametrize("build", [
    lambda: on_flow(LossAwareSampling(bins=8, history=2), 3.0),
    lambda: on_flow(SpeeD(), 3.0),
    lambda: on_flow(LogitNormalSampling(), 3.0),
], ids=["loss-aware", "speed", "logit-normal"])
def test_flow_samplers_state_dict_round_trip(build):
    """The state survives a checkpoint (torch.save / torch.load of the plain state): a restored sampler draws
    what the original draws next, and the loss-aware one keeps its history."""
    sampler = build()
    sampler.manual_seed(7)
    for _ in range(10):
        t = sampler.sample(64)
        sampler.update(t, t + 1.0)
    buffer = io.BytesIO()
    torch.save(sampler.extra_state(), buffer)
    after = sampler.sample(16)
    restored = build()
    restored.load_extra_state(torch.load(io.BytesIO(buffer.getvalue())))
    assert restored.sample(16).equal(after)
    if isinstance(sampler, LossAwareSampling):
        assert bool(sampler.warm) and bool(restored.warm)  # the learned p, not the uniform start
        assert restored.loss_history.equal(sampler.loss_history) and restored.probs.equal(sampler.probs)


# ------------------------------------------------------------------ devices and host syncs
def flow_samplers():
    curriculum = CurriculumSampling(SpeeD(lam=None))
    curriculum.set_step(10, 100)
    return [UniformSampling(), LogitNormalSampling(), ModeSampling(), CosMapSampling(),
            LossAwareSampling(bins=4, history=1), SpeeD(), SpeeD(dual=False, tau=0.9), curriculum,
            StratifiedSampling(LogitNormalSampling()), LaplaceLogSNRSampling(), EDMLogNormalSampling()]


def all_strategies(shift: float = 3.0):
    """Bound samplers and weights, and TimestepStrategy objects with each sampler and a weighting installed (all
    built at setup, before the steps are checked)."""
    samplers = [on_flow(s, shift) for s in flow_samplers()]
    weights = [on_flow(w, shift) for w in (MinSNRWeighting(), P2Weighting(), SpeeD(), ConstantWeighting())]
    installed = []
    for sampler, weighting in zip(flow_samplers(), [MinSNRWeighting(), P2Weighting(), ConstantWeighting()] * 4):
        timesteps = TimestepStrategy(FlowSchedule(shift))
        timesteps.install(sampler, weighting)
        sampler.manual_seed(0)
        installed.append(timesteps)
    return samplers, weights, installed


def run_steps(samplers, weights, installed, device, steps=3):
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
    for timesteps in installed:
        for _ in range(steps):
            t = timesteps.sample(33, device)
            loss = timesteps.loss(t, torch.rand(33, device=device))
            assert loss.shape == () and loss.device == t.device and timesteps.last.weight.device == t.device


def test_no_host_reads_in_draws_weights_updates_and_loss_on_cpu(monkeypatch):
    """On the CPU a sync cannot be observed; instead every way of reading a value to the host is refused."""
    samplers, weights, installed = all_strategies()

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(flow, "_check_range", lambda t, name: None)  # the loss's value check runs on the CPU only
    run_steps(samplers, weights, installed, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_draws_weights_updates_and_loss_on_cuda_never_sync():
    samplers, weights, installed = all_strategies()
    for strategy in samplers + weights:
        strategy.to("cuda")
    for sampler in samplers:
        sampler.manual_seed(0)
        sampler.sample(1)  # builds the generator outside the checked region
    for timesteps in installed:
        timesteps.sample(1, "cuda")  # moves the tables and builds the generator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_steps(samplers, weights, installed, f"cuda:{torch.cuda.current_device()}")  # asserts each step's devices
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(sampler.generator.device.type == "cuda" for sampler in samplers)  # the draws were the device's own
    assert all(timesteps.last is not None and timesteps.last.t.is_cuda for timesteps in installed)


# ------------------------------------------------------------------ bad input
LINEAR = NoiseSchedule.from_name("linear", 1000)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: flow.shift_time(0.5, 0.0), ValueError, "shift must be a positive number"),
        (lambda: flow.shift_time(0.5, -1.0), ValueError, "shift must be a positive number"),
        (lambda: flow.time_grid(10, shift=float("nan")), ValueError, "shift must be a positive number"),
        (lambda: FlowSchedule(0), ValueError, "shift must be a positive number"),
        (lambda: FlowSchedule(-3.0), ValueError, "shift must be a positive number"),
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
        # t outside [0, 1], or integer steps, passed to the loss of a flow strategy (checked on the CPU)
        (lambda: TimestepStrategy(FlowSchedule()).loss(torch.tensor([0.5, 1.5]), torch.ones(2)), ValueError,
         r"flow times in \[0, 1\].*from 0.5 to 1.5"),
        (lambda: TimestepStrategy(FlowSchedule()).loss(torch.tensor([-0.1, 0.5]), torch.ones(2)), ValueError,
         r"from -0.1 to 0.5"),
        (lambda: TimestepStrategy(FlowSchedule()).loss(torch.tensor([3, 700]), torch.ones(2)), ValueError,
         "not as integer steps"),
        (lambda: TimestepStrategy(LINEAR).loss(torch.tensor([0.5, 0.2]), torch.ones(2)), ValueError,
         "integer tensor of time steps"),
        (lambda: TimestepStrategy(FlowSchedule(), prediction="epsilon"), ValueError, "predicts the velocity"),
        # a tau of the other process
        (lambda: on_flow(SpeeD(tau=700)), ValueError, "looks like a discrete time step.*'auto'"),
        (lambda: on_flow(SpeeD(tau=1)), ValueError, r"tau must be a number in \(0, 1\)"),
        (lambda: SpeeD(tau=0.9).bind(LINEAR), TypeError, r"got 0.9 \(float\) \(a flow time"),
        (lambda: SpeeD(tau=0), ValueError, r"tau must be an integer of at least 1"),
        (lambda: SpeeD(tau=0.0), TypeError, r"or a flow time in \(0, 1\) \(on a flow; 'auto' is 0.921 there\), got 0.0 "
                                            r"\(float\)"),
        (lambda: SpeeD(tau=1.5), TypeError, r"tau must be 'auto', a time step \(a positive integer, on a DDPM schedule\) "
                                            r"or a flow time in \(0, 1\)"),
        (lambda: SpeeD(tau="half"), ValueError, "'auto'"),
        (lambda: SpeeD(k=0), ValueError, "suppression intensity"),
        (lambda: SpeeD(lam=0.4), ValueError, r"lam must be a number in \[0.5, 1\]"),
        # strategies without a form for the process
        (lambda: on_flow(CLTSSampling()), ValueError, "CLTSSampling has no flow form.*On a flow use UniformSampling"),
        (lambda: TimestepStrategy(FlowSchedule()).install(CLTSSampling()), ValueError, "has no flow form"),
        (lambda: on_flow(CurriculumSampling(SpeeD(tau=700, lam=None))), ValueError, "700 looks like a discrete time step"),
        (lambda: ModeSampling().bind(LINEAR), ValueError, "ModeSampling is a density of flow time.*FlowSchedule"),
        (lambda: CosMapSampling().bind(LINEAR), ValueError, "CosMapSampling is a density of flow time"),
        (lambda: TimestepStrategy(LINEAR).install(ModeSampling()), ValueError, "has no form on the discrete linear"),
        # the samplers' and weights' own settings
        (lambda: ModeSampling(scale=2.0), ValueError, "not monotone"),
        (lambda: LogitNormalSampling(std=0), ValueError, "std must be a positive number"),
        (lambda: LossAwareSampling(bins=0), ValueError, "bins"),
        (lambda: on_flow(P2Weighting(k=0)), ValueError, "P2 with k = 0 is infinite at t = 1 of a flow"),
        (lambda: MinSNRWeighting(gamma=0), ValueError, "gamma"),
    ],
)
def test_bad_input_is_refused_with_the_cause(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_integer_tau_message_names_the_matched_flow_time():
    with pytest.raises(ValueError) as info:
        on_flow(SpeeD(tau=700))
    assert re.search(r"0\.923 for step 700", str(info.value))
