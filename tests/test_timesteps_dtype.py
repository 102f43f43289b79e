"""Time-step strategies under a half-precision default dtype.

precision="bf16-true" makes bfloat16 the default dtype inside each training step (and inside ``Trainer.init_module``),
where ``TimestepStrategy.sample`` and ``loss`` run. bfloat16 holds 8 significant bits: a CDF over 1000 time steps or a
loss average kept in it would merge neighbouring steps or round away the changes it tracks, so every table and
statistic is float32 whatever the default dtype. The sampler tests run the same seeded work under float32 and under
bfloat16 defaults and assert identical results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from lightning_speed.callbacks.monitor import TimestepMonitor
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.timesteps import (
    LossAwareSampling, LossDecreaseSampling, StratifiedSampling, TimestepStrategy, UniformSampling,
)

LINEAR = NoiseSchedule.from_name("linear", 1000)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def test_uniform_probabilities_are_float32_under_a_bf16_default():
    """1 / 1000 in bfloat16 is 0.000999451: the table would not sum to 1."""
    sampler = UniformSampling().bind(LINEAR)
    with default_dtype(torch.bfloat16):
        probs = sampler.probabilities()
    assert probs.dtype == torch.float32
    assert torch.equal(probs, torch.full((1000,), 1.0 / 1000))


def test_stratified_uniform_draws_do_not_depend_on_the_default_dtype():
    """The stratified draw inverts the CDF of the inner's probabilities: from a bfloat16 CDF (and u rounded to
    bfloat16) about half of the 1000 time steps could never be drawn."""

    def draws(dtype: torch.dtype) -> torch.Tensor:
        strategy = TimestepStrategy(LINEAR)
        strategy.install(StratifiedSampling())
        strategy.sampler.manual_seed(0)
        with default_dtype(dtype):
            return torch.cat([strategy.sample(64) for _ in range(50)])

    reference, half = draws(torch.float32), draws(torch.bfloat16)
    assert torch.equal(half, reference)
    assert torch.unique(half).numel() > 900  # 3200 stratified draws reach nearly every step (about 960 expected)


def _train(build: Callable[[], object], bind_dtype: torch.dtype) -> torch.Tensor:
    """Bind under ``bind_dtype`` (as in a module built under Trainer.init_module), then 300 seeded steps."""
    with default_dtype(bind_dtype):
        strategy = TimestepStrategy(LINEAR)
        strategy.install(build())
    strategy.sampler.manual_seed(0)
    for step in range(300):
        t = strategy.sample(64)
        strategy.loss(t, (1.0 + t.float() / 1000) * (1.0 + 1.0 / (1.0 + 0.01 * step)))
    return strategy.sampler.probabilities()


def test_loss_aware_history_is_float32_when_bound_under_a_bf16_default():
    build = lambda: LossAwareSampling(history=2)  # noqa: E731
    probs = _train(build, torch.bfloat16)
    assert probs.dtype == torch.float32
    assert torch.equal(probs, _train(build, torch.float32))


def test_loss_decrease_averages_are_float32_when_bound_under_a_bf16_default():
    build = lambda: LossDecreaseSampling(min_count=10.0)  # noqa: E731
    probs = _train(build, torch.bfloat16)
    assert torch.equal(probs, _train(build, torch.float32))
    with default_dtype(torch.bfloat16):
        sampler = build().bind(LINEAR)
    assert all(getattr(sampler, name).dtype == torch.float32 for name in LossDecreaseSampling._STATE)


def test_the_monitor_counts_in_float32_under_a_bf16_default():
    """Its accumulators are made at fit start; in bfloat16 index_add_ of the float32 records fails, and a count
    stops growing at 256."""
    module = SimpleNamespace(timesteps=TimestepStrategy(LINEAR), device=torch.device("cpu"))
    monitor = TimestepMonitor(log_every_n_steps=10)
    with default_dtype(torch.bfloat16):
        monitor.on_fit_start(SimpleNamespace(global_rank=0), module)
    t = torch.zeros(1000, dtype=torch.long)  # all in the acceleration area, and all the same step
    monitor._accumulate(t, torch.full((1000,), 0.5), torch.ones(1000))
    assert monitor._sums[:, 0].tolist() == [1000.0, 500.0, 1000.0]
    assert monitor._t_counts[0].item() == 1000.0
    with default_dtype(torch.bfloat16):  # the sampler's mass per area, read when a summary is written
        mass = monitor._sampler_mass(module)
    # a float32 sum of at most 1000 terms: relative error below 1000 x 2^-24 = 6e-5 (bfloat16's alone is 4e-3)
    assert torch.allclose(mass, torch.bincount(monitor._area_of_t, minlength=3) / 1000.0, rtol=1e-4, atol=0.0)
