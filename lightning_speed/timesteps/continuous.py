"""Continuous-time strategies for the flow (``lightning_speed.flow``): t is a float in [0, 1], 1 being noise.

The protocol is the discrete one (``timesteps.base``): ``sampler.sample(n)`` returns t on ``sampler.device``
(float32, shape (n,)); ``weights.weight(t)`` returns per-sample weights on t's device; ``importance_weight`` and
``update`` serve adaptive samplers; seeds, generators and checkpoint state come from ``SamplingStrategy``.
Samplers draw by inverse CDF, t = Q(u) with u ~ U[0, 1) from their generator and Q in closed form, and the
weights are closed-form functions of t: nothing reads a value back to the host. ``cdf_at(t)`` gives the exact
distribution of a drawn t (float64, on the CPU; for tests and logging) and ``probabilities()`` its mass in
``num_timesteps`` equal bins of [0, 1] (1000 bins; the loss-aware sampler's own bins).

Samplers; the first four take SD3's time shift, applied to their draws (``flow.shift_time``):

* ``FlowUniformSampler``: t ~ U[0, 1] (rectified flow's default).
* ``FlowLogitNormalSampler``: t = sigmoid(u), u ~ N(mean, std^2) (SD3: 0, 1; mean > 0 favours noise).
  A shift s gives the logit-normal with mean + log(s).
* ``FlowModeSampler``: t = f(u) = 1 - u - scale (cos^2(pi u / 2) - 1 + u) (SD3's mode sampling, scale 1.29);
  f is a decreasing bijection of [0, 1] exactly for scale in [-1, 2 / (pi - 2)], so Q(v) = f(1 - v).
* ``FlowCosMapSampler``: t = 1 - 1 / (tan(pi u / 2) + 1), density 2 / (pi (1 - 2t + 2t^2)) (SD3's CosMap).
* ``FlowLossAwareSampler``: loss-aware importance sampling on ``bins`` equal bins of t (improved DDPM's
  loss-second-moment rule on the bins, see ``LossAwareSampling``): a bin b is drawn with p_b ~ sqrt(E[L^2])
  mixed with uniform, t uniform inside it; the density of t is bins p_b, so the unbiasing weight is
  1 / (bins p_b).
* ``FlowAsymmetricSampler``: SpeeD's asymmetric sampling on the flow (below).

Weights, for the velocity MSE ||v_hat - v||^2 that the flow trains on. With x0_hat = x_t - t v_hat and
eps_hat = x_t + (1 - t) v_hat, ||x0_hat - x0||^2 = t^2 ||v_hat - v||^2 and ||eps_hat - eps||^2 = (1 - t)^2 ||v_hat - v||^2:

* ``FlowMinSNRWeights``: Min-SNR-gamma weights the x0 loss by min(SNR, gamma), so on the velocity loss
  w(t) = min(SNR, gamma) t^2 = min((1 - t)^2, gamma t^2) (0 at both ends, peak (1 - t*)^2 at t* = 1 / (1 + sqrt(gamma))).
* ``FlowP2Weights``: P2 weights the epsilon loss by 1 / (k + SNR)^gamma, so on the velocity loss
  w(t) = (1 - t)^2 / (k + SNR(t))^gamma; k > 0, since SNR reaches 0 at t = 1.

SpeeD on the flow (derived in docs/flow_matching.md; the areas come from ``flow``: peak 1/2, tau "auto" 0.921):

* ``FlowAsymmetricSampler``: the base sampler's density (uniform by default) times k below tau, renormalised:
  with F the base CDF and a = F(tau), the mass below tau is A = k a / (k a + 1 - a); a uniform u maps to the
  base's quantile level u a / A below A and a + (u - A) (1 - a) / (1 - A) above. With a uniform base this is
  the discrete P(t) with T = 1: k / (1 + tau (k - 1)) below tau, 1 / (1 + tau (k - 1)) above. Dual sampling
  pairs each t with m - t below the pivot m = ``flow.auto_tau()`` and t - m above it, as the discrete rule.
* ``FlowChangeAwareWeights``: u(t) = d psi / dt normalised to [0, 1] over [0, 1] = t (1 - t) / (t^2 + (1 - t)^2)^2;
  w(t) = (1 - lam) + (2 lam - 1) u(t) below tau, 1 from tau on (the official code's rule).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_speed import flow
from lightning_speed.timesteps.base import SamplingStrategy, WeightingStrategy
from lightning_speed.timesteps.baselines import LossAwareSampling, check_min_snr
from lightning_speed.timesteps.speed import check_dual, check_k, check_lam
from lightning_speed.validation import check_int, check_number

PROBABILITY_BINS = 1000
"""Equal bins of [0, 1] in which ``probabilities()`` reports a continuous sampler's distribution."""

MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))
"""The scales for which SD3's mode map is a monotone bijection of [0, 1]."""


def _float64(t: Any) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64).cpu()


# ---------------------------------------------------------------------------------- samplers
class ContinuousSampler(SamplingStrategy):
    """Draws flow times t in [0, 1] (float32, (n,)) on ``self.device`` as t = shift(Q(u)), u ~ U[0, 1).

    Subclasses give the unshifted quantile ``_quantile`` (on u's device, tensor ops only) and CDF ``_cdf``
    (float64, CPU), and set their settings before calling ``super().__init__``, which tabulates
    ``probabilities()``.
    """

    def __init__(self, shift: float = 1.0) -> None:
        self.num_timesteps = PROBABILITY_BINS
        self.shift = flow.check_shift(shift)
        edges = torch.linspace(0.0, 1.0, PROBABILITY_BINS + 1, dtype=torch.float64)
        self.probs = torch.diff(self.cdf_at(edges)).clamp_min(0.0).float()

    @abstractmethod
    def _quantile(self, u: Tensor) -> Tensor:
        """The unshifted t whose CDF value is u."""

    @abstractmethod
    def _cdf(self, t: Tensor) -> Tensor:
        """The unshifted CDF at t (float64)."""

    def quantile(self, u: Tensor) -> Tensor:
        """The drawn t for uniform u (the inverse of ``cdf_at``), on u's device."""
        t = self._quantile(u)
        return t if self.shift == 1.0 else flow.apply_shift(t, self.shift)

    def cdf_at(self, t: Any) -> Tensor:
        """P(drawn t <= t), float64 on the CPU."""
        t = _float64(t).clamp(0.0, 1.0)
        return self._cdf(t if self.shift == 1.0 else flow.remove_shift(t, self.shift))

    @override
    def sample(self, n: int) -> Tensor:
        return self.quantile(torch.rand(n, device=self.device, generator=self.generator))

    @override
    def probabilities(self) -> Tensor:
        return self.probs


class FlowUniformSampler(ContinuousSampler):
    """t ~ U[0, 1], optionally shifted."""

    @override
    def _quantile(self, u: Tensor) -> Tensor:
        return u

    @override
    def _cdf(self, t: Tensor) -> Tensor:
        return t


class FlowLogitNormalSampler(ContinuousSampler):
    """t = sigmoid(u), u ~ N(mean, std^2) (SD3: mean 0, std 1), optionally shifted."""

    def __init__(self, mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> None:
        self.mean = check_number(mean, "mean", hint="SD3 uses 0")
        self.std = check_number(std, "std", above=0, hint="SD3 uses 1")
        super().__init__(shift)

    @override
    def _quantile(self, u: Tensor) -> Tensor:
        return torch.sigmoid(self.mean + self.std * torch.special.ndtri(u))

    @override
    def _cdf(self, t: Tensor) -> Tensor:
        return torch.special.ndtr((torch.logit(t) - self.mean) / self.std)


class FlowModeSampler(ContinuousSampler):
    """SD3's mode sampling, t = 1 - u - scale (cos^2(pi u / 2) - 1 + u), optionally shifted.

    ``scale`` in [-1, 2 / (pi - 2)] (SD3: 1.29): larger scales put more mass around t = 1/2, 0 is uniform.
    """

    def __init__(self, scale: float = 1.29, shift: float = 1.0) -> None:
        low, high = MODE_SCALE_RANGE
        self.scale = check_number(
            scale, "scale", at_least=low, at_most=high,
            hint="outside this range SD3's mode map is not monotone, so it is no distribution on [0, 1]; SD3 uses 1.29",
        )
        super().__init__(shift)

    def _map(self, u: Tensor) -> Tensor:
        return 1 - u - self.scale * (torch.cos(0.5 * math.pi * u) ** 2 - 1 + u)

    @override
    def _quantile(self, u: Tensor) -> Tensor:
        return self._map(1 - u)

    @override
    def _cdf(self, t: Tensor) -> Tensor:
        # F(t) = 1 - map^{-1}(t); the map decreases from 1 to 0, so bisect for map(u) = t.
        low, high = torch.zeros_like(t), torch.ones_like(t)
        for _ in range(60):
            mid = 0.5 * (low + high)
            above = self._map(mid) > t
            low, high = torch.where(above, mid, low), torch.where(above, high, mid)
        return 1 - 0.5 * (low + high)


class FlowCosMapSampler(ContinuousSampler):
    """SD3's CosMap, t = 1 - 1 / (tan(pi u / 2) + 1), optionally shifted."""

    @override
    def _quantile(self, u: Tensor) -> Tensor:
        return 1 - 1 / (torch.tan(0.5 * math.pi * u) + 1)

    @override
    def _cdf(self, t: Tensor) -> Tensor:
        return torch.atan2(t, 1 - t) * (2 / math.pi)  # (2 / pi) atan(t / (1 - t)), 1 at t = 1


class FlowLossAwareSampler(LossAwareSampling):
    """Loss-aware importance sampling on ``bins`` equal bins of t (see the module docstring).

    Args:
        bins: resolution of the loss history; 100 bins fill their history of 10 within a few thousand draws.
        history, uniform_prob: as ``LossAwareSampling`` (10 and 0.001 in improved DDPM).
    """

    def __init__(self, bins: int = 100, history: int = 10, uniform_prob: float = 0.001) -> None:
        bins = check_int(bins, "bins", minimum=1, hint="the number of equal bins of [0, 1] with a loss history")
        super().__init__(history, uniform_prob)
        self.bins = bins
        self.start_history(bins)

    def bin_of(self, t: Tensor) -> Tensor:
        """The bin index of each t, long, on t's device."""
        return (t * self.num_timesteps).long().clamp_(0, self.num_timesteps - 1)

    @override
    def sample(self, n: int) -> Tensor:
        b = super().sample(n)
        u = torch.rand(n, device=self.device, generator=self.generator)
        return (b + u) / self.num_timesteps

    @override
    def importance_weight(self, t: Tensor) -> Tensor:
        return super().importance_weight(self.bin_of(t))

    @override
    def update(self, t: Tensor, losses: Tensor) -> None:
        super().update(self.bin_of(t), losses)

    def cdf_at(self, t: Any) -> Tensor:
        """P(drawn t <= t) under the current bin probabilities, float64 on the CPU (piecewise linear)."""
        t = _float64(t).clamp(0.0, 1.0)
        probs = self.probs.detach().double().cpu()
        cumulative = torch.cat([probs.new_zeros(1), probs.cumsum(0)])
        x = t * self.num_timesteps
        j = x.floor().long().clamp(0, self.num_timesteps - 1)
        return cumulative[j] + probs[j] * (x - j)


def dual_pairs(t: Tensor, pivot: float) -> Tensor:
    """The dual partner of each flow time: pivot - t below the pivot, t - pivot from it on."""
    return torch.where(t < pivot, pivot - t, t - pivot)


class FlowAsymmetricSampler(ContinuousSampler):
    """SpeeD's asymmetric sampling on the flow: the convergence area [tau, 1] is drawn k times less densely.

    Args:
        tau: the flow time where the convergence area starts, in (0, 1), or "auto" (``flow.auto_tau()``, 0.921).
        k: how many times denser the base's density is kept below tau than above it (k = 1: the base).
        dual: pair every drawn t with its partner about the pivot ``flow.auto_tau()`` (as the official code).
        base: the sampler whose density is reweighted (default ``FlowUniformSampler()``; any shift lives there).
    """

    def __init__(
        self, tau: flow.FlowTau = "auto", k: float = 5.0, dual: bool = True, base: ContinuousSampler | None = None
    ) -> None:
        self.tau = flow.resolve_tau(tau)
        self.k = check_k(k)
        self.dual = check_dual(dual)
        self.pivot = flow.auto_tau()
        self.base = FlowUniformSampler() if base is None else base
        if not isinstance(self.base, ContinuousSampler):
            raise TypeError(
                f"base must be a continuous sampler (e.g. FlowLogitNormalSampler()), got {type(base).__name__}."
            )
        self.areas = flow.FlowAreas(self.tau)
        a = float(self.base.cdf_at(self.tau))  # the base's mass below tau, once, on the host
        below = self.k * a / (self.k * a + 1 - a)
        self._levels = (a, below, a / below if below > 0 else 0.0, (1 - a) / (1 - below) if below < 1 else 0.0)
        super().__init__()

    @override
    def to(self, device: torch.device | str) -> FlowAsymmetricSampler:
        self.base.to(device)
        return super().to(device)

    @override
    def _quantile(self, u: Tensor) -> Tensor:
        a, below, scale_below, scale_above = self._levels
        level = torch.where(u < below, u * scale_below, a + (u - below) * scale_above)
        return self.base.quantile(level.clamp(0.0, 1.0))

    @override
    def _cdf(self, t: Tensor) -> Tensor:
        """The CDF of a primary draw (before dual pairing)."""
        a, below, _, _ = self._levels
        base = self.base.cdf_at(t)
        return torch.where(t < self.tau, base * (below / a if a > 0 else 0.0),
                           below + (base - a) * ((1 - below) / (1 - a) if a < 1 else 0.0))

    @override
    def cdf_at(self, t: Any) -> Tensor:
        """P(drawn t <= t): with dual pairs the mean of the primary CDF G and the partners' G(m + t) - G(m - t)."""
        primary = super().cdf_at
        if not self.dual:
            return primary(t)
        t = _float64(t).clamp(0.0, 1.0)
        return 0.5 * (primary(t) + primary(self.pivot + t) - primary(self.pivot - t))

    @override
    def sample(self, n: int) -> Tensor:
        if not self.dual:
            return super().sample(n)
        t = super().sample(n // 2 + 1)
        return torch.cat([t, dual_pairs(t, self.pivot)])[:n]


# ---------------------------------------------------------------------------------- weights
def min_snr_weight(t: Tensor, gamma: float = 5.0) -> Tensor:
    """Min-SNR-gamma on the velocity loss: min(SNR, gamma) t^2 = min((1 - t)^2, gamma t^2)."""
    return torch.minimum((1 - t) ** 2, gamma * t**2)


def p2_weight(t: Tensor, k: float = 1.0, gamma: float = 1.0) -> Tensor:
    """P2 on the velocity loss: (1 - t)^2 / (k + SNR(t))^gamma (0 at t = 0, where SNR is inf)."""
    return (1 - t) ** 2 / (k + flow.snr(t)) ** gamma


def change_aware_weight(t: Tensor, tau: float, lam: float = 0.6) -> Tensor:
    """SpeeD's change-aware weight on the flow: (1 - lam) + (2 lam - 1) u(t) below tau, 1 from tau on,
    u(t) = t (1 - t) / (t^2 + (1 - t)^2)^2 (d psi / dt over its maximum 2)."""
    u = flow.psi_rate(t) / 2
    return torch.where(t < tau, (1 - lam) + (2 * lam - 1) * u, torch.ones_like(t))


class FlowMinSNRWeights(WeightingStrategy):
    """Min-SNR-gamma (Hang et al. 2023) for the flow's velocity target."""

    def __init__(self, gamma: float = 5.0) -> None:
        self.gamma = check_min_snr(gamma)

    @override
    def weight(self, t: Tensor) -> Tensor:
        return min_snr_weight(t, self.gamma)


class FlowP2Weights(WeightingStrategy):
    """P2 weighting (Choi et al. 2022) for the flow's velocity target; k > 0."""

    def __init__(self, k: float = 1.0, gamma: float = 1.0) -> None:
        self.k = check_number(
            k, "P2's k", above=0,
            hint="SNR reaches 0 at t = 1, where 1 / (k + SNR)^gamma is infinite for k = 0; the official value is 1",
        )
        self.gamma = check_number(gamma, "P2's gamma", at_least=0, hint="the official value is 1")

    @override
    def weight(self, t: Tensor) -> Tensor:
        return p2_weight(t, self.k, self.gamma)


class FlowChangeAwareWeights(WeightingStrategy):
    """SpeeD's change-aware weighting on the flow.

    Args:
        lam: lambda in [0.5, 1]; weights below tau span [1 - lam, lam].
        tau: weights are 1 from tau on; a flow time in (0, 1) or "auto" (0.921).
    """

    def __init__(self, lam: float = 0.6, tau: flow.FlowTau = "auto") -> None:
        self.lam = check_lam(lam)
        self.tau = flow.resolve_tau(tau)

    @override
    def weight(self, t: Tensor) -> Tensor:
        return change_aware_weight(t, self.tau, self.lam)

