"""A curriculum over sampling strategies: a shaped one early in training, uniform t later.

Middle-biased strategies (logit-normal, SpeeD's asymmetric sampling) speed up early training but can end
worse than uniform t, which keeps refining the steps they draw rarely (Curriculum Sampling, Sun 2026:
logit-normal, then a switch to uniform). ``CurriculumSampling`` draws each sample's t from the early
strategy with probability a(step) and uniformly otherwise:

    p_step(t) = a(step) p_early(t) + (1 - a(step)) / T,

with a(step) = max(0, 1 - step / anneal_steps) (``shape="linear"``) or a(step) = 1 before
``anneal_steps`` and 0 from it on (``shape="step"``, the two phases of Curriculum Sampling), where
``anneal_steps = switch x max_steps``.

The mixture is per sample: both candidates are drawn and a device-side Bernoulli(a) mask picks one
(``torch.where``), which is exact and never syncs; a is a Python float from the step count. At a = 1
the early strategy's draw is returned as is (dual pairs included) and at a = 0 a uniform one.

On a flow (when the early strategy has a flow form) "uniform" is the flow's default: uniform u, then the
schedule's shift.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import Tensor
from typing_extensions import override

from lightning_speed.timesteps.base import (
    SEED_RANGE, SamplingStrategy, WrappedSampling, as_flow_times, check_run_length,
)
from lightning_speed.validation import check_choice, check_int, check_number

Shape = Literal["linear", "step"]
SHAPES = ("linear", "step")


def check_early(early: Any) -> SamplingStrategy:
    """The early strategy must sample only, from a fixed distribution: the curriculum neither forwards loss
    updates, importance weights and loss weights nor moves a step count of its own."""
    if not isinstance(early, SamplingStrategy):
        raise TypeError(
            "early must be a sampling strategy such as SpeeD(lam=None) or LogitNormalSampling(), got "
            f"{type(early).__name__}."
        )
    kind = type(early)
    if isinstance(early, WrappedSampling):
        raise ValueError(
            f"early must draw each t on its own, got {kind.__name__}, which draws through another strategy (a "
            "stratified batch, or a curriculum: the curriculum's mixing would break it): give that inner strategy "
            f"as early, e.g. CurriculumSampling({type(early.inner).__name__}(...))."
        )
    if early.acts_in_loss or kind.set_step is not SamplingStrategy.set_step:
        raise ValueError(
            f"early must draw from a fixed distribution, got {kind.__name__}, which changes with the losses or the "
            "step: use e.g. SpeeD(lam=None), LogitNormalSampling() or another table strategy."
        )
    if "sampling" not in early.roles:
        raise ValueError(
            f"early={early!r} draws uniform t, so the curriculum would be uniform from the start: give a strategy "
            "that shapes t, e.g. SpeeD(lam=None) (k != 1 or dual) or LogitNormalSampling()."
        )
    if early.roles != ("sampling",):
        raise ValueError(
            f"early={early!r} also weights the loss, which the curriculum would drop: give a strategy that only "
            "samples (SpeeD(lam=None) for SpeeD's sampling), and any weighting next to the curriculum."
        )
    return early


class CurriculumSampling(WrappedSampling):
    """``early``'s time steps at first, moving to uniform t by ``switch`` x ``max_steps`` (see the module docstring).

    Args:
        early: the sampling strategy that draws early t (a fixed distribution, sampling only:
            ``SpeeD(lam=None)``, ``LogitNormalSampling()``, ...); its tau is the curriculum's.
        switch: the fraction of ``trainer.max_steps`` at which t is uniform (0.5).
        shape: ``linear`` or ``step``.

    ``set_step(step, max_steps)`` moves it (``TimestepCallback`` calls it at every batch from the trainer).
    ``manual_seed(s)`` seeds this strategy with s (the mask and the uniform draws) and the early one with
    s + 1; both generators and the step are in ``extra_state``.
    """

    inner_state_key = "early"

    def __init__(self, early: SamplingStrategy, switch: float = 0.5, shape: Shape = "linear") -> None:
        super().__init__(check_early(early))
        self.switch = check_number(switch, "switch", above=0, at_most=1,
                                   hint="the fraction of max_steps at which t is uniform, e.g. 0.5")
        self.shape = check_choice(shape, "curriculum shape", SHAPES)
        self.anneal_steps = 1
        self.step = 0
        self._resumed_anneal_steps: int | None = None  # a checkpoint's annealing length, until the run's is known

    @property
    def early(self) -> SamplingStrategy:
        """The strategy that draws early t."""
        return self.inner

    @property
    def share(self) -> float:
        """a(step): the probability that a sample's t comes from the early strategy."""
        if self.shape == "step":
            return 1.0 if self.step < self.anneal_steps else 0.0
        return max(0.0, 1.0 - self.step / self.anneal_steps)

    @override
    def set_step(self, step: int, max_steps: int | None = None) -> None:
        """Move the curriculum to optimizer step ``step`` of ``max_steps`` (Python ints: no sync)."""
        max_steps = check_run_length(max_steps, "CurriculumSampling anneals to uniform t by switch x trainer.max_steps")
        self.step = check_int(step, "step", minimum=0, hint="the optimizer step, trainer.global_step")
        length = max(1, round(self.switch * max_steps))
        resumed, self._resumed_anneal_steps = self._resumed_anneal_steps, None
        if resumed is not None and resumed != length and self.step > 0:
            before = self.share  # still the checkpoint's length
            self.anneal_steps = length
            keep = (f"Set switch: {resumed / max_steps:.6g} to keep the curriculum." if resumed <= max_steps else
                    "The run now ends before the old switch step, so no switch keeps the curriculum.")
            warnings.warn(
                f"CurriculumSampling resumed at step {self.step} with trainer.max_steps={max_steps}, but it was "
                f"annealing to uniform t over {resumed} steps (switch {self.switch:g} of the run's length): the share "
                f"of early draws moves from a = {before:.2f} to {self.share:.2f}. {keep}",
                UserWarning, stacklevel=3,
            )
        self.anneal_steps = length

    @override
    def manual_seed(self, seed: int) -> None:
        super().manual_seed(seed)
        self.early.manual_seed(seed + 1 if seed + 1 < SEED_RANGE[1] else SEED_RANGE[0])  # wraps at the top seed

    def _uniform(self, n: int) -> Tensor:
        if self.process == "flow":
            return self.schedule.warp(torch.rand(n, device=self.device, generator=self.generator, dtype=torch.float32))
        return torch.randint(0, self.num_timesteps, (n,), device=self.device, generator=self.generator)

    @override
    def sample(self, n: int) -> Tensor:
        a = self.share
        if a <= 0.0:
            return self._uniform(n)
        early = self.early.sample(n)
        if a >= 1.0:
            return early
        uniform = self._uniform(n)
        keep = torch.rand(n, device=self.device, generator=self.generator, dtype=torch.float32) < a
        return torch.where(keep, early, uniform)

    @override
    def cdf_at(self, t: Any) -> Tensor:
        a, t = self.share, as_flow_times(t)
        return a * self.early.cdf_at(t) + (1.0 - a) * self.schedule.unwarp(t)

    @override
    def probabilities(self) -> Tensor:
        if self.process == "flow":
            return self.flow_probabilities()
        a = self.share
        return a * self.early.probabilities().to(self.device) + (1.0 - a) / self.num_timesteps

    @override
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "step": self.step, "anneal_steps": self.anneal_steps}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.step = int(state.get("step", 0))
        if "anneal_steps" in state:  # the checkpoint's curriculum, compared with the resumed run's at set_step
            self.anneal_steps = self._resumed_anneal_steps = int(state["anneal_steps"])
