"""Adaptive sampling by learning progress: draw t more where its loss is falling fastest right now.

Adaptive non-uniform sampling (Kim et al., CVPR 2025) favours the time steps whose updates reduce the
objective most, measured with extra loss evaluations and a learned sampling policy. ``LossDecreaseSampling``
keeps the idea and drops the extra cost: it reads the progress of each bin of t from the training losses
the step computes anyway. Per bin b it keeps two exponential moving averages of the loss, a fast one
(decay ``fast`` per step) and a slow one (``slow``), each as a decayed sum over a decayed count so that bins
visited rarely are averaged correctly. For a loss falling at a steady rate the two means lag by
d / (1 - d) steps, so

    r_b = max(m_slow,b - m_fast,b - floor m_slow,b, 0) / m_slow,b

is the relative decrease over the gap between those lags: a rate of learning, comparable across bins whose
losses differ by orders of magnitude (low t against high t). ``floor`` (1e-3) is a decrease too small to tell
from the rounding of float32 averages over a thousand steps (about 1e-4): without it, flat losses would send
all draws to whichever bin rounded down. The sampling distribution over bins is

    p_b = (1 - uniform_prob) r_b / sum(r) + uniform_prob base(b),

base(b) being the bin's mass under uniform t (its share of the T time steps; 1 / B on a flow), and p = base
(uniform t) until every bin's slow count reaches ``min_count`` and some bin makes progress. Within a bin t is
uniform (on a flow: uniform in the unshifted time, then the schedule's shift). With ``reweight`` the loss
of each sample is multiplied by base(b) / p_b (1 / (B p_b) on equal bins), which keeps the objective of
uniform t and only lowers the gradient's variance where progress is; without it (the default, like SpeeD's
sampling) the objective itself leans toward the bins that learn.

Everything is device tensors updated with ``scatter_add_`` and ``torch.where``: no host sync. Under DDP
the losses of all ranks are gathered (``all_gather``, as ``LossAwareSampling``), so every rank holds the
same statistics and draws from the same p with its own generator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_speed.flow import FlowSchedule
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.timesteps.base import (
    TableSampling, binned_flow_cdf, flow_bin, inverse_cdf_sample, probabilities_to_cdf, sample_binned_flow,
)
from lightning_speed.validation import check_bool, check_int, check_number

PROGRESS_FLOOR = 1e-3
"""Relative decreases up to this are taken for rounding, not progress (the module docstring's ``floor``)."""


class LossDecreaseSampling(TableSampling):
    """Sampling in proportion to each bin of t's recent relative loss decrease (module docstring).

    Args:
        bins: bins of t with their own statistics (equal numbers of time steps; on a flow, equal widths of
            the unshifted time). 20 bins at batch 64 see about 3 samples each per step.
        fast / slow: per-step decays of the two moving averages (mean lags of 99 and 999 steps).
        uniform_prob: share of uniform t mixed in, which also bounds every bin's probability from below.
        min_count: uniform t until every bin's slow average holds this many (decayed) samples.
        reweight: multiply each loss by base(b) / p_b, which keeps uniform t's objective.
    """

    all_gather: Callable[[Tensor], Tensor] | None = None
    processes = ("ddpm", "flow")
    _STATE = ("sum_fast", "count_fast", "sum_slow", "count_slow")

    def __init__(self, bins: int = 20, fast: float = 0.99, slow: float = 0.999, uniform_prob: float = 0.25,
                 min_count: float = 100.0, reweight: bool = False) -> None:
        self.bins = check_int(bins, "bins", minimum=2, hint="the number of bins of t with their own loss averages")
        self.fast = check_number(fast, "fast", above=0, below=1, hint="the fast average's decay per step, e.g. 0.99")
        self.slow = check_number(slow, "slow", above=0, below=1, hint="the slow average's decay per step, e.g. 0.999")
        if self.slow <= self.fast:
            raise ValueError(f"slow={slow} must be closer to 1 than fast={fast}: the slow average must lag the fast "
                             "one for their difference to measure a decrease (e.g. fast 0.99, slow 0.999).")
        self.uniform_prob = check_number(uniform_prob, "uniform_prob", above=0, at_most=1,
                                         hint="the share of uniform t mixed in, e.g. 0.25")
        self.min_count = check_number(min_count, "min_count", at_least=0,
                                      hint="the samples each bin needs before sampling adapts")
        self.reweight = check_bool(reweight, "reweight")

    # -- binding ------------------------------------------------------------------------
    @override
    def build(self, schedule: NoiseSchedule, prediction: str) -> None:
        T = schedule.num_timesteps
        if self.bins > T:
            raise ValueError(f"bins={self.bins} is more than the schedule's T = {T} time steps: use at most {T}.")
        edges = torch.linspace(0, T, self.bins + 1, dtype=torch.float32).round().long()
        self._bin_of_step = torch.repeat_interleave(torch.arange(self.bins), torch.diff(edges))
        self._width = torch.diff(edges).float()  # time steps per bin
        self._base = self._width / T  # each bin's mass under uniform t
        self._start_statistics()

    @override
    def build_flow(self, schedule: FlowSchedule) -> None:
        self._base = torch.full((self.bins,), 1.0 / self.bins, dtype=torch.float32)
        self._start_statistics()

    def _start_statistics(self) -> None:
        # float32 whatever the default dtype: bf16 sums could not tell a decrease of PROGRESS_FLOOR from rounding
        for name in self._STATE:
            setattr(self, name, torch.zeros(self.bins, dtype=torch.float32))
        self._apply(self._base.clone())

    def bin_of(self, t: Tensor) -> Tensor:
        """The bin of each t (long, on t's device)."""
        if self.process == "flow":
            return flow_bin(self.schedule, t, self.bins)
        return self._bin_of_step.to(t.device)[t]

    # -- drawing ------------------------------------------------------------------------
    @override
    def sample(self, n: int) -> Tensor:
        if self.process != "flow":
            return inverse_cdf_sample(self.cdf, n, self.generator)
        return sample_binned_flow(self.schedule, self._bin_cdf, n, self.generator)

    @override
    def cdf_at(self, t: Any) -> Tensor:
        """P(drawn t <= t) on a flow: piecewise linear in the unshifted time."""
        return binned_flow_cdf(self.schedule, self.bin_probs, t)

    @override
    def importance_weight(self, t: Tensor) -> Tensor | None:
        if not self.reweight:
            return None
        b = self.bin_of(t)
        return self._base[b] / self.bin_probs[b]

    # -- statistics -----------------------------------------------------------------------
    @property
    def progress(self) -> Tensor:
        """(bins,) relative loss decrease r_b beyond the floor (0 where a bin has no samples yet)."""
        tiny = torch.finfo(self.sum_slow.dtype).tiny
        slow = self.sum_slow / self.count_slow.clamp_min(tiny)
        fast = self.sum_fast / self.count_fast.clamp_min(tiny)
        seen = (self.count_fast > 0) & (self.count_slow > 0) & (slow > 0)
        gap = (slow - fast - PROGRESS_FLOOR * slow).clamp_min(0.0)
        return torch.where(seen, gap / slow.clamp_min(tiny), torch.zeros_like(slow))

    @property
    def warm(self) -> Tensor:
        """Device bool scalar: every bin's slow average holds ``min_count`` samples."""
        return (self.count_slow >= self.min_count).all()

    @override
    def update(self, t: Tensor, losses: Tensor) -> None:
        b = self.bin_of(t.reshape(-1)).to(self.sum_fast.device)
        losses = losses.reshape(-1).detach().to(self.sum_fast.device, self.sum_fast.dtype)
        if self.all_gather is not None:  # one collective; bins are exact in float32
            both = self.all_gather(torch.stack([b.to(losses.dtype), losses])).reshape(-1, 2, b.numel())
            b, losses = both[:, 0].reshape(-1).round().long(), both[:, 1].reshape(-1)
        finite = torch.isfinite(losses)
        counts = torch.zeros_like(self.sum_fast).scatter_add_(0, b, finite.to(losses.dtype))
        sums = torch.zeros_like(self.sum_fast).scatter_add_(0, b, torch.where(finite, losses, torch.zeros_like(losses)))
        for decay, total, count in ((self.fast, self.sum_fast, self.count_fast),
                                    (self.slow, self.sum_slow, self.count_slow)):
            total.mul_(decay).add_(sums)
            count.mul_(decay).add_(counts)
        self._refresh()

    def _refresh(self) -> None:
        """p over bins from the progress; uniform until warm or while no bin progresses (torch.where, no sync)."""
        r = self.progress
        total = r.sum()
        base = self._base.to(r.device)
        learned = (1.0 - self.uniform_prob) * r / total.clamp_min(torch.finfo(r.dtype).tiny) + self.uniform_prob * base
        self._apply(torch.where(self.warm & (total > 0), learned, base))

    def _apply(self, bin_probs: Tensor) -> None:
        self.bin_probs = bin_probs
        self._bin_cdf = probabilities_to_cdf(bin_probs)
        if self.process != "flow":  # a table over the T time steps: p_b spread over its bin
            width = self._width.to(bin_probs.device)
            self.probs = (bin_probs / width)[self._bin_of_step.to(bin_probs.device)]
            self.cdf = probabilities_to_cdf(self.probs)

    # -- checkpointing ------------------------------------------------------------------
    @override
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), **{name: getattr(self, name).cpu().clone() for name in self._STATE}}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if self._STATE[0] not in state:
            return
        for name in self._STATE:
            value = torch.as_tensor(state[name], dtype=torch.float32)
            if tuple(value.shape) != (self.bins,):
                raise ValueError(f"The checkpoint's loss averages cover {value.numel()} bins but this sampler has "
                                 f"{self.bins}: resume with bins={value.numel()}.")
            getattr(self, name).copy_(value.to(self.sum_fast.device))
        self._refresh()
