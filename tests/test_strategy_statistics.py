"""Every sampler against the distribution it states, every resume against an uninterrupted run, and weights that
must fit the float32 tables and steps they are applied in.

Draws are compared with the sampler's own exact distribution (``probabilities()`` on a DDPM schedule, ``cdf_at`` on a
flow) at fixed seeds: Pearson's chi-square with the steps expecting fewer than 5 draws pooled (``chi_square_ok``, as
the study strategies' tests use it), KS for flow times. The level 1e-4 keeps a correct sampler from failing by chance
(once in 10^4 seeds).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from scipy import stats

from lightning_speed.flow import FlowSchedule
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.timesteps import (
    CLTSSampling, CosMapSampling, CurriculumSampling, EDMLogNormalSampling, LaplaceLogSNRSampling, LogitNormalSampling,
    LossAwareSampling, LossDecreaseSampling, ModeSampling, P2Weighting, SpeeD, StratifiedSampling, TimestepStrategy,
    UniformSampling,
)

from test_study_strategies import chi_square_ok  # pytest puts tests/ on sys.path

LINEAR = NoiseSchedule.from_name("linear", 1000)
LEVEL = 1e-4


DDPM_SAMPLERS: dict[str, Callable[[], object]] = {
    "logit_normal": lambda: LogitNormalSampling(0.3, 1.5),
    "speed_dual": lambda: SpeeD(k=10, lam=None),
    "speed_auto": lambda: SpeeD(tau="auto", dual=False, lam=None),
    "laplace": lambda: LaplaceLogSNRSampling(),
    "edm": lambda: EDMLogNormalSampling(),
    "curriculum": lambda: CurriculumSampling(SpeeD(lam=None), switch=1.0),
}


@pytest.mark.parametrize("name", sorted(DDPM_SAMPLERS))
def test_ddpm_draws_follow_the_stated_probabilities(name: str) -> None:
    strategy = TimestepStrategy(LINEAR)
    strategy.install(DDPM_SAMPLERS[name]())
    sampler = strategy.sampler
    sampler.set_step(400, 1000)  # a curriculum at a = 0.6; the others ignore it
    sampler.manual_seed(11)
    t = strategy.sample(200_000)
    statistic, threshold = chi_square_ok(t, sampler.probabilities().double().numpy(), LEVEL)  # and none without mass
    assert statistic < threshold


FLOW_SAMPLERS: dict[str, Callable[[], object]] = {
    "uniform": UniformSampling,
    "logit_normal": lambda: LogitNormalSampling(0.3, 1.5),
    "mode": ModeSampling,
    "cosmap": CosMapSampling,
    "laplace": LaplaceLogSNRSampling,
    "edm": EDMLogNormalSampling,
    "speed_dual": lambda: SpeeD(k=10, lam=None),
    "speed_tau": lambda: SpeeD(tau=0.4, dual=False, lam=None),
    "curriculum": lambda: CurriculumSampling(SpeeD(lam=None), switch=1.0),
}


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("name", sorted(FLOW_SAMPLERS))
def test_flow_draws_follow_the_stated_cdf(name: str, shift: float) -> None:
    """KS of what TimestepStrategy.sample returns (clamped to [2^-24, 1 - 2^-24]) against ``cdf_at``."""
    strategy = TimestepStrategy(FlowSchedule(shift))
    strategy.install(FLOW_SAMPLERS[name]())
    sampler = strategy.sampler
    sampler.set_step(400, 1000)
    sampler.manual_seed(12)
    t = strategy.sample(50_000).double().numpy()
    assert stats.kstest(t, lambda x: sampler.cdf_at(torch.as_tensor(x)).numpy()).pvalue > LEVEL


RESUMABLE: dict[str, Callable[[], object]] = {
    "uniform": UniformSampling,
    "logit_normal": LogitNormalSampling,
    "speed": lambda: SpeeD(lam=None),
    "loss_aware": lambda: LossAwareSampling(history=2, bins=10),
    "loss_decrease": lambda: LossDecreaseSampling(bins=4, fast=0.5, slow=0.9, min_count=5.0, reweight=True),
    "curriculum": lambda: CurriculumSampling(SpeeD(lam=None)),
    "stratified_loss_aware": lambda: StratifiedSampling(LossAwareSampling(history=2, bins=10)),
    "clts": lambda: CLTSSampling(total_steps=50),
}


def _train(strategy: TimestepStrategy, start: int, steps: int) -> list[torch.Tensor]:
    """Seeded steps with losses that fall over time and differ across t (so the adaptive samplers adapt)."""
    out = []
    for step in range(start, start + steps):
        strategy.sampler.set_step(step, 50)
        t = strategy.sample(32)
        scale = 1000.0 if strategy.process == "ddpm" else 1.0
        strategy.loss(t, torch.exp(-t.float() / scale) * 20.0 / (step + 1))
        out += [t, strategy.last.weight]
    return out


@pytest.mark.parametrize("process", ["ddpm", "flow"])
@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_a_resumed_sampler_draws_and_weighs_what_an_uninterrupted_one_does(name: str, process: str) -> None:
    schedule = LINEAR if process == "ddpm" else FlowSchedule(3.0)
    if process == "flow" and name in ("clts", "stratified_loss_aware"):
        pytest.skip("no flow form")

    def fresh(seed: int) -> TimestepStrategy:
        strategy = TimestepStrategy(schedule)
        strategy.install(RESUMABLE[name]())
        strategy.sampler.manual_seed(seed)
        return strategy

    straight = fresh(5)
    _train(straight, 0, 20)
    saved = copy.deepcopy(straight.sampler.extra_state())
    expected = _train(straight, 20, 20)
    resumed = fresh(99)  # another seed: everything must come from the saved state
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.sampler.load_extra_state(saved)
    got = _train(resumed, 20, 20)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_the_default_dtype_changes_no_draw_and_no_weight(name: str, dtype: torch.dtype) -> None:
    """Bound and stepped under a half (or double) default dtype, as in a bf16-true run, every draw and applied weight
    is the float32 default's: the tables and statistics are float32 whatever the default."""

    def run(default: torch.dtype) -> list[torch.Tensor]:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            strategy = TimestepStrategy(LINEAR)
            strategy.install(RESUMABLE[name](), P2Weighting())
            strategy.sampler.manual_seed(3)
            return _train(strategy, 0, 15)
        finally:
            torch.set_default_dtype(previous)

    reference = run(torch.float32)
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(reference, run(dtype)))


# ------------------------------------------------------------------------------ weights that fit float32
def test_ddpm_weights_beyond_float32_are_refused_when_bound() -> None:
    """P2 with k 0.5 and gamma 1000 reaches 0.5^-1000 = 1e301 where SNR -> 0: finite in the float64 build, inf in the
    float32 table, so the loss would be inf at the last ~650 steps of the linear schedule."""
    with pytest.raises(ValueError, match="beyond float32's range.*larger k or a smaller gamma"):
        P2Weighting(k=0.5, gamma=1000.0).bind(LINEAR)
    table = P2Weighting(k=0.5, gamma=100.0).bind(LINEAR).table  # 0.5^-100 = 1.3e30 fits
    assert bool(torch.isfinite(table).all())


def test_flow_weights_beyond_float32_are_refused_when_bound() -> None:
    """On a flow the weight scale (1 - t)^2 / (k + SNR)^gamma is computed per step in float32; with k 0.5 and
    gamma 1000 it is inf for t near 1."""
    t = 1 - torch.logspace(-3, -1, 50)
    assert not bool(torch.isfinite(P2Weighting(k=0.5, gamma=1000.0).flow_weight(t)).all())
    with pytest.raises(ValueError, match="beyond float32's range.*larger k or a smaller gamma"):
        P2Weighting(k=0.5, gamma=1000.0).bind(FlowSchedule())
    strategy = TimestepStrategy(FlowSchedule())
    strategy.install(None, P2Weighting(k=0.5, gamma=100.0))  # its largest weight, about 2^100 / (200 e), fits
    t = strategy.sample(4096)
    assert bool(torch.isfinite(strategy.weights.weight(t)).all())


# ------------------------------------------------------------------------------ seeds
@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_a_seed_the_generator_cannot_take_is_refused_when_given(seed: int) -> None:
    sampler = UniformSampling().bind(LINEAR)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"):
        sampler.manual_seed(seed)


def test_a_curriculum_takes_the_largest_seed() -> None:
    """Its early strategy is seeded with seed + 1, which wraps around at the top of the range."""
    draws = []
    for _ in range(2):
        curriculum = CurriculumSampling(LogitNormalSampling()).bind(LINEAR)
        curriculum.manual_seed(2**64 - 1)
        curriculum.set_step(10, 100)
        draws.append(curriculum.sample(64))
    assert torch.equal(draws[0], draws[1])
