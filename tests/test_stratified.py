"""Low-discrepancy (stratified) time steps: ``StratifiedSampling``.

Exactly one u per stratum; the marginal of t is the inner sampler's (chi-square on independent draws, one per
batch, threshold at a false-alarm probability of 1e-6); the closed-form variance of a batch mean; delegation of
importance weights, updates and the step; resume; bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from scipy import stats

from lightning_speed.flow import FlowSchedule
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.timesteps import (
    CLTSSampling,
    CurriculumSampling,
    LogitNormalSampling,
    LossAwareSampling,
    LossDecreaseSampling,
    P2Weighting,
    SpeeD,
    StratifiedSampling,
    TimestepStrategy,
    UniformSampling,
)

from test_strategy_callbacks import Recorder, TinyDiffusion, asymmetric, change_aware, fit, install, loader, trainer
from test_study_strategies import FALSE_ALARM, _StopAt, chi_square_ok

LINEAR = NoiseSchedule.from_name("linear", 1000)
Z = float(stats.norm.isf(FALSE_ALARM / 2))  # two-sided normal bound with the chi-square tests' false-alarm rate


def stratified(inner: Any = None, schedule: Any = LINEAR, seed: int = 0) -> StratifiedSampling:
    sampler = StratifiedSampling(inner).bind(schedule)
    sampler.manual_seed(seed)
    return sampler


# --------------------------------------------------------------------------- strata
@pytest.mark.parametrize("n", [1, 7, 64, 1000])
def test_each_stratum_holds_exactly_one_u(n: int) -> None:
    uniform, shifted = stratified(schedule=FlowSchedule(1.0)), stratified(LogitNormalSampling(0.5, 1.5), FlowSchedule(3.0))
    for _ in range(20):
        t = uniform.sample(n)  # shift 1: t = u
        assert t.dtype == torch.float32
        assert torch.equal(torch.sort((t * n).floor().long()).values, torch.arange(n))
        u = shifted.cdf_at(shifted.sample(n))  # u = F(t) for any inner with a quantile
        assert torch.equal(torch.sort((u * n).floor().long()).values, torch.arange(n))


# --------------------------------------------------------------------------- the marginal
@pytest.mark.parametrize("inner", ["logit_normal", "speed_dual"])
def test_the_marginal_of_t_is_the_inner_one(inner: str) -> None:
    """Draws within a batch are dependent; one draw per batch (the (b mod n)-th, so every position is tested)
    gives independent draws, each with the marginal of its position."""
    strategy = LogitNormalSampling(0.3, 0.8) if inner == "logit_normal" else asymmetric(700, 5.0, dual=True)
    sampler, n, batches = stratified(strategy), 7, 40_000
    draws = torch.stack([sampler.sample(n)[b % n] for b in range(batches)])
    expected = strategy.probabilities().double().numpy()
    statistic, threshold = chi_square_ok(draws, expected / expected.sum())
    assert statistic < threshold, (statistic, threshold)


def test_the_inner_distribution_is_read_at_every_draw() -> None:
    sampler = stratified(CLTSSampling(mu=300.0, sigma=0.001, total_steps=10))
    sampler.set_step(0)
    assert len(set(sampler.sample(64).tolist())) == 64  # uniform at step 0: one t per stratum of 1000 / 64
    sampler.set_step(10)  # all the mass at t = 300
    assert torch.equal(sampler.sample(64), torch.full((64,), 300))


def test_the_variance_of_a_batch_mean_has_its_closed_form() -> None:
    """f(t) = t / T, uniform t, T = 1000, n = 8 (n divides T). Stratified: the sorted batch is floor(v T) + j T / n
    with v ~ U[0, 1 / n), so the batch mean varies only by floor(v T) / T: (1 / n^2 - 1 / T^2) / 12. i.i.d.:
    (1 - 1 / T^2) / (12 n). The sample variance of B batch means has relative sd sqrt((kurtosis - 1) / B):
    kurtosis 1.8 (a uniform) for the stratified means, at most 3 (a mean of n uniforms) for the i.i.d. ones."""
    T, n, batches = 1000, 8, 20_000
    sampler = stratified()
    means = torch.stack([sampler.sample(n) for _ in range(batches)]).double().div(T).mean(1)
    iid = UniformSampling().bind(LINEAR)
    iid.manual_seed(0)
    iid_means = iid.sample(n * batches).double().div(T).reshape(batches, n).mean(1)
    closed, iid_closed = (1 / n**2 - 1 / T**2) / 12, (1 - 1 / T**2) / (12 * n)
    assert float(means.var()) == pytest.approx(closed, rel=Z * (0.8 / batches) ** 0.5)
    assert float(iid_means.var()) == pytest.approx(iid_closed, rel=Z * (2 / batches) ** 0.5)
    assert float(means.var() / iid_means.var()) < 1.5 / n  # 1 / n: far below 1


# --------------------------------------------------------------------------- what the inner does in the loss
def test_importance_weights_updates_and_gathers_go_to_the_inner() -> None:
    """A warm loss-aware inner with p(t) proportional to the loss: imp(t) f(t) averages to f's uniform mean."""
    T, n, batches = 10, 5, 20_000
    inner = LossAwareSampling(history=1, uniform_prob=0.1)
    sampler = stratified(inner, NoiseSchedule.from_name("cosine", T))
    assert sampler.acts_in_loss and not stratified(LogitNormalSampling()).acts_in_loss
    sampler.update(torch.arange(T), torch.arange(1.0, T + 1.0))
    assert bool(inner.warm)
    probs = inner.probabilities().clone()
    assert float(probs[-1] / probs[0]) > 5  # far from uniform
    f = torch.linspace(0.0, 1.0, T) ** 2
    t = torch.stack([sampler.sample(n) for _ in range(batches)])
    imp = sampler.importance_weight(t)
    torch.testing.assert_close(imp, inner.importance_weight(t))
    estimates = (imp * f[t]).double().mean(1)
    assert abs(float(estimates.mean()) - float(f.double().mean())) < Z * float(estimates.std()) / batches**0.5
    gather = lambda x: x[None]  # noqa: E731
    sampler.all_gather = gather
    assert inner.all_gather is gather and sampler.all_gather is gather
    plain = stratified(LogitNormalSampling())
    plain.all_gather = gather
    assert plain.all_gather is None and "all_gather" not in vars(plain.inner)


def test_it_installs_next_to_a_weighting_with_the_inner_tau() -> None:
    strategy = StratifiedSampling(asymmetric(tau="auto"))
    module = TinyDiffusion()
    rec = fit(module, [install(strategy, change_aware(tau="auto"), seed=0)], steps=3)
    assert module.timesteps.sampler is strategy and module.timesteps.tau == 642 and strategy.resolved_tau == 642
    assert all(len(set(t.tolist())) == len(t) for t in rec.t)
    assert repr(strategy) == "StratifiedSampling(inner=SpeeD(tau='auto', k=5.0, dual=True, lam=None))"


# --------------------------------------------------------------------------- resume
def test_state_round_trip_replays_the_next_draws() -> None:
    schedule = NoiseSchedule.from_name("cosine", 20)
    make = lambda: stratified(LossAwareSampling(history=1), schedule, seed=5)  # noqa: E731
    sampler = make()
    for _ in range(4):
        t = sampler.sample(16)
        sampler.update(t, t.float() + 1.0)  # the inner's history is state too
    state = sampler.extra_state()
    assert state["seed"] == 5 and "inner" in state
    expected = sampler.sample(16)
    fresh = make()
    fresh.load_extra_state(state)
    assert torch.equal(fresh.sample(16), expected)


def test_resume_continues_the_same_time_steps(tmp_path: Path) -> None:
    total, stop = 8, 4
    make = lambda: install(StratifiedSampling(LossDecreaseSampling(bins=4, fast=0.5, slow=0.9, min_count=1.0)))  # noqa: E731
    module = lambda: TinyDiffusion(num_timesteps=20, schedule="cosine")  # noqa: E731
    pl.seed_everything(0)
    full = fit(module(), [make()], steps=total)
    pl.seed_everything(0)
    first = Recorder()
    first_trainer = trainer(total, [make(), first, _StopAt(stop)])
    first_trainer.fit(module(), loader())
    first_trainer.save_checkpoint(tmp_path / "stop.ckpt")
    pl.seed_everything(123)  # another global seed: the sampler's state must come from the checkpoint
    second = Recorder()
    trainer(total, [make(), second]).fit(module(), loader(), ckpt_path=tmp_path / "stop.ckpt")
    assert len(second.t) == total - stop
    for step, (a, b) in enumerate(zip(full.t, [*first.t, *second.t])):
        assert torch.equal(a, b), f"step {step} differs"


# --------------------------------------------------------------------------- the GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stratified_draws_never_sync_on_the_gpu() -> None:
    samplers = [stratified(), stratified(asymmetric(700, 5.0, dual=True)), stratified(LossAwareSampling(history=1)),
                stratified(CurriculumSampling(LogitNormalSampling())), stratified(LogitNormalSampling(), FlowSchedule(3.0))]
    strategies = []
    for s in samplers:
        strategy = TimestepStrategy(s.schedule)
        strategy.install(s)
        s.manual_seed(0)
        strategy.sample(4, "cuda")  # move the tables and build the generator outside the checked region
        strategies.append(strategy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (0, 50, 100):
            for strategy in strategies:
                strategy.sampler.set_step(step, 100)
                t = strategy.sample(256, "cuda")
                loss = strategy.loss(t, torch.rand(256, device="cuda"))
                assert t.is_cuda and loss.is_cuda
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(s.generator.device.type == "cuda" for s in samplers)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: StratifiedSampling(P2Weighting()), TypeError, "inner must be a sampling strategy.*got P2Weighting"),
        (lambda: StratifiedSampling(LogitNormalSampling), TypeError, "got the class LogitNormalSampling"),
        (lambda: StratifiedSampling(SpeeD()), ValueError, r"also weights the loss.*SpeeD\(lam=None\)"),
        (lambda: StratifiedSampling(LossAwareSampling()).bind(FlowSchedule(1.0)), ValueError,
         "LossAwareSampling has no flow quantile"),
        (lambda: StratifiedSampling(CurriculumSampling(LogitNormalSampling())).bind(FlowSchedule(1.0)), ValueError,
         "CurriculumSampling has no flow quantile"),
        (lambda: StratifiedSampling(asymmetric("auto", dual=True)).bind(FlowSchedule(1.0)), ValueError,
         r"dual partners.*use SpeeD\(dual=False\) on a flow"),
    ],
)
def test_bad_input_fails_with_a_clear_error(build: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build()
