"""A curriculum over time-step samplers: a shaped sampler early in training, uniform t later.

Middle-biased samplers (logit-normal, SpeeD's asymmetric sampling) speed up early training but can end
worse than uniform t, which keeps refining the steps they draw rarely (Curriculum Sampling, Sun 2026:
logit-normal, then a switch to uniform). ``CurriculumSampler`` draws each sample's t from the early
sampler with probability a(step) and uniformly otherwise:

    p_step(t) = a(step) p_early(t) + (1 - a(step)) / T,

with a(step) = max(0, 1 - step / anneal_steps) (``shape="linear"``) or a(step) = 1 before
``anneal_steps`` and 0 from it on (``shape="step"``, the two phases of Curriculum Sampling).

The mixture is per sample: both candidates are drawn and a device-side Bernoulli(a) mask picks one
(``torch.where``), which is exact and never syncs; a is a Python float from the step count. At a = 1
the early sampler's draw is returned as is (dual pairs included) and at a = 0 a uniform one.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from typing_extensions import override

from lightning_speed.timesteps.base import DeviceTables, TimestepSampler
from lightning_speed.validation import check_choice, check_int, check_number

Shape = Literal["linear", "step"]
SHAPES = ("linear", "step")


def check_shape(shape: Any) -> str:
    return check_choice(shape, "curriculum shape", SHAPES)


def check_switch(switch: float) -> float:
    """The fraction of training at which t has become uniform."""
    return check_number(switch, "switch", above=0, at_most=1, hint="the fraction of max_steps at which t is uniform, e.g. 0.5")


def check_early(early: Any) -> TimestepSampler:
    """The early sampler must draw from a fixed distribution: the curriculum neither forwards loss
    updates and importance weights nor moves a step count of its own."""
    if not isinstance(early, TimestepSampler):
        raise TypeError(f"early must be a TimestepSampler, got {type(early).__name__}.")
    kind = type(early)
    adaptive = kind.update is not TimestepSampler.update or kind.importance_weight is not TimestepSampler.importance_weight
    if adaptive or hasattr(early, "set_step"):
        raise ValueError(
            f"early must draw from a fixed distribution, got {kind.__name__}, which changes with the losses or the "
            "step: use e.g. AsymmetricSampler, LogitNormalSampler or another table sampler."
        )
    return early


class CurriculumSampler(TimestepSampler):
    """Time steps from ``early`` at first, moving to uniform by ``anneal_steps`` (see the module docstring).

    Call ``set_step(step)`` once per optimizer step (the CurriculumSampling callback does, from
    ``trainer.global_step``). ``manual_seed(s)`` seeds this sampler with s (the mask and the uniform
    draws) and the early sampler with s + 1; both generators and the step are in ``extra_state``.
    """

    def __init__(self, early: TimestepSampler, anneal_steps: int, shape: Shape = "linear") -> None:
        self.early = check_early(early)
        super().__init__(early.num_timesteps)
        self.anneal_steps = check_int(anneal_steps, "anneal_steps", minimum=1)
        self.shape = check_shape(shape)
        self.tau: int | None = getattr(early, "tau", None)
        self.step = 0

    @property
    def share(self) -> float:
        """a(step): the probability that a sample's t comes from the early sampler."""
        if self.shape == "step":
            return 1.0 if self.step < self.anneal_steps else 0.0
        return max(0.0, 1.0 - self.step / self.anneal_steps)

    def set_step(self, step: int) -> None:
        """Move the curriculum to optimizer step ``step`` (a Python int: no sync)."""
        self.step = int(step)

    @override
    def to(self, device: torch.device | str) -> DeviceTables:
        self.early.to(device)
        return super().to(device)

    @override
    def manual_seed(self, seed: int) -> None:
        super().manual_seed(seed)
        self.early.manual_seed(seed + 1)

    @override
    def sample(self, n: int) -> Tensor:
        a = self.share
        if a <= 0.0:
            return torch.randint(0, self.num_timesteps, (n,), device=self.device, generator=self.generator)
        early = self.early.sample(n)
        if a >= 1.0:
            return early
        uniform = torch.randint(0, self.num_timesteps, (n,), device=self.device, generator=self.generator)
        keep = torch.rand(n, device=self.device, generator=self.generator) < a
        return torch.where(keep, early, uniform)

    @override
    def probabilities(self) -> Tensor:
        a = self.share
        return a * self.early.probabilities().to(self.device) + (1.0 - a) / self.num_timesteps

    @override
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "step": self.step, "early": self.early.extra_state()}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.early.load_extra_state(state.get("early", {}))
        self.set_step(int(state.get("step", 0)))
