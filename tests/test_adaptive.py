"""LossDecreaseSampling: its moving averages and progress against closed forms computed here in float64, its
draws against its own distribution (chi-square on the time steps, Kolmogorov-Smirnov on a flow), the unbiased
objective with ``reweight``, its checkpoint state, DDP's gathered losses, bad arguments, a CLI run of its study
file, and no host sync on the GPU."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_speed.flow import FlowSchedule
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.timesteps import LossDecreaseSampling, TimestepStrategy
from lightning_speed.timesteps.adaptive import PROGRESS_FLOOR

LINEAR = NoiseSchedule.from_name("linear", 1000)
ALPHA = 1e-4  # false-alarm rate of each statistical test


def bound(**kwargs) -> LossDecreaseSampling:
    return LossDecreaseSampling(**{"bins": 4, "min_count": 1.0, **kwargs}).bind(LINEAR)


def feed(sampler: LossDecreaseSampling, losses_per_bin, steps: int, per_bin: int = 2) -> None:
    """``steps`` updates; each puts ``per_bin`` samples in every bin, with loss ``losses_per_bin(step)[b]``."""
    edges = [0, 250, 500, 750]
    t = torch.tensor([edges[b] + 7 * i for b in range(4) for i in range(per_bin)])
    for step in range(steps):
        losses = torch.tensor([losses_per_bin(step)[b] for b in range(4) for _ in range(per_bin)], dtype=torch.float32)
        sampler.update(t, losses)


def decayed_mean(values: list[float], decay: float) -> float:
    """sum_k d^(K-1-k) x_k / sum_k d^(K-1-k), in float64."""
    K = len(values)
    w = np.array([decay ** (K - 1 - k) for k in range(K)])
    return float((w * np.array(values)).sum() / w.sum())


# -------------------------------------------------------------------------- closed forms
def test_progress_is_the_relative_gap_of_the_two_decayed_means() -> None:
    """Bin 0's loss falls linearly, bin 1's rises, bins 2 and 3 stay: r_0 = (m_slow - m_fast) / m_slow from the
    float64 sums here, r_1 = r_2 = r_3 = 0. 300 float32 multiply-adds carry a relative error near 300 x 6e-8,
    so 1e-4 bounds it with room to spare."""
    sampler, steps = bound(fast=0.9, slow=0.99), 300
    curve = [[2.0 - 0.004 * k, 1.0 + 0.001 * k, 0.5, 0.25] for k in range(steps)]
    feed(sampler, lambda k: curve[k], steps)
    column = [row[0] for row in curve]
    slow, fast = decayed_mean(column, 0.99), decayed_mean(column, 0.9)
    r = sampler.progress.double()
    assert r[0].item() == pytest.approx((slow - fast) / slow - PROGRESS_FLOOR, rel=1e-4)
    assert r[1:].tolist() == [0.0, 0.0, 0.0]
    # A linear fall of a per step: a decayed mean over K steps lags the last loss by
    # d / (1 - d) - K d^K / (1 - d^K) steps, so the gap is a times the difference of the two lags.
    def lag(d: float, K: int = steps) -> float:
        return d / (1 - d) - K * d**K / (1 - d**K)

    assert slow - fast == pytest.approx(0.004 * (lag(0.99) - lag(0.9)), rel=1e-9)


def test_probabilities_mix_the_progress_with_uniform_once_warm() -> None:
    """One bin progressing: p = (1 - e) + e / B there and e / B elsewhere; the table over the 1000 time steps
    spreads each bin's mass over its 250 steps."""
    sampler = bound(uniform_prob=0.2)
    feed(sampler, lambda k: [3.0 - 0.01 * k, 1.0, 1.0, 1.0], 50)
    expected = torch.tensor([0.8 + 0.05, 0.05, 0.05, 0.05])
    torch.testing.assert_close(sampler.bin_probs, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sampler.probabilities(), expected.repeat_interleave(250) / 250, rtol=1e-6, atol=1e-9)
    assert sampler.cdf[-1].item() == 1.0


def test_probabilities_are_proportional_to_the_progress_of_each_bin() -> None:
    """Two bins falling at different rates, one flat, one rising: r_b from the float64 decayed means here and
    p = (1 - e) r / sum(r) + e / B. Each float32 mean is K multiply-adds, each within 2^-24 relative, so r
    (about 1 - m_fast / m_slow) is off by at most 4 x 2K x 2^-24 = atol_r; p_b then by (1 + B) atol_r / sum(r)
    at most, far below the 0.4 by which p differs under sqrt(r), r^2 or all mass on the fastest bin."""
    K, e = 100, 0.2
    sampler = bound(fast=0.9, slow=0.99, uniform_prob=e)
    curve = [[2.0 - 0.004 * k, 1.5 - 0.001 * k, 1.0, 0.5 + 0.001 * k] for k in range(K)]
    feed(sampler, lambda k: curve[k], K)
    r = np.zeros(4)
    for b in range(4):
        column = [row[b] for row in curve]
        slow, fast = decayed_mean(column, 0.99), decayed_mean(column, 0.9)
        r[b] = max((slow - fast) / slow - PROGRESS_FLOOR, 0.0)
    assert r[0] > 3 * r[1] > 0 and r[2] == r[3] == 0
    atol_r = 8 * K * 2.0**-24
    np.testing.assert_allclose(sampler.progress.double().numpy(), r, rtol=0, atol=atol_r)
    p = (1 - e) * r / r.sum() + e / 4
    np.testing.assert_allclose(sampler.bin_probs.double().numpy(), p, rtol=0, atol=5 * atol_r / r.sum())


def test_warm_once_every_bin_holds_exactly_min_count() -> None:
    """One update of min_count samples per bin puts min_count, exactly, in every slow count: warm; one sample
    fewer in one bin: not yet."""
    sampler = bound(min_count=2.0)
    feed(sampler, lambda k: [1.0, 1.0, 1.0, 1.0], steps=1, per_bin=2)
    assert torch.equal(sampler.count_slow, torch.full((4,), 2.0)) and bool(sampler.warm)
    short = bound(min_count=2.0)
    short.update(torch.tensor([0, 7, 250, 257, 500, 507, 750]), torch.ones(7))
    assert not bool(short.warm)


def test_uniform_before_warm_and_without_progress() -> None:
    cold = bound(min_count=1e6)  # never warm within the test
    feed(cold, lambda k: [3.0 - 0.01 * k, 1.0, 1.0, 1.0], 50)
    assert cold.progress[0] > 0 and torch.equal(cold.bin_probs, torch.full((4,), 0.25))
    flat = bound()
    feed(flat, lambda k: [1.0, 2.0, 3.0, 4.0], 50)  # constant losses: no bin progresses, whatever the rounding
    assert torch.equal(flat.progress, torch.zeros(4)) and torch.equal(flat.bin_probs, torch.full((4,), 0.25))
    rising = bound()
    feed(rising, lambda k: [1.0 + 0.01 * k] * 4, 50)  # every loss rising: no progress either
    assert torch.equal(rising.bin_probs, torch.full((4,), 0.25))


def test_warm_waits_for_every_bin() -> None:
    """min_count counts decayed samples per bin: a bin never drawn keeps the sampler uniform."""
    sampler = bound(min_count=5.0)
    t = torch.tensor([0, 300, 600])  # bin 3 never seen
    for k in range(40):
        sampler.update(t, torch.tensor([3.0 - 0.05 * k, 1.0, 1.0]))
    assert not sampler.warm and torch.equal(sampler.bin_probs, torch.full((4,), 0.25))
    sampler.update(torch.tensor([900] * 10), torch.ones(10))
    assert sampler.warm and sampler.bin_probs[0] > 0.5


def test_non_finite_losses_are_left_out_of_the_averages() -> None:
    clean, dirty = bound(), bound()
    t = torch.tensor([10, 260, 510, 760])
    for k in range(20):
        losses = torch.tensor([2.0 - 0.05 * k, 1.0, 1.0, 1.0])
        clean.update(t, losses)
        dirty.update(torch.cat([t, torch.tensor([270, 20])]),
                     torch.cat([losses, torch.tensor([float("nan"), float("inf")])]))
    for name in LossDecreaseSampling._STATE:
        torch.testing.assert_close(getattr(dirty, name), getattr(clean, name), rtol=0, atol=0)


def test_unequal_bins_start_from_uniform_t_and_mix_it_in() -> None:
    """T = 10 in bins of 3, 4 and 3 steps: p(t) = 1 / T before warm (not 1 / 3 per bin, which gives each step of
    the wide bin 1 / 12), and the uniform share mixes in uniform t: p_b = (1 - e) r_b / sum(r) + e width_b / T.
    Float32 quotients of these small numbers are within 2 ulps."""
    sampler = LossDecreaseSampling(bins=3, min_count=1.0, uniform_prob=0.4, reweight=True).bind(
        NoiseSchedule.from_name("cosine", 10))
    assert sampler._width.tolist() == [3.0, 4.0, 3.0]
    torch.testing.assert_close(sampler.probabilities(), torch.full((10,), 0.1), rtol=2**-22, atol=0)
    torch.testing.assert_close(sampler.importance_weight(torch.arange(10)), torch.ones(10), rtol=2**-22, atol=0)
    for k in range(20):  # bin 1 alone progresses
        sampler.update(torch.tensor([0, 4, 8]), torch.tensor([1.0, 3.0 - 0.1 * k, 1.0]))
    torch.testing.assert_close(sampler.bin_probs, torch.tensor([0.4 * 0.3, 0.6 + 0.4 * 0.4, 0.4 * 0.3]),
                               rtol=2**-21, atol=0)
    loss_of_t = torch.linspace(0.5, 2.0, 10)
    imp = sampler.importance_weight(torch.arange(10))
    assert (sampler.probabilities() * imp * loss_of_t).sum().item() == pytest.approx(loss_of_t.mean().item(), rel=1e-6)


# -------------------------------------------------------------------------- draws
def test_draws_follow_the_table_over_time_steps() -> None:
    """Chi-square of 200k draws against p(t) over the bins, and uniformity inside the favoured bin."""
    sampler = bound(uniform_prob=0.3)
    feed(sampler, lambda k: [1.0, 3.0 - 0.01 * k, 1.0, 2.0 - 0.002 * k], 60)
    sampler.manual_seed(0)
    t = sampler.sample(200_000).numpy()
    assert t.min() >= 0 and t.max() < 1000
    observed = np.bincount(t // 250, minlength=4)
    p = sampler.bin_probs.double().numpy()
    expected = p / p.sum() * t.size
    assert stats.chisquare(observed, expected).pvalue > ALPHA
    inside = t[(t >= 250) & (t < 500)] - 250
    assert stats.chisquare(np.bincount(inside // 25, minlength=10)).pvalue > ALPHA


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_draws_follow_their_cdf(shift: float) -> None:
    """On a flow the bins split the unshifted time: draws are uniform inside a bin before the shift, so the
    exact CDF is piecewise linear there; KS with the DKW bound at ALPHA."""
    sampler = LossDecreaseSampling(bins=5, min_count=1.0, uniform_prob=0.1).bind(FlowSchedule(shift))
    u = torch.tensor([0.05, 0.25, 0.45, 0.65, 0.85])
    t_mid = FlowSchedule(shift).warp(u)
    for k in range(60):
        sampler.update(t_mid, torch.tensor([1.0, 1.0, 2.0 - 0.01 * k, 1.0, 1.0]))
    assert sampler.bin_probs.argmax().item() == 2 and sampler.bin_of(t_mid).tolist() == [0, 1, 2, 3, 4]
    sampler.manual_seed(1)
    t = np.sort(sampler.sample(200_000).double().numpy())
    assert 0.0 < t[0] and t[-1] < 1.0
    f = sampler.cdf_at(torch.from_numpy(t)).numpy()
    i = np.arange(1, t.size + 1)
    distance = max(np.max(i / t.size - f), np.max(f - (i - 1) / t.size))
    assert distance < math.sqrt(math.log(2 / ALPHA) / (2 * t.size))
    assert sampler.cdf_at(0.0).item() == 0.0 and sampler.cdf_at(1.0).item() == pytest.approx(1.0)


# -------------------------------------------------------------------------- the objective
@pytest.mark.parametrize("schedule", [LINEAR, FlowSchedule(2.0)], ids=["ddpm", "flow"])
def test_reweighting_keeps_the_uniform_objective(schedule) -> None:
    """sum_t p(t) imp(t) L(t) = the mean of L under uniform t, exactly (float32 sums of 1000 terms: 1e-5)."""
    sampler = LossDecreaseSampling(bins=4, min_count=1.0, reweight=True).bind(schedule)
    strategy = TimestepStrategy(schedule)
    strategy.install(sampler, None)
    probe = LINEAR if schedule is LINEAR else None
    t_bins = torch.tensor([10, 260, 510, 760]) if probe else schedule.warp(torch.tensor([0.1, 0.3, 0.6, 0.9]))
    for k in range(40):
        sampler.update(t_bins, torch.tensor([1.0, 3.0 - 0.02 * k, 1.0, 1.0]))
    assert sampler.bin_probs[1] > 0.5
    if probe:
        t = torch.arange(1000)
        p = sampler.probs
    else:  # midpoints of 1000 equal cells of the unshifted time: each carries mass p_b / 250
        u = (torch.arange(1000) + 0.5) / 1000
        t = schedule.warp(u)
        p = sampler.bin_probs[(u * 4).long()] / 250
    loss_of_t = torch.linspace(0.5, 2.0, 1000)
    imp = sampler.importance_weight(t)
    assert (p * imp * loss_of_t).sum().item() == pytest.approx(loss_of_t.mean().item(), rel=1e-5)
    assert LossDecreaseSampling(bins=4).bind(schedule).importance_weight(t) is None  # the default: no reweighting


# -------------------------------------------------------------------------- state, DDP, errors
def test_state_round_trip_gives_the_same_distribution_and_draws() -> None:
    sampler = bound()
    sampler.manual_seed(3)
    feed(sampler, lambda k: [2.0 - 0.01 * k, 1.0, 1.5 - 0.002 * k, 1.0], 30)
    sampler.sample(10)
    state = sampler.extra_state()
    copy = bound()
    copy.load_extra_state(state)
    torch.testing.assert_close(copy.bin_probs, sampler.bin_probs, rtol=0, atol=0)
    assert torch.equal(copy.sample(100), sampler.sample(100))
    with pytest.raises(ValueError, match=r"cover 4 bins but this sampler has 5: resume with bins=4"):
        LossDecreaseSampling(bins=5).bind(LINEAR).load_extra_state(state)


def test_gathered_losses_of_every_rank_enter_the_averages() -> None:
    """A two-rank gather (this rank's losses and another rank's) counts both, as one rank fed both would."""
    other = torch.tensor([5.0, 5.0, 5.0, 5.0])
    gathered, single = bound(), bound()
    gathered.all_gather = lambda x: torch.stack([x, torch.stack([x[0], other])])
    t = torch.tensor([10, 260, 510, 760])
    for k in range(10):
        losses = torch.tensor([2.0 - 0.05 * k, 1.0, 1.0, 1.0])
        gathered.update(t, losses)
        single.update(torch.cat([t, t]), torch.cat([losses, other]))
    for name in LossDecreaseSampling._STATE:
        torch.testing.assert_close(getattr(gathered, name), getattr(single, name), rtol=0, atol=0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"fast": 0.999, "slow": 0.99}, r"slow=0.99 must be closer to 1 than fast=0.999"),
    ({"bins": 1}, r"bins must be an integer of at least 2"),
    ({"fast": 1.0}, r"fast must be a number in \(0, 1\)"),
    ({"uniform_prob": 0.0}, r"uniform_prob must be a number in \(0, 1\]"),
    ({"reweight": "yes"}, r"reweight must be true or false"),
])
def test_bad_arguments_fail_at_construction(kwargs, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        LossDecreaseSampling(**kwargs)


def test_more_bins_than_time_steps_fail_at_bind() -> None:
    with pytest.raises(ValueError, match=r"bins=20 is more than the schedule's T = 10 time steps"):
        LossDecreaseSampling(bins=20).bind(NoiseSchedule.from_name("cosine", 10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_it_never_syncs_on_the_gpu() -> None:
    sampler = bound(reweight=True)
    strategy = TimestepStrategy(LINEAR)
    strategy.install(sampler, None)
    sampler.manual_seed(0)
    strategy.sample(4, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            t = strategy.sample(256, "cuda")
            loss = strategy.loss(t, torch.rand(256, device="cuda"))
            assert t.is_cuda and loss.is_cuda
    finally:
        torch.cuda.set_sync_debug_mode(0)
