"""Low-discrepancy time steps: one uniform offset per batch, spread over n equal strata.

The low-discrepancy sampler of Variational Diffusion Models (Kingma et al. 2021) draws, for a batch of n, one
u0 ~ U[0, 1) and uses

    u_i = (u0 + i / n) mod 1,  i = 0 .. n - 1,

so each stratum [i / n, (i + 1) / n) holds exactly one u and each u_i alone is U[0, 1). ``StratifiedSampling``
maps these u through the inverse CDF of another sampler's marginal: every t_i still follows that marginal, so
the objective (importance weights included) is unchanged, while each batch covers the marginal evenly and the
batch's loss estimate varies less. For f(t) = t / T under uniform t, the variance of the batch mean falls from
about 1 / (12 n) to about 1 / (12 n^2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor
from typing_extensions import override

from lightning_speed.flow import FlowSchedule
from lightning_speed.timesteps.base import (
    SamplingStrategy, UniformSampling, WrappedSampling, inverse_cdf, probabilities_to_cdf,
)


def stratified_uniform(n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """``(u0 + i / n) mod 1`` for i = 0 .. n - 1 with one u0 ~ U[0, 1): one u in each stratum [i / n, (i + 1) / n)."""
    u0 = torch.rand(1, device=device, generator=generator, dtype=torch.float32)
    return (u0 + torch.arange(n, device=device, dtype=torch.float32) / n) % 1.0


def check_inner(inner: Any) -> SamplingStrategy:
    """None (uniform t) or a strategy that samples only: a weighting played by it would be dropped."""
    if inner is None:
        return UniformSampling()
    if not isinstance(inner, SamplingStrategy):
        given = f"the class {inner.__name__}" if isinstance(inner, type) else type(inner).__name__
        raise TypeError(
            "inner must be a sampling strategy such as SpeeD(lam=None) or LogitNormalSampling(), or None for uniform "
            f"t, got {given}."
        )
    if "weighting" in inner.roles:
        raise ValueError(
            f"inner={inner!r} also weights the loss, which StratifiedSampling would drop: give a strategy that only "
            "samples (SpeeD(lam=None) for SpeeD's sampling), and the weighting next to StratifiedSampling."
        )
    return inner


def check_flow_quantile(inner: SamplingStrategy) -> None:
    """On a flow t = inner.quantile(u): it must exist and invert the inner's CDF (checked once, on the host)."""
    name = type(inner).__name__
    if type(inner).quantile is SamplingStrategy.quantile:
        raise ValueError(
            f"StratifiedSampling maps u through inner.quantile on a flow, but {name} has no flow quantile (it draws "
            "t another way): on a flow use UniformSampling, LogitNormalSampling, ModeSampling, CosMapSampling or "
            "SpeeD(dual=False, lam=None) inside it."
        )
    u = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    if not torch.allclose(inner.cdf_at(inner.quantile(u)), u, rtol=0.0, atol=1e-6):
        raise ValueError(
            f"{inner!r} draws more on a flow than its quantile (e.g. SpeeD's dual partners), so its quantile is not "
            "the inverse of its CDF and stratified u would not follow its marginal: use SpeeD(dual=False) on a flow."
        )


class StratifiedSampling(WrappedSampling):
    """``inner``'s marginal drawn with low-discrepancy u (see the module docstring).

    Args:
        inner: the sampling strategy whose marginal to draw (sampling only: ``SpeeD(lam=None)``,
            ``LogitNormalSampling()``, ``LossAwareSampling()``, ...); None: uniform t (the schedule's
            default). Its tau is this strategy's.

    On a DDPM schedule u maps through the CDF of ``inner.probabilities()``, recomputed at every draw on the
    device (adaptive and curriculum inners stay exact, nothing syncs); on a flow t = ``inner.quantile(u)``,
    and an inner without a flow quantile is refused when bound. Only the marginal is kept: a draw that is more
    than its marginal loses the rest (SpeeD's dual sampling no longer pairs t with its partner; on a DDPM
    schedule its t follow the marginal of t and partners, on a flow dual SpeeD is refused). ``importance_weight``,
    ``update``, ``set_step`` and ``all_gather`` go to ``inner``, so importance-weighted inners stay unbiased.
    Under DDP every rank stratifies its own batch.

    ``manual_seed(s)`` seeds u0's generator; it and the inner's state are in ``extra_state``.
    """

    def __init__(self, inner: Optional[SamplingStrategy] = None) -> None:
        super().__init__(check_inner(inner))

    @override
    def build_flow(self, schedule: FlowSchedule) -> None:
        super().build_flow(schedule)
        check_flow_quantile(self.inner)

    @override
    def sample(self, n: int) -> Tensor:
        u = stratified_uniform(n, self.device, self.generator)
        if self.process == "flow":
            return self.quantile(u)
        return inverse_cdf(probabilities_to_cdf(self.inner.probabilities()), u)

    @override
    def quantile(self, u: Tensor) -> Tensor:
        return self.inner.quantile(u)

    @override
    def cdf_at(self, t: Any) -> Tensor:
        return self.inner.cdf_at(t)

    @override
    def probabilities(self) -> Tensor:
        return self.inner.probabilities()

    # -- what the inner strategy does in the loss and over training ----------------------
    @property
    @override
    def acts_in_loss(self) -> bool:
        return self.inner.acts_in_loss

    @override
    def importance_weight(self, t: Tensor) -> Tensor | None:
        return self.inner.importance_weight(t)

    @override
    def update(self, t: Tensor, losses: Tensor) -> None:
        self.inner.update(t, losses)

    @override
    def set_step(self, step: int, max_steps: int | None = None) -> None:
        self.inner.set_step(step, max_steps)

    @property
    def all_gather(self) -> Callable[[Tensor], Tensor] | None:
        """The inner adaptive sampler's gather across ranks (None for an inner without one)."""
        return getattr(self.inner, "all_gather", None)

    @all_gather.setter
    def all_gather(self, gather: Callable[[Tensor], Tensor] | None) -> None:
        if hasattr(self.inner, "all_gather"):
            self.inner.all_gather = gather
