"""Closed forms of SpeeD's flow path: the asymmetric density's inverse pairs and its k, the shift as a pushforward,
and the mean of the change-aware weights under SpeeD's own draws.

The mean of the weights has a closed form: below tau w = (1 - lam) + (2 lam - 1) psi'(t) / 2, whose integral is
(1 - lam) x + (2 lam - 1) psi(x) / 2 (psi(0) = 0). The draws' sample mean is checked with Hoeffding's inequality:
w lies in [1 - lam, 1], so P(|mean - E w| > eps) <= 2 exp(-2 n eps^2 / lam^2) and eps = lam sqrt(log(2 / alpha) / (2 n))
fails a correct sampler with probability at most alpha = 1e-4 (the seed is fixed).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_speed import flow
from lightning_speed.flow import FlowSchedule
from lightning_speed.timesteps import AsymmetricDensity, LogitNormalSampling, SpeeD, UniformSampling

ALPHA = 1e-4


def f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.4])
@pytest.mark.parametrize("tau, k", [(0.2, 5.0), (0.5, 0.5), (flow.auto_tau(), 25.0), (0.99, 1.0)])
def test_asymmetric_density_quantile_and_cdf_are_inverse_and_k_is_the_density_ratio(shift, tau, k):
    schedule = FlowSchedule(shift)
    density = AsymmetricDensity(schedule.warp, schedule.unwarp, tau, k)
    u = torch.linspace(0, 1, 4001, dtype=torch.float64)
    # both maps are compositions of float64 rational maps with errors of a few ulp
    torch.testing.assert_close(density.cdf(density.quantile(u)), u, rtol=0, atol=1e-12)
    torch.testing.assert_close(density.quantile(density.cdf(u)), u, rtol=0, atol=1e-12)
    # its density over the shifted default's, d/dt of the base CDF s / (s - (s - 1) t)^2: k below tau, 1 above,
    # over the normaliser k a + 1 - a with a = unshift(tau)
    a = tau / (shift - (shift - 1) * tau)
    h = 1e-6  # central differences of a smooth CDF: error O(h^2) relative
    for x, factor in ((0.5 * tau, k), (0.5 * (1 + tau), 1.0)):
        pdf = float(density.cdf(f64(x + h)) - density.cdf(f64(x - h))) / (2 * h)
        base = shift / (shift - (shift - 1) * x) ** 2
        assert pdf / base == pytest.approx(factor / (k * a + 1 - a), rel=1e-6)


@pytest.mark.parametrize("shift", [2.0, 3.0])
def test_a_shifted_logit_normal_is_the_logit_normal_with_mean_plus_log_shift(shift):
    """logit(shift t / (1 + (shift - 1) t)) = logit(t) + log(shift): the pushforward's CDF, drawn and evaluated."""
    shifted = LogitNormalSampling(0.3, 0.8).bind(FlowSchedule(shift))
    moved = LogitNormalSampling(0.3 + math.log(shift), 0.8).bind(FlowSchedule(1.0))
    t = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    torch.testing.assert_close(shifted.cdf_at(t), moved.cdf_at(t), rtol=0, atol=1e-12)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    # float32 quantiles: sigmoid, shift and their arithmetic round to a few ulp of 1
    torch.testing.assert_close(shifted.quantile(u), moved.quantile(u), rtol=0, atol=1e-6)
    # the uniform default: its CDF is the inverse shift, whose derivative is the pushforward density
    uniform = UniformSampling().bind(FlowSchedule(shift))
    torch.testing.assert_close(uniform.cdf_at(uniform.quantile(u.double())), u.double(), rtol=0, atol=1e-12)


def expected_weight(lam: float, tau: float, k: float) -> float:
    """E w(t) for t drawn from SpeeD's primary density on the unshifted flow (density k / Z below tau, 1 / Z above)."""
    psi_tau = float(flow.psi(f64(tau)))
    below = (1 - lam) * tau + (2 * lam - 1) * psi_tau / 2
    return (k * below + (1 - tau)) / (k * tau + 1 - tau)


def test_the_change_aware_weights_mean_has_its_closed_form():
    tau = flow.auto_tau()
    # uniform t: 0.4 tau + 0.1 psi(tau) + 1 - tau = 0.5467 for the defaults
    assert expected_weight(0.6, tau, 1.0) == pytest.approx(0.54666, abs=1e-5)
    t = torch.linspace(0, 1, 2_000_001, dtype=torch.float64)
    w = SpeeD(lam=0.6).bind(FlowSchedule()).weight(t)
    # the trapezoid rule on a function with one jump (at tau): error about the step 5e-7 times the jump 0.57
    assert float(torch.trapezoid(w, t)) == pytest.approx(expected_weight(0.6, tau, 1.0), abs=1e-6)


@pytest.mark.parametrize("lam, tau, k", [(0.6, "auto", 5.0), (1.0, 0.7, 2.0)])
def test_the_mean_weight_of_speeds_own_draws(lam, tau, k):
    strategy = SpeeD(tau=tau, k=k, dual=False, lam=lam).bind(FlowSchedule())
    strategy.manual_seed(0)
    n = 200_000
    t = strategy.sample(n)
    mean = float(strategy.weight(t).double().mean())
    eps = lam * math.sqrt(math.log(2 / ALPHA) / (2 * n))
    assert abs(mean - expected_weight(lam, strategy.resolved_tau, k)) < eps
    # and the draws tell the k apart: uniform t would give a mean outside the band
    assert abs(expected_weight(lam, strategy.resolved_tau, 1.0) - expected_weight(lam, strategy.resolved_tau, k)) > 2 * eps


@pytest.mark.parametrize("tau", [np.float32(0.9), torch.tensor(0.9).item(), np.float64(0.9)])
def test_a_flow_tau_given_as_a_numpy_float_is_a_flow_time(tau):
    strategy = SpeeD(tau=tau).bind(FlowSchedule())
    assert strategy.resolved_tau == pytest.approx(0.9) and isinstance(strategy.resolved_tau, float)
