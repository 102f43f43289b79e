"""The time-step strategy objects: formulas, sampled frequencies, roles, binding, state and errors.

Reference values are computed independently here with numpy / scipy from METHOD.md's formulas.
Chi-square tests use fixed seeds and bins of 20 time steps (expected counts in the hundreds).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import special, stats

from lightning_speed.flow import FlowSchedule
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.timesteps import base as timesteps_base
from lightning_speed.timesteps import (
    CLTSSampling,
    ConstantWeighting,
    LogitNormalSampling,
    LossAwareSampling,
    MinSNRWeighting,
    P2Weighting,
    SamplingStrategy,
    SpeeD,
    TableSampling,
    TableWeighting,
    TimestepStrategy,
    UniformSampling,
    WeightingStrategy,
    split_roles,
    weighted_loss,
)

T = 1000
CHOSEN_T = [0, 219, 699, 700, 999]


def steps(num_timesteps: int) -> NoiseSchedule:
    """A schedule with ``num_timesteps`` steps, for strategies that read only T."""
    return NoiseSchedule.from_name("constant", num_timesteps)


def asymmetric(schedule, tau=700, k=5.0, dual=True) -> SpeeD:
    """SpeeD's sampling alone, bound."""
    return SpeeD(tau, k, dual, lam=None).bind(schedule)


def change_aware(schedule, lam=0.6, tau=700) -> SpeeD:
    """SpeeD's weighting alone (uniform t), bound."""
    return SpeeD(tau, k=1.0, dual=False, lam=lam).bind(schedule)


class Table(TableSampling):
    """Draws from a given table (the tables of the strategies come from their schedule)."""

    def __init__(self, probs: torch.Tensor) -> None:
        self.given = probs

    def build(self, schedule, prediction):
        self.set_probabilities(self.given)


class Weights(TableWeighting):
    def __init__(self, weights: torch.Tensor) -> None:
        self.given = weights

    def build(self, schedule, prediction):
        self.set_weights(self.given)


def linear_alpha_bar(num_timesteps: int = T) -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, num_timesteps))


def chi_square_p(samples: torch.Tensor, expected_probs: np.ndarray, bin_width: int = 20) -> float:
    """p-value of the sampled counts against expected probabilities, in bins of ``bin_width`` t."""
    counts = np.bincount(samples.numpy(), minlength=expected_probs.size).astype(np.float64)
    observed = counts.reshape(-1, bin_width).sum(1)
    expected = expected_probs.reshape(-1, bin_width).sum(1) * counts.sum()
    return float(stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue)


@pytest.fixture(scope="module")
def linear() -> NoiseSchedule:
    return NoiseSchedule.from_name("linear", T)


# ------------------------------------------------------------------ asymmetric sampling
def asymmetric_reference(tau: int, k: float, num_timesteps: int = T) -> np.ndarray:
    p = np.where(np.arange(num_timesteps) < tau, k, 1.0)
    return p / (num_timesteps + tau * (k - 1))


def test_asymmetric_probabilities_match_formula(linear):
    sampler = asymmetric(linear, tau=700, k=5, dual=False)
    expected = asymmetric_reference(700, 5)
    np.testing.assert_allclose(sampler.probabilities().numpy(), expected, rtol=1e-6)
    assert expected[0] == pytest.approx(5 / 3800) and expected[999] == pytest.approx(1 / 3800)


def test_asymmetric_frequencies_chi_square(linear):
    sampler = asymmetric(linear, tau=700, k=5, dual=False)
    sampler.manual_seed(0)
    t = sampler.sample(400_000)
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < T
    assert chi_square_p(t, asymmetric_reference(700, 5)) > 1e-3
    # the same draws are clearly not uniform: the test can fail
    assert chi_square_p(t, np.full(T, 1.0 / T)) < 1e-12


def test_dual_pairs_follow_the_pivot_rule(linear):
    ab = linear_alpha_bar()
    pivot = int(np.flatnonzero(np.gradient(np.sqrt(1 - ab)) < 1e-4)[0]) + 1
    assert pivot == 642
    for tau in (700, 300):  # the pivot does not depend on tau
        sampler = asymmetric(linear, tau=tau, k=5, dual=True)
        sampler.manual_seed(1)
        for n in (64, 65, 2, 1):
            t = sampler.sample(n).numpy()
            half = n // 2 + 1
            assert t.shape == (n,)
            first, pairs = t[:half], t[half:]
            expected = np.where(first < pivot, pivot - first, first - pivot)[: n - half]
            np.testing.assert_array_equal(pairs, expected)
            assert (t >= 0).all() and (t < T).all()


def test_dual_primary_draws_follow_p(linear):
    sampler = asymmetric(linear, tau=700, k=5, dual=True)
    sampler.manual_seed(2)
    n = 2000
    primary = torch.cat([sampler.sample(n)[: n // 2 + 1] for _ in range(200)])
    assert chi_square_p(primary, asymmetric_reference(700, 5)) > 1e-3


def test_dual_probabilities_are_the_marginal_of_the_draws(linear):
    """The monitor logs probabilities() next to the sampled shares: with dual pairs it must be the
    mixture of p and the partners' distribution q, not p (which puts twice the mass on t >= tau)."""
    sampler = asymmetric(linear, tau=700, k=5, dual=True)
    p, pivot = asymmetric_reference(700, 5), sampler.pivot
    t = np.arange(T)
    q = np.bincount(np.where(t < pivot, pivot - t, t - pivot), weights=p, minlength=T)
    np.testing.assert_allclose(sampler.probabilities().double().numpy(), (p + q) / 2, atol=1e-7)  # float32 table
    assert float(sampler.probabilities()[700:].sum()) == pytest.approx(p[700:].sum() / 2, rel=1e-5)  # no partner lies above the pivot 642
    sampler.manual_seed(3)
    n, batches = 64, 2000  # a batch of 64: 33 draws from p, 31 partners
    drawn = torch.cat([sampler.sample(n) for _ in range(batches)])
    assert chi_square_p(drawn, (33 * p + 31 * q) / 64) > 1e-3
    assert chi_square_p(drawn, p) < 1e-12  # the table alone is clearly rejected: the test can fail
    assert asymmetric(linear, tau=700, k=5, dual=False).probabilities().double().numpy() == pytest.approx(p, rel=1e-6)


def test_auto_tau_uses_pivot(linear):
    sampler = asymmetric(linear, tau="auto", k=5)
    assert sampler.resolved_tau == 642 and sampler.pivot == 642 and sampler.tau == "auto"  # the setting is kept
    cosine = sampler.bind(NoiseSchedule.from_name("cosine", T))  # bound again: "auto" resolves on the new schedule
    assert cosine is sampler and cosine.resolved_tau == 959 and cosine.pivot == 959


def test_a_tau_well_before_the_schedules_convergence_warns_once(linear):
    """tau = 700 on the cosine schedule (pivot 959, alpha_bar_700 = 0.20) would treat a fifth of T that still
    holds x_0 as converged: a warning names the pivot and tau='auto'. The paper's 700 on the linear schedule,
    'auto' anywhere, and a tau after the pivot are silent."""
    import warnings

    cosine = NoiseSchedule.from_name("cosine", T)
    ab_700 = float(cosine.alpha_bar[700])
    assert 0.1 < ab_700 < 0.3  # the premise: far from pure noise
    with pytest.warns(UserWarning, match=rf"cosine schedule \(T = 1000\) converges only from t = 959 on: "
                      rf"alpha_bar at t = 700 is {ab_700:.3g}.*tau='auto' \(959 here\)"):
        asymmetric(cosine, tau=700)
    with pytest.warns(UserWarning, match="converges only from t = 959"):
        change_aware(cosine, tau=700)
    with warnings.catch_warnings(record=True) as caught:  # one warning for SpeeD's sampling and weights together
        warnings.simplefilter("always")
        SpeeD(tau=800).bind(cosine)
    assert len([w for w in caught if "converges only from" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SpeeD(tau=700).bind(linear)  # 700 >= 642 - 100
        asymmetric(linear, tau=543), asymmetric(cosine, tau="auto"), change_aware(cosine, tau=900)
    with pytest.warns(UserWarning, match="converges only from t = 642"):
        asymmetric(linear, tau=541)  # the edge: more than T / 10 before the pivot


# ------------------------------------------------------------------ weightings
def test_change_aware_weights_at_chosen_t(linear):
    ab = linear_alpha_bar()
    d = np.gradient(1 - ab)
    u = (d - d.min()) / (d.max() - d.min())
    lam, tau = 0.6, 700
    expected = np.where(np.arange(T) < tau, (1 - lam) + (2 * lam - 1) * u, 1.0)
    weighting = change_aware(linear, lam=lam, tau=tau)
    got = weighting.weight(torch.tensor(CHOSEN_T)).numpy()
    np.testing.assert_allclose(got, expected[CHOSEN_T], rtol=1e-6)
    assert got[1] == pytest.approx(lam, rel=1e-6)  # the rate peaks at t = 219: w = lambda
    assert got[3] == got[4] == 1.0
    auto = change_aware(linear, lam=0.8, tau="auto")
    assert auto.resolved_tau == 642
    assert auto.weight(torch.tensor([641])).item() < 1.0 and auto.weight(torch.tensor([642])).item() == 1.0
    table = change_aware(linear, lam=0.8, tau=700).table
    assert table[:700].min() >= 0.2 - 1e-6 and table[:700].max() <= 0.8 + 1e-6


def test_p2_weights_at_chosen_t(linear):
    ab = linear_alpha_bar()
    snr = ab / (1 - ab)
    got = P2Weighting().bind(linear).weight(torch.tensor(CHOSEN_T)).numpy()
    np.testing.assert_allclose(got, 1.0 / (1.0 + snr[CHOSEN_T]), rtol=1e-6)
    got = P2Weighting(k=0.5, gamma=2).bind(linear).weight(torch.tensor(CHOSEN_T)).numpy()
    np.testing.assert_allclose(got, 1.0 / (0.5 + snr[CHOSEN_T]) ** 2, rtol=1e-6)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_p2_weights_another_prediction_by_the_same_epsilon_objective(linear, prediction):
    """P2 is defined on the epsilon loss: on v (eps - eps_hat = alpha (v - v_hat)) its weight is P2 times
    SNR / (1 + SNR), on x0 (eps - eps_hat = -(alpha / sigma) (x0 - x0_hat)) P2 times SNR, so that w_pred ||pred error||^2
    equals P2 ||eps error||^2 for any prediction (float64 here; the table is float32: rtol 1e-6)."""
    ab = linear_alpha_bar()
    snr = ab / (1 - ab)
    p2 = 1.0 / (1.0 + snr)
    got = P2Weighting().bind(linear, prediction).weight(torch.tensor(CHOSEN_T)).numpy()
    np.testing.assert_allclose(got, (p2 * (snr / (1 + snr) if prediction == "v" else snr))[CHOSEN_T], rtol=1e-6)
    gen = torch.Generator().manual_seed(0)
    x0, eps, guess = (torch.randn(len(CHOSEN_T), 16, generator=gen, dtype=torch.float64) for _ in range(3))
    a = torch.tensor(ab[CHOSEN_T]).sqrt()[:, None]
    sigma = (1 - a**2).sqrt()
    x_t = a * x0 + sigma * eps
    target = a * eps - sigma * x0 if prediction == "v" else x0
    eps_hat = a * guess + sigma * x_t if prediction == "v" else (x_t - a * guess) / sigma
    on_prediction = torch.tensor(got, dtype=torch.float64) * (guess - target).pow(2).sum(1)
    on_epsilon = torch.tensor(p2[CHOSEN_T]) * (eps_hat - eps).pow(2).sum(1)
    torch.testing.assert_close(on_prediction, on_epsilon, rtol=2e-6, atol=0)


@pytest.mark.parametrize(
    ("prediction", "formula"),
    [
        ("epsilon", lambda snr: np.minimum(snr, 5) / snr),
        ("v", lambda snr: np.minimum(snr, 5) / (snr + 1)),
        ("x0", lambda snr: np.minimum(snr, 5)),
    ],
)
def test_min_snr_weights_at_chosen_t(linear, prediction, formula):
    ab = linear_alpha_bar()
    snr = ab / (1 - ab)
    got = MinSNRWeighting(gamma=5).bind(linear, prediction).weight(torch.tensor(CHOSEN_T)).numpy()
    np.testing.assert_allclose(got, formula(snr)[CHOSEN_T], rtol=1e-6)


def test_constant_weights_are_one():
    assert torch.equal(ConstantWeighting().weight(torch.tensor([0, 5])), torch.ones(2))


# ------------------------------------------------------------------ logit-normal and CLTS
def test_logit_normal_frequencies_match_formula():
    mean, std = 0.3, 1.2
    sampler = LogitNormalSampling(mean=mean, std=std).bind(steps(T))
    sampler.manual_seed(3)
    t = sampler.sample(400_000)
    edges = np.clip((np.arange(T + 1) - 0.5) / (T - 1), 0, 1)
    with np.errstate(divide="ignore"):
        cdf = stats.norm.cdf((special.logit(edges) - mean) / std)
    expected = np.diff(cdf)
    np.testing.assert_allclose(sampler.probabilities().numpy(), expected, atol=1e-7)
    assert chi_square_p(t, expected) > 1e-3
    assert chi_square_p(t, np.full(T, 1.0 / T)) < 1e-12


def clts_reference(step: int, total: int = 50_000, mu: float = 300.0, sigma: float = 200.0) -> np.ndarray:
    a = min(step / total, 1.0)
    g = np.exp(-0.5 * ((np.arange(T) - mu) / sigma) ** 2)
    return (1 - a) / T + a * g / g.sum()


def test_clts_frequencies_follow_the_curriculum():
    sampler = CLTSSampling().bind(steps(T))
    sampler.manual_seed(4)
    np.testing.assert_allclose(sampler.probabilities().numpy(), np.full(T, 1 / T), rtol=1e-5)
    for step in (25_000, 10**6):
        sampler.set_step(step)
        np.testing.assert_allclose(sampler.probabilities().numpy(), clts_reference(step), rtol=1e-4, atol=1e-9)
        t = sampler.sample(400_000)
        assert chi_square_p(t, clts_reference(step)) > 1e-3
    assert sampler.progress == 1.0  # capped
    assert chi_square_p(t, clts_reference(0)) < 1e-12


def test_clts_anneals_over_max_steps_unless_total_steps_is_set():
    """total_steps null follows the run's length (the paper's 50000 with no max_steps given); a set total_steps stays,
    with one warning when the run ends before the curriculum does."""
    run = CLTSSampling().bind(steps(T))
    for step in (0, 2_500, 10_000, 12_000):
        run.set_step(step, 10_000)
        assert run.progress == min(step / 10_000, 1.0)
        expected = clts_reference(step, total=10_000)
        np.testing.assert_allclose(run.probabilities().numpy(), expected, rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match=r"total_steps is null, but max_steps is -1: set trainer.max_steps .* or "
                                         r"total_steps \(the paper's 50000\)"):
        run.set_step(0, -1)  # a Trainer of no set length
    fixed = CLTSSampling(total_steps=50_000).bind(steps(T))
    with pytest.warns(UserWarning, match=r"total_steps=50000\) anneals past trainer.max_steps=10000: the run ends "
                                         r"with the curriculum at a = 0.20.*null"):
        fixed.set_step(0, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in (5_000, 10_000):  # once per run length
            fixed.set_step(step, 10_000)
            assert fixed.progress == step / 50_000
        CLTSSampling(total_steps=10).bind(steps(T)).set_step(3, 10)
        CLTSSampling(total_steps=10).bind(steps(T)).set_step(3, -1)  # no length to compare with


def test_clts_resumed_with_another_max_steps_says_how_its_curriculum_moves():
    """total_steps null: a checkpoint keeps the length annealed over; a resume with another max_steps warns with both
    mixing weights (2500 / 10000 = 0.25 -> 2500 / 20000 = 0.12) and the fix; the same length resumes quietly."""
    first = CLTSSampling().bind(steps(T))
    first.set_step(2_500, 10_000)
    state = first.extra_state()
    same = CLTSSampling().bind(steps(T))
    same.load_extra_state(state)
    assert same.progress == 0.25  # the checkpoint's curriculum before the run's length is known
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.set_step(2_500, 10_000)
    longer = CLTSSampling().bind(steps(T))
    longer.load_extra_state(state)
    with pytest.warns(UserWarning, match=r"resumed at step 2500 with trainer.max_steps=20000, but it was annealing "
                                         r"over 10000 steps.*from a = 0.25 to 0.12.*total_steps: 10000"):
        longer.set_step(2_500, 20_000)
    assert longer.progress == 2_500 / 20_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        longer.set_step(2_501, 20_000)  # once


def test_clts_scales_with_T():
    sampler = CLTSSampling(mu=300, sigma=200).bind(steps(100))
    sampler.set_step(50_000)
    assert int(torch.argmax(sampler.probabilities())) == 30


# ------------------------------------------------------------------ loss-aware sampling
def fill_history(sampler: LossAwareSampling, loss_of_t, batches: int, batch: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        t = torch.randint(0, sampler.num_timesteps, (batch,), generator=gen)
        sampler.update(t, loss_of_t(t))


def test_loss_aware_is_uniform_until_warm_then_second_moment():
    n_t = 50
    sampler = LossAwareSampling(history=10).bind(steps(n_t))
    sampler.manual_seed(5)
    loss_of_t = lambda t: (t.float() + 1.0) / n_t  # noqa: E731
    # every t but the last gets its 10 losses: still uniform, importance weights 1
    for _ in range(10):
        sampler.update(torch.arange(n_t - 1), loss_of_t(torch.arange(n_t - 1)))
    assert not bool(sampler.warm)
    np.testing.assert_allclose(sampler.probabilities().numpy(), np.full(n_t, 1 / n_t), rtol=1e-6)
    np.testing.assert_allclose(sampler.importance_weight(torch.arange(n_t)).numpy(), 1.0, rtol=1e-5)
    for _ in range(10):
        sampler.update(torch.tensor([n_t - 1]), loss_of_t(torch.tensor([n_t - 1])))
    assert bool(sampler.warm)
    second = np.sqrt(np.mean(sampler.loss_history.numpy() ** 2, axis=1))
    expected = second / second.sum() * (1 - 0.001) + 0.001 / n_t
    np.testing.assert_allclose(sampler.probabilities().numpy(), expected, rtol=1e-5)
    # proportional to the loss here, since each t saw a constant loss
    np.testing.assert_allclose(second, (np.arange(n_t) + 1.0) / n_t, rtol=1e-6)
    t = sampler.sample(200_000)
    assert chi_square_p(t, expected, bin_width=5) > 1e-3


def test_loss_aware_importance_weights_make_the_estimator_unbiased():
    n_t = 100
    sampler = LossAwareSampling().bind(steps(n_t))
    sampler.manual_seed(6)
    rng = np.random.default_rng(0)
    mean_loss = torch.tensor(rng.gamma(2.0, 1.0, n_t), dtype=torch.float32)
    noisy = lambda t: mean_loss[t] * (0.5 + torch.rand(t.shape, generator=torch.Generator().manual_seed(int(t.sum()))))  # noqa: E731
    fill_history(sampler, noisy, batches=40, batch=256)
    assert bool(sampler.warm)
    p = sampler.probabilities().double()
    assert not torch.allclose(p, torch.full_like(p, 1 / n_t))  # really non-uniform
    # exact: sum_t p(t) w(t) L(t) = mean_t L(t)
    w = sampler.importance_weight(torch.arange(n_t)).double()
    assert float((p * w * mean_loss.double()).sum()) == pytest.approx(float(mean_loss.mean()), rel=1e-5)
    # Monte Carlo: E_p[w L] = E_U[L], within 5 standard errors of the mean (two-sided false alarm 6e-7)
    t = sampler.sample(400_000)
    terms = (sampler.importance_weight(t) * mean_loss[t]).double()
    standard_error = float(terms.std()) / terms.numel() ** 0.5
    assert abs(float(terms.mean()) - float(mean_loss.mean())) < 5 * standard_error
    naive = mean_loss[t].double().mean()  # without the weights it is biased
    assert abs(float(naive) - float(mean_loss.mean())) > 0.05 * float(mean_loss.mean())


def reference_history(n_t: int, size: int, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """Python loop over the batch in order: a ring buffer of the last ``size`` losses per t."""
    history = np.zeros((n_t, size), dtype=np.float32)
    counts = np.zeros(n_t, dtype=np.int64)
    for t, losses in batches:
        for ti, li in zip(t.tolist(), losses.tolist()):
            if not np.isfinite(li):
                continue
            history[ti, counts[ti] % size] = li
            counts[ti] += 1
    return history, counts


def test_loss_aware_update_handles_duplicates_deterministically():
    n_t, size = 7, 3
    gen = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(6):
        t = torch.randint(0, n_t, (40,), generator=gen)  # ~6 duplicates of each t per batch
        losses = torch.rand(40, generator=gen)
        losses[3] = float("nan")  # ignored
        batches.append((t, losses))
    sampler = LossAwareSampling(history=size).bind(steps(n_t))
    for t, losses in batches:
        sampler.update(t, losses)
    history, counts = reference_history(n_t, size, batches)
    np.testing.assert_array_equal(sampler.counts.numpy(), counts)
    np.testing.assert_array_equal(sampler.loss_history.numpy(), history)
    assert torch.isfinite(sampler.probabilities()).all()


def test_loss_aware_state_round_trip():
    sampler = LossAwareSampling().bind(steps(20))
    sampler.manual_seed(8)
    fill_history(sampler, lambda t: t.float() + 1, batches=10)
    state = sampler.extra_state()
    expected_next = sampler.sample(50)
    restored = LossAwareSampling().bind(steps(20))
    restored.load_extra_state(state)
    torch.testing.assert_close(restored.probabilities(), sampler.probabilities())
    torch.testing.assert_close(restored.sample(50), expected_next)
    with pytest.raises(ValueError, match="same T and history"):
        LossAwareSampling().bind(steps(30)).load_extra_state(state)


def loss_aware_on(process: str, n_t: int, **kwargs) -> tuple[LossAwareSampling, torch.Tensor]:
    """A loss-aware sampler with ``n_t`` histories and one t that lands in each (its bins' centres on a flow)."""
    if process == "ddpm":
        return LossAwareSampling(**kwargs).bind(steps(n_t)), torch.arange(n_t)
    schedule = FlowSchedule(2.0)
    centres = schedule.warp((torch.arange(n_t, dtype=torch.float64) + 0.5) / n_t).float()
    sampler = LossAwareSampling(bins=n_t, **kwargs).bind(schedule)
    assert sampler.slot_of(centres).tolist() == list(range(n_t))
    return sampler, centres


def second_moment_probs(losses: np.ndarray, uniform_prob: float) -> np.ndarray:
    """p(t) = (1 - e) sqrt(E[L^2]) / sum + e / T over the rows of ``losses`` (one per t), in float64."""
    rms = np.sqrt(np.mean(np.asarray(losses, dtype=np.float64) ** 2, axis=1))
    return rms / rms.sum() * (1 - uniform_prob) + uniform_prob / rms.size


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_loss_aware_probabilities_are_the_second_moment_of_the_last_losses(process):
    """Losses that vary per t, so that sqrt(E[L^2]) is proportional neither to E[L] nor to the last or the
    largest loss; more rounds than the history, so only the last ``history`` count. The float32 path (squares,
    a mean over H, a sqrt, a sum over T, a division, the mix) rounds about H + T + 5 times, each within
    2^-24 relative: 64 x 2^-24 bounds the sum with room, far below the 1e-2 that the other moments differ by."""
    n_t, history, uniform_prob = 6, 4, 0.2
    sampler, t = loss_aware_on(process, n_t, history=history, uniform_prob=uniform_prob)
    # Round k: t alternates between a low and a high loss whose ratio grows with t (float32-exact values).
    rounds = np.array([[(1.0 + i) * (1.0 + (k % 2) * i) for k in range(history + 2)] for i in range(n_t)],
                      dtype=np.float32)
    rounds[:, -1] *= np.float32(0.5) ** np.arange(n_t)  # the last loss: not in the order of the others
    for k in range(rounds.shape[1]):
        sampler.update(t, torch.from_numpy(rounds[:, k]))
    last = rounds[:, -history:]
    expected = second_moment_probs(last, uniform_prob)
    rtol = 64 * 2.0**-24
    np.testing.assert_allclose(sampler.probs.double().numpy(), expected, rtol=rtol, atol=0)
    np.testing.assert_allclose(sampler.cdf.double().numpy(), np.cumsum(expected), rtol=rtol, atol=0)
    np.testing.assert_allclose(sampler.importance_weight(t).double().numpy(), 1 / (n_t * expected), rtol=rtol)
    for other in (last.mean(axis=1), last[:, -1], last.max(axis=1), (last**2).mean(axis=1)):
        wrong = other / other.sum() * (1 - uniform_prob) + uniform_prob / n_t
        assert np.max(np.abs(wrong / expected - 1)) > 1e-2  # the test tells these apart


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_loss_aware_stays_uniform_until_every_history_is_full(process):
    """history - 1 losses for every t: exactly uniform; one more each: the learned p. Then a second sampler
    with every t full but one, which has history - 1: still exactly uniform."""
    n_t, history = 5, 3
    losses = torch.arange(1.0, n_t + 1.0)
    sampler, t = loss_aware_on(process, n_t, history=history)
    uniform = torch.full((n_t,), 1.0 / n_t)
    for _ in range(history - 1):
        sampler.update(t, losses)
        assert not bool(sampler.warm)
        assert torch.equal(sampler.probs, uniform)
        assert torch.equal(sampler.cdf, timesteps_base.probabilities_to_cdf(uniform))
    sampler.update(t, losses)
    assert bool(sampler.warm)
    learned = second_moment_probs(np.tile(losses.numpy()[:, None], history), 0.001)
    np.testing.assert_allclose(sampler.probs.numpy(), learned, rtol=1e-6)
    almost, t = loss_aware_on(process, n_t, history=history)
    for _ in range(history - 1):
        almost.update(t, losses)
    almost.update(t[1:], losses[1:])  # every t but the first is full
    assert not bool(almost.warm) and torch.equal(almost.probs, uniform)
    almost.update(t[:1], losses[:1])
    assert bool(almost.warm) and not torch.equal(almost.probs, uniform)


def test_loss_aware_with_all_losses_zero_stays_uniform():
    """Warm but no loss anywhere: no second moment to normalise, so p stays uniform (importance weights 1)."""
    sampler = LossAwareSampling(history=2).bind(steps(4))
    for _ in range(2):
        sampler.update(torch.arange(4), torch.zeros(4))
    assert bool(sampler.warm)
    assert torch.equal(sampler.probs, torch.full((4,), 0.25))
    assert torch.equal(sampler.importance_weight(torch.arange(4)), torch.ones(4))


# ------------------------------------------------------------------ protocol, RNG, state
def test_weighted_loss_multiplies_weight_and_importance():
    sampler = LossAwareSampling(history=1).bind(steps(4))
    sampler.update(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))  # warm: p ~ L (+ mix)
    weighting = Weights(torch.tensor([0.5, 1.0, 1.5, 2.0])).bind(steps(4))
    t = torch.tensor([0, 3])
    losses = torch.tensor([2.0, 5.0])
    p = sampler.probabilities()
    loss, w = weighted_loss(sampler, weighting, t, losses)
    expected_w = torch.tensor([0.5, 2.0]) / (4 * p[t])
    torch.testing.assert_close(w, expected_w)
    torch.testing.assert_close(loss, (expected_w * losses).mean())
    assert int(sampler.counts[0]) == 2  # the sampler observed the losses



def test_weighted_loss_refuses_strategies_bound_to_other_schedules():
    """A weight table of another T would be read at the wrong steps (or out of range on a device)."""
    sampler = UniformSampling().bind(steps(4))
    t, losses = torch.tensor([0, 3]), torch.ones(2)
    for weighting, bound in ((Weights(torch.arange(8.0)).bind(steps(8)), "bound to NoiseSchedule"),
                             (ConstantWeighting().bind(FlowSchedule(1.0)), r"bound to FlowSchedule\(shift=1\)"),
                             (Weights(torch.ones(4)), "not bound")):
        with pytest.raises(ValueError, match=f"UniformSampling is bound to .* but {type(weighting).__name__} is {bound}"):
            weighted_loss(sampler, weighting, t, losses)


@pytest.mark.filterwarnings("ignore:TimestepStrategy.loss got time steps")
def test_strategy_loss_refuses_uint8_time_steps():
    """Indexing with uint8 selects by mask: t = (1, 1, 1, 1) would read the weights of steps 0 .. 3."""
    strategy = TimestepStrategy(steps(4))
    strategy.install(weighting=Weights(torch.tensor([0.5, 1.0, 1.5, 2.0])))
    with pytest.raises(ValueError, match="1-D integer tensor.*got torch.uint8.*as a mask"):
        strategy.loss(torch.ones(4, dtype=torch.uint8), torch.ones(4))
    assert strategy.last is None

def test_seeded_sampler_replays_and_resumes():
    a, b = UniformSampling().bind(steps(T)), UniformSampling().bind(steps(T))
    a.manual_seed(9)
    b.manual_seed(9)
    assert torch.equal(a.sample(100), b.sample(100))
    state = a.extra_state()
    expected = a.sample(100)
    c = UniformSampling().bind(steps(T))
    c.load_extra_state(state)
    assert torch.equal(c.sample(100), expected)


def test_rng_state_from_another_device_type_warns_and_reseeds():
    sampler = Table(torch.ones(10)).bind(steps(10))
    sampler.load_extra_state({"seed": 3, "rng": {"device_type": "cuda", "state": torch.zeros(16, dtype=torch.uint8)}})
    with pytest.warns(UserWarning, match="restarts from seed 3"):
        t = sampler.sample(20)
    fresh = Table(torch.ones(10)).bind(steps(10))
    fresh.manual_seed(3)
    assert torch.equal(t, fresh.sample(20))


def test_table_sampler_never_draws_zero_probability():
    probs = torch.zeros(10)
    probs[[0, 4, 9]] = torch.tensor([0.2, 0.5, 0.3])
    sampler = Table(probs).bind(steps(10))
    sampler.manual_seed(0)
    drawn = set(sampler.sample(20_000).tolist())
    assert drawn == {0, 4, 9}


def uniform_draws_at(monkeypatch, u: list[float]) -> None:
    """Make every torch.rand in the sampling code return ``u`` (its first n values), to reach exact boundaries."""
    def rand(n, *, device=None, dtype=None, generator=None):
        return torch.tensor(u[:n], dtype=dtype or torch.float32, device=device)

    monkeypatch.setattr(timesteps_base.torch, "rand", rand)


def test_inverse_cdf_sample_skips_zero_probability_at_the_boundaries(monkeypatch):
    """u exactly on a CDF value goes to the next index with mass: p = (0, 0.5, 0, 0.5) draws 1 for u in [0, 0.5)
    and 3 for u in [0.5, 1), never the empty 0 (u = 0) or 2 (u = 0.5)."""
    cdf = torch.tensor([0.0, 0.5, 0.5, 1.0])
    below = lambda x: float(np.nextafter(np.float32(x), np.float32(0)))  # noqa: E731
    u = [0.0, 0.5, 0.25, below(0.5), below(1.0)]
    uniform_draws_at(monkeypatch, u)
    assert timesteps_base.inverse_cdf_sample(cdf, len(u)).tolist() == [1, 3, 1, 1, 3]


def test_binned_flow_draws_skip_empty_bins_at_the_boundaries(monkeypatch):
    """The flow form draws its bin the same way: u = 0 and u = 0.5 on bins of mass (0, 0.5, 0, 0.5) land at the
    start of bins 1 and 3 (the same u places the point inside the bin), then the shift."""
    schedule = FlowSchedule(2.0)
    uniform_draws_at(monkeypatch, [0.0, 0.5])
    t = timesteps_base.sample_binned_flow(schedule, torch.tensor([0.0, 0.5, 0.5, 1.0]), 2, None)
    torch.testing.assert_close(t, schedule.warp(torch.tensor([0.25, 3.5 / 4])), rtol=0, atol=0)


# ------------------------------------------------------------------ TimestepStrategy
def test_strategy_defaults_to_uniform_and_plain_mean(linear):
    strategy = TimestepStrategy(linear)
    assert isinstance(strategy.sampler, UniformSampling) and isinstance(strategy.weights, ConstantWeighting)
    assert strategy.tau is None and strategy.last is None and strategy.prediction == "epsilon"
    strategy.sampler.manual_seed(0)
    t = strategy.sample(400_000, "cpu")
    assert t.shape == (400_000,) and t.dtype == torch.long
    assert chi_square_p(t, np.full(T, 1.0 / T)) > 1e-3
    losses = torch.rand(8, dtype=torch.float64)
    loss = strategy.loss(t[:8], losses)
    assert loss.item() == pytest.approx(losses.mean().item(), rel=4 * np.finfo(np.float64).eps * 8)
    assert torch.equal(strategy.last.t, t[:8]) and torch.equal(strategy.last.loss, losses)
    assert torch.equal(strategy.last.weight, torch.ones(8))


@pytest.mark.filterwarnings("ignore:TimestepStrategy.loss got time steps")  # t chosen by hand on purpose
def test_strategy_loss_weights_only_the_weighted_part():
    """mean(imp * (w * weighted + unweighted)), with w = table[t] and imp = 1 / (T p(t))."""
    strategy = TimestepStrategy(NoiseSchedule.from_name("constant", 4))
    strategy.install(LossAwareSampling(history=1), Weights(torch.tensor([0.5, 1.0, 1.5, 2.0])))
    strategy.sampler.update(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))  # warm: p ~ L
    p = strategy.sampler.probabilities().clone()
    t = torch.tensor([0, 3, 3])
    mse, vlb = torch.tensor([2.0, 5.0, 1.0]), torch.tensor([0.25, 0.5, 4.0])
    loss = strategy.loss(t, mse, vlb)
    imp = 1.0 / (4 * p[t])
    w = torch.tensor([0.5, 2.0, 2.0])
    torch.testing.assert_close(loss, (imp * (w * mse + vlb)).mean())
    torch.testing.assert_close(strategy.last.weight, imp * w)
    torch.testing.assert_close(strategy.last.loss, mse + vlb)
    # the sampler observed the total loss: the history of t = 3 now holds the last one
    assert strategy.sampler.loss_history[3, 0].item() == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("t", "losses", "match"),
    [
        (torch.arange(4), torch.ones(4, 1), r"shaped \(B,\) = \(4,\) like t, got \(4, 1\).*flatten\(1\).mean\(1\).*\(B, B\)"),
        (torch.arange(4), torch.ones(3), r"got \(3,\)"),
        (torch.arange(4), torch.ones(()), r"got \(\)"),
        (torch.arange(4).view(4, 1), torch.ones(4, 1), "1-D integer tensor"),
        (torch.arange(4).float(), torch.ones(4), "1-D integer tensor"),
    ],
)
def test_strategy_loss_rejects_anything_but_per_sample_losses(linear, t, losses, match):
    strategy = TimestepStrategy(linear)
    with pytest.raises(ValueError, match=match):
        strategy.loss(t, losses)
    with pytest.raises(ValueError, match="1-D integer tensor|unweighted must hold one loss per sample"):
        strategy.loss(t, torch.ones(t.shape[0]) if t.ndim == 1 else losses, losses)
    assert strategy.last is None


@pytest.mark.parametrize(
    ("t", "weights", "error", "match"),
    [
        (torch.full((4,), T), None, ValueError, r"t must hold time steps in \[0, 1000\) for this T = 1000, got values from 1000"),
        (torch.tensor([-1, 0, 5, 9]), "speed", ValueError, r"from -1 to 9: pass what TimestepStrategy.sample returned, unchanged"),
        (torch.tensor([10, 20, 99, 100]), "small", ValueError, r"\[0, 10\) for this T = 10, got values from 10 to 100"),
        ([1, 2, 3, 4], None, TypeError, "t must be a 1-D integer tensor of time steps \\(B,\\), got list"),
        (torch.tensor([True, False, True, False]), None, ValueError, "1-D integer tensor.*got torch.bool"),
    ],
)
def test_strategy_loss_rejects_time_steps_it_cannot_have_drawn(linear, t, weights, error, match):
    """Type, dtype and shape always; values on the CPU only (reading a device tensor would sync every step)."""
    strategy = TimestepStrategy(NoiseSchedule.from_name("cosine", 10) if weights == "small" else linear)
    if weights is not None:  # a table lookup would index out of range or wrap around at t = -1
        strategy.install(weighting=SpeeD(tau=5 if weights == "small" else 700, k=1.0, dual=False))
    with pytest.raises(error, match=match):
        strategy.loss(t, torch.ones(4))
    assert strategy.last is None
    with pytest.raises(TypeError, match=r"weighted must be a tensor of per-sample losses shaped \(B,\) like t, got list"):
        strategy.loss(torch.arange(4), [1.0, 2.0, 3.0, 4.0])


@pytest.mark.parametrize(
    ("n", "error", "match"),
    [
        (torch.zeros(4, 2), TypeError, r"got a tensor of shape \(4, 2\): pass the batch size, sample\(len\(x0\), x0.device\)"),
        (4.0, TypeError, r"n \(the number of time steps to draw\) must be an integer, got 4.0 \(float\); pass the batch size"),
        (-1, ValueError, "must be an integer of at least 0, got -1"),
    ],
)
def test_strategy_sample_needs_a_count(linear, n, error, match):
    strategy = TimestepStrategy(linear)
    strategy.install(SpeeD())  # dual pairs drew n // 2 + 1 = 0 for n = -1: an empty batch
    with pytest.raises(error, match=match):
        strategy.sample(n, "cpu")


def test_strategy_loss_warns_once_when_t_was_not_drawn_by_its_sampler(linear):
    import warnings

    strategy = TimestepStrategy(linear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy.loss(torch.randint(0, T, (4,)), torch.ones(4))  # uniform sampler: torch.randint is the same
        strategy.install(SpeeD(lam=None))
        strategy.loss(strategy.sample(4, "cpu"), torch.ones(4))
    with pytest.warns(UserWarning, match=r"sample did not return, so the installed SpeeD does not choose.*"
                                         r"t = self.timesteps.sample\(len\(x\), x.device\)"):
        strategy.loss(torch.randint(0, T, (4,)), torch.ones(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy.loss(torch.randint(0, T, (4,)), torch.ones(4))  # once only


def test_strategy_objects_take_what_timestep_strategy_takes(linear):
    alphas_cumprod = linear.alpha_bar.float()
    torch.testing.assert_close(SpeeD().bind(alphas_cumprod).probs, SpeeD().bind(linear).probs)
    for make in (SpeeD, P2Weighting, MinSNRWeighting):
        torch.testing.assert_close(make().bind(alphas_cumprod).table, make().bind(linear).table, rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError, match=r"Cannot read a noise schedule from str.*NoiseSchedule.from_name\('linear', 1000\)"):
        SpeeD().bind("linear")


def test_strategy_takes_alphas_cumprod_and_diffusers_like_schedulers(linear):
    class Scheduler:  # what a diffusers scheduler offers
        alphas_cumprod = linear.alpha_bar.float()

    from_tensor = TimestepStrategy(linear.alpha_bar.float(), prediction="v")
    from_scheduler = TimestepStrategy(Scheduler())
    for strategy in (from_tensor, from_scheduler):
        # float32 rounding of alpha_bar: relative error ~ 6e-8, far below the 1e-6 checked here
        np.testing.assert_allclose(strategy.schedule.alpha_bar.numpy(), linear.alpha_bar.numpy(), rtol=1e-6)
    assert from_tensor.prediction == "v" and from_scheduler.schedule.name == "Scheduler"
    with pytest.raises(TypeError, match="NoiseSchedule.*alphas_cumprod"):
        TimestepStrategy([0.1, 0.2])
    with pytest.raises(ValueError, match="Unknown prediction 'score'; choose one of 'epsilon', 'v', 'x0'"):
        TimestepStrategy(linear, prediction="score")


def test_strategy_sample_moves_the_tables_to_the_batch_device(linear):
    strategy = TimestepStrategy(linear)
    strategy.install(SpeeD(), P2Weighting())
    cdf, table = strategy.sampler.cdf, strategy.weights.table
    assert strategy.sample(4, "cpu").device.type == "cpu"
    assert strategy.sampler.cdf is cdf and strategy.weights.table is table  # already there: nothing copied
    t = strategy.sample(4, torch.device("meta"))  # a device without data: moving is all that can happen
    assert t.device.type == "meta"
    assert strategy.sampler.cdf.device.type == "meta" and strategy.weights.table.device.type == "meta"


def test_bases_are_abstract():
    with pytest.raises(TypeError, match="abstract"):
        SamplingStrategy()
    with pytest.raises(TypeError, match="abstract"):
        WeightingStrategy()


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda s: SpeeD(tau=0), "at least 1"),
        (lambda s: SpeeD(tau=1000).bind(s), r"tau=1000 must be smaller than the schedule's number of time steps T=1000"),
        (lambda s: SpeeD(tau="late"), "'auto'"),
        (lambda s: SpeeD(k=0), "positive"),
        (lambda s: SpeeD(k=-1), "positive"),
        (lambda s: SpeeD(lam=0.4), r"lam must be a number in \[0.5, 1\], got 0.4; weights span \[1 - lam, lam\]"),
        (lambda s: SpeeD(lam=1.2), r"\[0.5, 1\]"),
        (lambda s: SpeeD(tau=5000, k=1.0, dual=False).bind(s), "smaller than"),
        (lambda s: MinSNRWeighting().bind(s, "score"), "Unknown prediction 'score'; choose one of 'epsilon'"),
        (lambda s: MinSNRWeighting(gamma=0), "positive"),
        (lambda s: LogitNormalSampling(std=0), "positive"),
        (lambda s: CLTSSampling(sigma=-1), "positive"),
        (lambda s: CLTSSampling(total_steps=0), "total_steps must be an integer of at least 1, got 0; the paper uses 50000"),
        (lambda s: LossAwareSampling(history=0), "history must be an integer of at least 1, got 0; the paper keeps 10"),
        (lambda s: LossAwareSampling(uniform_prob=0), r"uniform_prob must be a number in \(0, 1\], got 0.0; the paper mixes in 0.001"),
        (lambda s: P2Weighting(k=float("inf")), "P2's k must be a non-negative number, got inf; the official value is 1"),
        (lambda s: LogitNormalSampling(mean=float("nan")), "mean must be a finite number"),
        (lambda s: SpeeD().bind(steps(100)), r"SpeeD: tau=700 must be smaller .* T=100 .* tau was not given, so it is "
                                            r"the default 700, chosen for T = 1000 steps: give tau \('auto'"),
        (lambda s: SpeeD(tau=700).bind(steps(100)), r"^tau=700 must be smaller .* or 'auto' for \d+\)\.$"),
    ],
)
def test_bad_arguments_raise(linear, build, match):
    with pytest.raises(ValueError, match=match):
        build(linear)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda s: SpeeD(dual="false"), "dual must be true or false \\(a boolean\\), got 'false' \\(str\\)"),
        (lambda s: SpeeD(dual=1), "dual must be true or false"),
        (lambda s: SpeeD(k="5"), "k \\(the suppression intensity\\) must be a number, got '5'"),
        (lambda s: SpeeD(tau=700.0), r"tau must be 'auto', a time step .* got 700.0 \(float\)"),
        (lambda s: CLTSSampling(total_steps=True), "total_steps must be an integer, got True \\(bool\\)"),
        (lambda s: CLTSSampling(total_steps=5e4), "total_steps must be an integer"),
        (lambda s: LossAwareSampling(history=2.0), "history must be an integer"),
        (lambda s: SpeeD(lam=True), "lam must be a number, got True \\(bool\\)"),
        (lambda s: UniformSampling().manual_seed("1"), "seed must be an integer"),
    ],
)
def test_wrong_types_raise_type_errors(linear, build, match):
    with pytest.raises(TypeError, match=match):
        build(linear)


def test_strategy_reads_the_prediction_type_of_a_diffusers_scheduler(linear):
    from types import SimpleNamespace

    def scheduler(prediction_type):
        return SimpleNamespace(alphas_cumprod=linear.alpha_bar.float(), config=SimpleNamespace(prediction_type=prediction_type))

    assert TimestepStrategy(scheduler("v_prediction")).prediction == "v"
    assert TimestepStrategy(scheduler("sample")).prediction == "x0"
    assert TimestepStrategy(scheduler("epsilon")).prediction == "epsilon"
    assert TimestepStrategy(scheduler("v_prediction"), prediction="v").prediction == "v"
    with pytest.raises(ValueError, match=r"prediction='epsilon' but the scheduler was configured with prediction_type "
                                         r"'v_prediction'.*leave prediction unset or make them agree"):
        TimestepStrategy(scheduler("v_prediction"), prediction="epsilon")
    with pytest.raises(ValueError, match=r"prediction_type 'flow' has no counterpart.*epsilon, v_prediction, sample"):
        TimestepStrategy(scheduler("flow"))


# ------------------------------------------------------------------ CLTS's target must be a distribution over t
@pytest.mark.parametrize("mu", [50_000, 5_000, 1000, -300, -0.5, float("inf")])
def test_clts_mu_outside_the_time_steps_is_refused(mu):
    """mu = 50000 gave NaN probabilities (every t = 999), mu = 5000 all t in 884-999, mu = -300 was accepted."""
    from lightning_speed.timesteps import clts_gaussian

    match = r"mu must be a number in \[0, 1000\), got .*in steps of a T = 1000 process.*official value is 300"
    for build in (lambda: CLTSSampling(mu=mu), lambda: clts_gaussian(T, mu=mu)):
        with pytest.raises(ValueError, match=match):
            build()


def test_clts_mu_at_the_ends_of_the_range_is_a_distribution():
    for mu, peak in ((0, 0), (999, 999), (999.9, 999)):
        sampler = CLTSSampling(mu=mu, total_steps=1).bind(steps(T))
        sampler.set_step(1)
        p = sampler.probabilities()
        assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-5 and int(p.argmax()) == peak


@pytest.mark.parametrize(("num_timesteps", "mu", "sigma"), [(T, 300.5, 1e-4), (T, 999.9, 0.02), (100, 305, 0.05)])
def test_clts_gaussian_with_no_mass_on_any_step_is_refused(num_timesteps, mu, sigma):
    """A width far below one time step puts no probability on any integer t: 0 / 0 would give NaN."""
    from lightning_speed.timesteps import clts_gaussian

    match = rf"puts no probability on any time step t = 0..{num_timesteps - 1}.*use a larger sigma"
    for build in (lambda: clts_gaussian(num_timesteps, mu, sigma),
                  lambda: CLTSSampling(mu=mu, sigma=sigma).bind(steps(num_timesteps))):
        with pytest.raises(ValueError, match=match):
            build()


def test_clts_gaussian_checks_sigma_itself():
    from lightning_speed.timesteps import clts_gaussian

    with pytest.raises(ValueError, match="sigma must be a positive number, got -1.0"):
        clts_gaussian(T, sigma=-1)


# ------------------------------------------------------------------ roles, binding, installing
def test_speed_plays_both_roles_or_one_for_the_ablations(linear):
    assert SpeeD().roles == ("sampling", "weighting")
    assert SpeeD(lam=None).roles == ("sampling",)
    assert SpeeD(k=1, dual=False).roles == ("weighting",)
    assert SpeeD(k=1).roles == SpeeD(k=5, dual=False).roles == ("sampling", "weighting")  # dual pairs or k != 1 reshape t
    assert UniformSampling().roles == ("sampling",) and MinSNRWeighting().roles == ("weighting",)
    sampling_only = SpeeD(lam=None).bind(linear)
    assert torch.equal(sampling_only.weight(torch.tensor([0, 219, 999])), torch.ones(3))  # unit weights
    uniform = SpeeD(k=1, dual=False).bind(linear).probabilities()
    torch.testing.assert_close(uniform, torch.full((T,), 1 / T))


def test_split_roles_takes_one_sampling_and_one_weighting():
    speed, p2, logit = SpeeD(lam=None), P2Weighting(), LogitNormalSampling()
    assert split_roles(speed) == (speed, None)
    assert split_roles([p2, speed]) == (speed, p2)
    both = SpeeD()
    assert split_roles([both]) == (both, both)
    for strategies, error, match in [
        ([speed, logit], ValueError, "Only one sampling strategy can be active, but 2 are given: SpeeD, LogitNormalSampling"),
        ([SpeeD(), p2], ValueError, "Only one weighting strategy can be active.*SpeeD, P2Weighting.*SpeeD plays both roles"),
        ([SpeeD(tau=700, k=1, dual=False, lam=None)], ValueError, r"SpeeD\(tau=700, k=1.0, dual=False, lam=None\) neither samples nor weights"),
        ([], ValueError, "No time-step strategy given"),
        ([logit, "P2Weighting"], TypeError, "come from lightning_speed.timesteps.*got str"),
    ]:
        with pytest.raises(error, match=match):
            split_roles(strategies)


def test_install_binds_to_the_schedule_and_keeps_one_tau(linear):
    strategy = TimestepStrategy(linear, prediction="v")
    weighting = MinSNRWeighting()
    strategy.install(weighting=weighting)
    assert strategy.weights is weighting and isinstance(strategy.sampler, UniformSampling)  # the sampler is kept
    snr = linear.snr
    torch.testing.assert_close(weighting.table, (snr.clamp(max=5) / (snr + 1)).float())  # bound with the prediction v
    speed = SpeeD(tau="auto", lam=None)
    strategy.install(speed)
    assert strategy.sampler is speed and strategy.weights is weighting and strategy.tau == 642
    with pytest.raises(ValueError, match=r"disagree on tau \(SpeeD samples with tau=642, SpeeD weights with tau=700\)"):
        strategy.install(weighting=SpeeD(tau=700, k=1, dual=False))
    assert strategy.weights is weighting  # nothing installed
    strategy.install(weighting=SpeeD(tau=642, k=1, dual=False))  # "auto" and its value agree
    assert strategy.tau == 642


def test_install_refuses_a_strategy_in_a_role_it_does_not_play(linear):
    """A weighting given as the sampler (or the reverse) fails at install, not at the first sample or loss."""
    strategy = TimestepStrategy(linear)
    with pytest.raises(TypeError, match=r"install\(weighting=...\) takes a WeightingStrategy, but LogitNormalSampling "
                                        r"does no weighting \(it plays sampling\)"):
        strategy.install(weighting=LogitNormalSampling())
    with pytest.raises(TypeError, match=r"install\(sampling=...\) takes a SamplingStrategy, but MinSNRWeighting does "
                                        r"no sampling \(it plays weighting\)"):
        strategy.install(sampling=MinSNRWeighting())
    with pytest.raises(TypeError, match=r"but str does no sampling \(not a time-step strategy\)"):
        strategy.install(sampling="speed")
    # a SpeeD that draws uniform t (k 1, no dual pairs) plays weighting only: as the sampler its weights were lost
    with pytest.raises(TypeError, match=r"install\(sampling=...\) takes a SamplingStrategy, but SpeeD\(.*k=1.*dual=False"
                                        r".*\) does no sampling \(it plays weighting\)"):
        strategy.install(SpeeD(k=1, dual=False))
    assert isinstance(strategy.sampler, UniformSampling)  # nothing installed
    strategy.install(SpeeD(), SpeeD())  # SpeeD plays both


def test_a_strategy_names_what_it_lacks_before_it_is_bound(linear):
    with pytest.raises(AttributeError, match=r"SpeeD has no cdf before it is bound to a schedule: call SpeeD\(...\).bind"):
        SpeeD().sample(4)
    assert repr(SpeeD(tau="auto")) == "SpeeD(tau='auto', k=5.0, dual=True, lam=0.6)"
    assert repr(LossAwareSampling()) == "LossAwareSampling(history=10, uniform_prob=0.001, bins=100)"
