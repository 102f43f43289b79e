"""Improved-DDPM variance math against closed forms derived by hand (float64, derived tolerances)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lightning_speed.schedules import NoiseSchedule
from lightning_speed.variance import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    interpolate_log_variance,
    learned_log_variance,
    normal_kl,
    posterior_mean,
    posterior_tables,
    respace,
    respaced_timesteps,
    vlb_terms,
)

from _fixtures import EPS64, cancellation, float64_rtol


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# -- Gaussian KL ------------------------------------------------------------------------------------
def test_kl_of_identical_gaussians_is_exactly_zero() -> None:
    mean, logvar = f64(-3.0, 0.0, 0.25, 7.0), f64(-9.0, 0.0, 1.5, 2.0)
    assert torch.equal(normal_kl(mean, logvar, mean, logvar), torch.zeros(4, dtype=torch.float64))


def test_kl_of_hand_computed_pairs() -> None:
    # KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2
    # N(0, 1) vs N(1, e^2): 1 + (1 + 1) / (2 e^2) - 1/2 = 1/2 + e^-2
    # N(1, 4) vs N(-1, 1):  -log 2 + (4 + 4) / 2 - 1/2 = 7/2 - log 2
    kl = normal_kl(f64(0.0, 1.0), f64(0.0, math.log(4.0)), f64(1.0, -1.0), f64(2.0, 0.0))
    expected = np.array([0.5 + math.exp(-2.0), 3.5 - math.log(2.0)])
    np.testing.assert_allclose(kl.numpy(), expected, rtol=float64_rtol(operations=10, amplification=4.0))


def test_kl_is_asymmetric_in_the_variances() -> None:
    """Swapping the roles changes the value (a wrong argument order would go unnoticed otherwise)."""
    a = normal_kl(f64(0.0), f64(0.0), f64(0.0), f64(math.log(4.0)))  # log 2 + 1/8 - 1/2
    b = normal_kl(f64(0.0), f64(math.log(4.0)), f64(0.0), f64(0.0))  # -log 2 + 2 - 1/2
    np.testing.assert_allclose([a.item(), b.item()], [math.log(2.0) - 0.375, 1.5 - math.log(2.0)],
                               rtol=float64_rtol(10, amplification=4.0))


# -- the posterior q(x_{t-1} | x_t, x0) ----------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_matches_bayes_rule_for_scalar_gaussians(name: str) -> None:
    """q(x_{t-1} | x0) = N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}) times q(x_t | x_{t-1}) = N(sqrt(a_t) x_{t-1}, b_t):
    precision 1/(1 - ab_{t-1}) + a_t / b_t, mean var * (sqrt(ab_{t-1}) x0 / (1 - ab_{t-1}) + sqrt(a_t) x_t / b_t).
    """
    s = NoiseSchedule.from_name(name, 1000)
    tables = posterior_tables(s)
    b, a, ab = s.betas.numpy(), s.alphas.numpy(), s.alpha_bar.numpy()
    ab_prev = ab[:-1]
    var = 1.0 / (1.0 / (1.0 - ab_prev) + a[1:] / b[1:])
    coef_x0 = var * np.sqrt(ab_prev) / (1.0 - ab_prev)
    coef_xt = var * np.sqrt(a[1:]) / b[1:]
    # The two routes agree only through ab_t = a_t ab_{t-1}; one rounding of that product is
    # amplified by 1 / (1 - ab_t) in 1 - ab_t.
    rtol = float64_rtol(operations=12, amplification=cancellation(ab, 1.0 - ab))
    np.testing.assert_allclose(tables.variance[1:].numpy(), var, rtol=rtol)
    np.testing.assert_allclose(tables.coef_x0[1:].numpy(), coef_x0, rtol=rtol)
    np.testing.assert_allclose(tables.coef_xt[1:].numpy(), coef_xt, rtol=rtol)
    # t = 0: x_{-1} is x0 itself.
    assert tables.variance[0].item() == 0.0 and tables.coef_xt[0].item() == 0.0
    assert tables.coef_x0[0].item() == pytest.approx(1.0, rel=float64_rtol(4, cancellation(ab[0], 1 - ab[0])))
    # The log variance is clipped at t = 0 to the value at t = 1; elsewhere it is the plain log.
    assert tables.log_variance[0].item() == tables.log_variance[1].item()
    np.testing.assert_allclose(tables.log_variance[1:].exp().numpy(), var, rtol=rtol)
    np.testing.assert_array_equal(tables.log_beta.numpy(), np.log(b))


def test_posterior_mean_uses_the_tables() -> None:
    tables = posterior_tables(NoiseSchedule.from_name("linear", 100))
    x0, x_t, t = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64), torch.tensor([0, 5, 99])
    mean = posterior_mean(tables, x0, x_t, t)
    for i, step in enumerate(t.tolist()):
        torch.testing.assert_close(mean[i], tables.coef_x0[step] * x0[i] + tables.coef_xt[step] * x_t[i], rtol=0, atol=0)
    # t = 0: the mean is x0 (coefficients 1 and 0), up to the rounding of b_0 / (1 - ab_0).
    ab0 = tables.coef_x0.new_tensor(1.0 - 1e-4)
    torch.testing.assert_close(mean[0], x0[0], rtol=float64_rtol(4, cancellation(ab0.numpy(), 1 - ab0.numpy())), atol=0)


def test_tables_move_to_float32() -> None:
    tables = posterior_tables(NoiseSchedule.from_name("linear", 100))
    moved = tables.to(dtype=torch.float32)
    assert all(a.dtype == torch.float32 and torch.equal(a, b.float()) for a, b in zip(moved, tables, strict=True))


# -- the learned variance (improved DDPM eq. 15) ------------------------------------------------
def test_variance_interpolation_endpoints_and_midpoint() -> None:
    s = NoiseSchedule.from_name("linear", 1000)
    tables = posterior_tables(s)
    t = torch.tensor([0, 1, 500, 999])
    ones = torch.ones(4, 1, 2, 2, dtype=torch.float64)
    upper = learned_log_variance(tables, ones, t)
    lower = learned_log_variance(tables, -ones, t)
    middle = learned_log_variance(tables, 0 * ones, t)
    assert torch.equal(upper[:, 0, 0, 0], s.betas[t].log())
    assert torch.equal(lower[:, 0, 0, 0], tables.log_variance[t])
    assert lower[0, 0, 0, 0].item() == tables.variance[1].log().item()  # clipped at t = 0
    torch.testing.assert_close(middle, (upper + lower) / 2, rtol=float64_rtol(4), atol=0)
    # v is not clamped: 3 extrapolates past the upper end by the width of the range.
    assert interpolate_log_variance(f64(3.0), f64(-2.0), f64(-1.0)).item() == 0.0


# -- Gaussian data: the optimal reverse step in closed form ---------------------------------------------
def _optimal_reverse(alpha_bar_prev: float, alpha_bar: float, mu: float, s2: float, x_t: torch.Tensor):
    """For x0 ~ N(mu, s2): E[x0 | x_t], Var[x0 | x_t], and the true p(x_{t-1} | x_t) = N(mean, var)
    from the joint Gaussian of (x_{t-1}, x_t), where x_t = sqrt(a) x_{t-1} + sqrt(1 - a) e with
    a = ab_t / ab_{t-1} (a respaced jump from t-1 to t is covered by the same formula)."""
    a = alpha_bar / alpha_bar_prev
    m_prev, p_prev = math.sqrt(alpha_bar_prev) * mu, alpha_bar_prev * s2 + 1.0 - alpha_bar_prev
    reverse_var = p_prev * (1.0 - a) / (a * p_prev + 1.0 - a)
    reverse_mean = m_prev + p_prev * math.sqrt(a) / (a * p_prev + 1.0 - a) * (x_t - math.sqrt(a) * m_prev)
    denom = alpha_bar * s2 + 1.0 - alpha_bar
    x0_mean = mu + s2 * math.sqrt(alpha_bar) / denom * (x_t - math.sqrt(alpha_bar) * mu)
    x0_var = s2 * (1.0 - alpha_bar) / denom
    return x0_mean, x0_var, reverse_mean, reverse_var


def _chain(respaced: int | None):
    s = NoiseSchedule.from_name("linear", 1000)
    if respaced is None:
        return s, torch.arange(1000)
    return respace(s, respaced)


@pytest.mark.parametrize("respaced", [None, 250], ids=["T1000", "respaced250"])
def test_optimal_gaussian_model_gives_the_hand_computed_kl(respaced: int | None) -> None:
    """Data x0 ~ N(mu, s^2). The best p(x_{t-1} | x_t) is the true reverse step N(m*, v*) (joint
    Gaussian of x_{t-1}, x_t). The tables give it too: m* = coef_x0 E[x0|x_t] + coef_xt x_t and
    v* = beta_tilde + coef_x0^2 Var[x0|x_t]. KL(q(x_{t-1}|x_t,x0) || N(m*, v*)) is quadratic in x0,
    so its mean over the two nodes E[x0|x_t] +- sqrt(Var[x0|x_t]) is its exact expectation over
    x0 | x_t, which simplifies to 1/2 log(v* / beta_tilde). The network's v that reaches v* is found
    by inverting the interpolation; it lies in [-1, 1] since beta_tilde <= v* <= b for s <= 1.
    """
    chain, original_t = _chain(respaced)
    tables = posterior_tables(chain)
    ab = chain.alpha_bar.numpy()
    original_ab = NoiseSchedule.from_name("linear", 1000).alpha_bar.numpy()
    mu, s2 = 0.3, 0.25
    x_t = torch.tensor([-1.7, -0.2, 0.0, 0.9, 2.4], dtype=torch.float64)
    for i in [1, 2, 10, 60, len(ab) // 2, len(ab) - 1]:
        # The independent route uses the ORIGINAL schedule at the kept steps, not the respaced betas.
        step, prev_step = int(original_t[i]), int(original_t[i - 1])
        x0_mean, x0_var, reverse_mean, reverse_var = _optimal_reverse(
            original_ab[prev_step], original_ab[step], mu, s2, x_t)
        t = torch.full((2,), i)
        coef_x0 = tables.coef_x0[i].item()
        model_var = tables.variance[i].item() + coef_x0**2 * x0_var
        model_mean = posterior_mean(tables, x0_mean.expand(2, -1), x_t.expand(2, -1), t)
        amp = cancellation(np.array([ab[i], 1.0]), 1.0 - ab[i])
        assert model_var == pytest.approx(reverse_var, rel=float64_rtol(20, amp))
        torch.testing.assert_close(model_mean[0], reverse_mean, rtol=float64_rtol(20, amp), atol=float64_rtol(20, amp))

        log_lo, log_hi = tables.log_variance[i].item(), tables.log_beta[i].item()
        v = 2.0 * (math.log(model_var) - log_lo) / (log_hi - log_lo) - 1.0
        assert -1.0 <= v <= 1.0 + float64_rtol(20, amp)
        log_var = learned_log_variance(tables, torch.full((2, 5), v, dtype=torch.float64), t)
        nodes = torch.stack([x0_mean - math.sqrt(x0_var), x0_mean + math.sqrt(x0_var)])
        bits = vlb_terms(tables, nodes, x_t.expand(2, -1), t, model_mean, log_var)

        expected = 0.5 * math.log(model_var / tables.variance[i].item()) / math.log(2.0)
        # The KL sums O(1) and O(|log var|) terms into a small result.
        amp_kl = cancellation(np.array([1.0, abs(log_lo), abs(log_hi)]), expected * math.log(2.0)) * amp
        assert bits.mean().item() == pytest.approx(expected, rel=float64_rtol(40, amp_kl))


def test_unit_variance_data_makes_beta_the_optimal_variance() -> None:
    """For x0 ~ N(0, 1) every x_t is N(0, 1), so Var[x_{t-1} | x_t] = 1 - a_t = b_t: the upper end (v = 1)."""
    s = NoiseSchedule.from_name("linear", 1000)
    tables = posterior_tables(s)
    ab = s.alpha_bar.numpy()
    x0_var = 1.0 - ab  # Var[x0 | x_t] for s = 1
    optimal = tables.variance[1:].numpy() + tables.coef_x0[1:].numpy() ** 2 * x0_var[1:]
    np.testing.assert_allclose(optimal, s.betas[1:].numpy(), rtol=float64_rtol(20, cancellation(ab, 1.0 - ab)))


def test_vlb_uses_the_decoder_at_t0_and_the_kl_elsewhere() -> None:
    tables = posterior_tables(NoiseSchedule.from_name("linear", 1000))
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (4, 3, 2, 2), generator=gen) / 127.5 - 1).double()
    x_t = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    mean = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64) * 0.1
    log_var = learned_log_variance(tables, torch.rand(4, 3, 2, 2, generator=gen, dtype=torch.float64) * 2 - 1,
                                   torch.tensor([0, 0, 7, 400]))
    t = torch.tensor([0, 0, 7, 400])
    bits = vlb_terms(tables, x0, x_t, t, mean, log_var)
    assert bits.shape == (4,)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1) / math.log(2.0)
    true_mean = posterior_mean(tables, x0, x_t, t)
    true_log_var = tables.log_variance[t].view(-1, 1, 1, 1)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1) / math.log(2.0)
    assert torch.equal(bits[:2], nll[:2]) and torch.equal(bits[2:], kl[2:])
    assert (bits >= 0).all()


def test_vlb_trains_the_variance_only() -> None:
    tables = posterior_tables(NoiseSchedule.from_name("linear", 1000))
    mean = torch.zeros(2, 1, 2, 2, requires_grad=True)
    v = torch.zeros(2, 1, 2, 2, requires_grad=True)
    t = torch.tensor([0, 300])
    x0 = torch.full((2, 1, 2, 2), 1 / 255)  # an 8-bit value next to the mean, so the decoder's bin is not floored
    tables32 = tables.to(dtype=torch.float32)
    vlb_terms(tables32, x0, torch.randn(2, 1, 2, 2), t, mean * 1.0, learned_log_variance(tables32, v, t)).sum().backward()
    assert mean.grad is None
    assert v.grad is not None and (v.grad != 0).all()


# -- the decoder (8-bit data in [-1, 1]) ------------------------------------------------------------------
def test_cdf_approximation_is_within_2e4_of_the_normal_cdf() -> None:
    x = torch.linspace(-10, 10, 200001, dtype=torch.float64)
    error = (approx_standard_normal_cdf(x) - torch.special.ndtr(x)).abs().max().item()
    assert error < 2e-4
    assert approx_standard_normal_cdf(f64(0.0)).item() == 0.5


@pytest.mark.parametrize("mean", [-1.3, -0.4, 0.0, 0.77, 1.05])
@pytest.mark.parametrize("scale", [0.01, 0.1, 1.0, 3.0])
def test_discretized_likelihood_sums_to_one_over_the_256_values(mean: float, scale: float) -> None:
    """Neighbouring bins share their edge, so the 256 probabilities telescope to 1 - 0 + (1 - 1)."""
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    log_p = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(scale)))
    total = log_p.exp().sum().item()
    # Shared edges are computed from x_k + 1/255 and x_{k+1} - 1/255, which differ by a few ulps of 1;
    # the CDF's slope is at most 1 / (sqrt(2 pi) scale), the approximation's ~ 1.1x that. Bins below
    # 1e-12 are floored to 1e-12.
    edge_error = 255 * 4 * EPS64 * 1.2 / (math.sqrt(2 * math.pi) * scale)
    floored = int((log_p <= math.log(1e-12) + 1e-9).sum())
    assert total == pytest.approx(1.0, abs=edge_error + floored * 1e-12 + 256 * EPS64)


def test_discretized_likelihood_edge_bins_are_open() -> None:
    """The lowest value owns (-inf, -1 + 1/255], the highest [1 - 1/255, inf)."""
    x = f64(-1.0, 1.0, 0.0)
    mean, log_scale = f64(0.0, 0.0, 0.0), f64(0.0, 0.0, 0.0)
    p = discretized_gaussian_log_likelihood(x, mean, log_scale).exp()
    cdf = approx_standard_normal_cdf
    np.testing.assert_allclose(p.numpy(), [cdf(f64(-1 + 1 / 255)).item(), 1 - cdf(f64(1 - 1 / 255)).item(),
                                           (cdf(f64(1 / 255)) - cdf(f64(-1 / 255))).item()], rtol=float64_rtol(8))


# -- respacing ----------------------------------------------------------------------------------------
def test_250_of_1000_is_the_iddpm_chain() -> None:
    """improved DDPM's rule: position i * (T - 1) / (steps - 1) rounded; 999 i / 249 never ends in .5
    (that needs 249 | 2 * 999 i with 83 | i, where it is an integer), so exact rounding is the rule."""
    kept = respaced_timesteps(1000, 250)
    expected = [round(Fraction(999 * i, 249)) for i in range(250)]
    assert all(Fraction(999 * i, 249) % 1 != Fraction(1, 2) for i in range(250))
    assert kept.tolist() == expected
    assert (kept[0].item(), kept[-1].item(), kept.numel(), kept.dtype) == (0, 999, 250, torch.long)
    assert set(torch.diff(kept).tolist()) == {4, 5}


@pytest.mark.parametrize(("T", "steps"), [(1000, 50), (1000, 1000), (100, 7), (10, 2), (4000, 250), (1000, 1)])
def test_respaced_timesteps_round_evenly_spaced_positions(T: int, steps: int) -> None:
    """(100, 7) has stride 16.5, so positions 16.5, 49.5, 82.5 are ties: rounded to even, as Python's round."""
    kept = respaced_timesteps(T, steps).tolist()
    stride = Fraction(T - 1, steps - 1) if steps > 1 else Fraction(1)
    assert kept == [round(i * stride) for i in range(steps)]
    assert kept[0] == 0 and len(set(kept)) == steps and (steps == 1 or kept[-1] == T - 1)


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_respacing_outside_one_to_T_is_a_clear_error(steps: int) -> None:
    with pytest.raises(ValueError, match=rf"Cannot respace 1000 diffusion steps into {steps}: choose between 1 and 1000"):
        respaced_timesteps(1000, steps)
    with pytest.raises(ValueError, match="Cannot respace"):
        respace(NoiseSchedule.from_name("linear", 1000), steps)


@pytest.mark.parametrize(
    ("name", "timesteps"),
    [("linear", 250), ("cosine", 250), ("linear", 2), ("cosine", [999, 0, 5, 17, 640])],
)
def test_respaced_alpha_bar_is_the_original_at_the_kept_steps(name: str, timesteps) -> None:
    """b'_i = 1 - ab_{t_i} / ab_{t_{i-1}} telescopes: prod (1 - b'_i) = ab_{t_i}. Each factor
    1 - (1 - r) is off by a few ulps of 1 (relative 1 / a'_i), and the cumulative product adds one
    rounding per step."""
    s = NoiseSchedule.from_name(name, 1000)
    chain, kept = respace(s, timesteps)
    assert torch.equal(kept, torch.sort(torch.as_tensor(timesteps).flatten()).values if not isinstance(timesteps, int)
                       else respaced_timesteps(1000, timesteps))
    n = kept.numel()
    alphas = chain.alphas.numpy()
    rtol = float64_rtol(operations=3 * n, amplification=float(np.max(1.0 / alphas)))
    np.testing.assert_allclose(chain.alpha_bar.numpy(), s.alpha_bar[kept].numpy(), rtol=rtol)
    assert chain.num_timesteps == n and "respaced" in chain.name


def test_respaced_posterior_is_bayes_rule_for_the_jump() -> None:
    """From s = t_{i-1} to t = t_i: q(x_t | x_s) = N(sqrt(ab_t / ab_s) x_s, 1 - ab_t / ab_s), so
    Var[x_s | x_t, x0] = 1 / (1 / (1 - ab_s) + (ab_t / ab_s) / (1 - ab_t / ab_s))."""
    s = NoiseSchedule.from_name("linear", 1000)
    chain, kept = respace(s, 250)
    tables = posterior_tables(chain)
    ab = s.alpha_bar.numpy()[kept.numpy()]
    jump = ab[1:] / ab[:-1]
    var = 1.0 / (1.0 / (1.0 - ab[:-1]) + jump / (1.0 - jump))
    coef_x0 = var * np.sqrt(ab[:-1]) / (1.0 - ab[:-1])
    coef_xt = var * np.sqrt(jump) / (1.0 - jump)
    amp = max(cancellation(ab, 1.0 - ab), cancellation(jump, 1.0 - jump))
    rtol = float64_rtol(operations=20, amplification=amp)
    np.testing.assert_allclose(tables.variance[1:].numpy(), var, rtol=rtol)
    np.testing.assert_allclose(tables.coef_x0[1:].numpy(), coef_x0, rtol=rtol)
    np.testing.assert_allclose(tables.coef_xt[1:].numpy(), coef_xt, rtol=rtol)


@pytest.mark.parametrize(
    ("timesteps", "match"),
    [([3], "at least 2 time steps"), ([0, 5, 5, 9], "with repeats"), ([0, 1000], r"in \[0, 999\]"), ([-1, 4], r"in \[0, 999\]")],
)
def test_bad_respacing_subsets_are_clear_errors(timesteps: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        respace(NoiseSchedule.from_name("linear", 1000), timesteps)


def test_zero_terminal_snr_keeps_every_table_and_the_respaced_chain_finite() -> None:
    """alpha_bar_{T-1} = 0 (b = 1 at the last step): beta_tilde, the coefficients and log b stay finite."""
    base = NoiseSchedule.from_name("linear", 1000).betas.clone()
    base[-1] = 1.0
    s = NoiseSchedule(base)
    tables = posterior_tables(s)
    assert all(torch.isfinite(table).all() for table in tables)
    assert tables.log_beta[-1].item() == 0.0
    chain, kept = respace(s, 250)
    assert chain.betas[-1].item() == 1.0 and chain.alpha_bar[-1].item() == 0.0
    assert all(torch.isfinite(table).all() for table in posterior_tables(chain))
