"""SpeeD: asymmetric time-step sampling and change-aware loss weighting, one strategy with one tau.

Both halves are tables over t computed once from the noise schedule (float64 on the CPU, stored in
float32) and used per step with a gather or an inverse-CDF lookup on the device: no syncs.

* Asymmetric sampling: P(t) = k / (T + tau (k - 1)) for t < tau and 1 / (T + tau (k - 1))
  for t >= tau, i.e. the convergence area is drawn k times less often. With dual sampling
  (the official default) n // 2 + 1 steps are drawn from P and each t is paired with
  t' = m - t if t < m else t - m, where m is the schedule's auto pivot (``schedules.auto_tau``,
  642 for linear T = 1000) whatever tau is; the batch keeps the first n of [t, t'].
* Change-aware weighting: u(t) = min-max normalised d/dt Psi(t); w(t) = (1 - lam) +
  (2 lam - 1) u(t) for t < tau, in [1 - lam, lam]; w(t) = 1 for t >= tau (official code).

``tau="auto"`` uses the pivot m as tau; see ``lightning_speed.schedules`` for how "auto"
behaves on other schedules and why it does not depend on the prediction type.

On a flow (derived in docs/flow_matching.md) tau is a flow time in (0, 1) and "auto" the pivot rule in flow
time, ``flow.auto_tau()`` = 0.921; the areas are those of the process time t, after the schedule's shift
(they describe how noisy x_t is). Both halves are closed forms, nothing is tabulated:

* Asymmetric sampling multiplies the default density (uniform u, then the schedule's shift) by k below tau
  and renormalises (``AsymmetricDensity``); dual pairs are t' = m - t below m = ``flow.auto_tau()`` and t - m
  from it on, as the discrete rule.
* Change-aware weighting uses u(t) = d psi / dt over its maximum 2, t (1 - t) / (t^2 + (1 - t)^2)^2 with
  psi = 1 / (1 + SNR): w(t) = (1 - lam) + (2 lam - 1) u(t) below tau, 1 from tau on.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor
from typing_extensions import override

from lightning_speed import flow
from lightning_speed.flow import FlowSchedule
from lightning_speed.schedules import NoiseSchedule, auto_tau, check_tau
from lightning_speed.timesteps.base import TableSampling, TableWeighting, as_flow_times
from lightning_speed.validation import check_bool, check_number

SpeeDTau = Optional[Union[int, float, Literal["auto"]]]
"""A time step (DDPM), a flow time in (0, 1) (flow), "auto", or None for the process's default."""
DEFAULT_TAU = {"ddpm": 700, "flow": "auto"}
"""tau=None: the paper's 700 on a DDPM schedule, the pivot rule (0.921) on a flow."""


def check_k(k: float) -> float:
    """Suppression intensity k: a positive finite number (k = 1 is uniform)."""
    return check_number(k, "k (the suppression intensity)", above=0, hint="the paper uses 5")


def check_lam(lam: float) -> float:
    """lambda in [0.5, 1]: 0.5 gives w = 0.5 everywhere below tau, 1 the full range [0, 1]."""
    return check_number(lam, "lam", at_least=0.5, at_most=1.0, hint="weights span [1 - lam, lam]; the paper uses 0.6")


def check_dual(dual: bool) -> bool:
    return check_bool(dual, "dual", hint="true pairs each t with its partner around the pivot (the official default)")


def warn_if_tau_precedes_convergence(tau: int, schedule: NoiseSchedule) -> None:
    """Warn when an integer tau opens the convergence area more than T / 10 before the schedule's pivot m:
    SpeeD would then draw less often, and weight as converged, steps whose x_t still holds much of x_0.
    The paper's 700 fits the linear schedule with T = 1000 (m = 642), not e.g. cosine (m = 959)."""
    pivot, T = auto_tau(schedule, warn=False), schedule.num_timesteps
    if tau >= pivot - T // 10 or pivot == T - 1:  # T - 1: the schedule never converges, which warns of its own
        return
    warnings.warn(
        f"tau={tau} starts SpeeD's convergence area at t = {tau}, but this {schedule.name} schedule (T = {T}) "
        f"converges only from t = {pivot} on: alpha_bar at t = {tau} is {float(schedule.alpha_bar[tau]):.3g}, far "
        f"from pure noise, so the steps in [{tau}, {pivot}) would be drawn less often and weighted as converged. "
        f"tau = 700 is the paper's value for the linear schedule with T = 1000. Use tau='auto' ({pivot} here), or "
        "ignore this warning if the smaller tau is deliberate.",
        stacklevel=1,  # one location: warned once, however many strategies bind
    )


def check_speed_tau(tau: Any) -> Any:
    """tau given before the process is known: None, "auto", a time step (an integer >= 1) or a flow time in (0, 1).
    Which of them fits the schedule is checked when the strategy is bound."""
    if tau is None or isinstance(tau, str) or (isinstance(tau, numbers.Integral) and not isinstance(tau, bool)):
        return tau if tau is None else check_tau(tau)
    if isinstance(tau, numbers.Real) and not isinstance(tau, bool) and 0 < tau < 1:  # numpy and torch floats too
        return float(tau)
    raise TypeError(
        f"tau must be 'auto', a time step (a positive integer, on a DDPM schedule) or a flow time in (0, 1) (on a flow; "
        f"'auto' is 0.921 there), got {tau!r} ({type(tau).__name__})."
    )


def asymmetric_probabilities(num_timesteps: int, tau: int, k: float) -> Tensor:
    """P(t) of asymmetric sampling as a float64 tensor (T,), for tau in [1, T) and k > 0 (``SpeeD`` checks them)."""
    T = int(num_timesteps)
    probs = torch.full((T,), 1.0, dtype=torch.float64)
    probs[:tau] = k
    return probs / (T + tau * (k - 1))


def dual_pairs(t: Tensor, pivot: int | float) -> Tensor:
    """The official dual partner of each t: m - t below the pivot m, t - m from it on (time steps or flow times)."""
    return torch.where(t < pivot, pivot - t, t - pivot)


class AsymmetricDensity:
    """A distribution of flow time (its quantile and CDF) with its density multiplied by k below tau, renormalised.

    With F the base CDF and a = F(tau), the mass below tau is A = k a / (k a + 1 - a); a uniform u maps to the
    base's quantile level u a / A below A and a + (u - A) (1 - a) / (1 - A) above. The levels are Python
    numbers computed once, so a draw is tensor arithmetic only.
    """

    def __init__(self, quantile: Callable[[Tensor], Tensor], cdf: Callable[[Tensor], Tensor], tau: float, k: float):
        self.base_quantile, self.base_cdf, self.tau = quantile, cdf, tau
        self.a = a = float(cdf(torch.tensor(tau, dtype=torch.float64)))  # once, on the host
        self.below = below = k * a / (k * a + 1 - a)
        self._scales = (a / below if below > 0 else 0.0, (1 - a) / (1 - below) if below < 1 else 0.0)

    def quantile(self, u: Tensor) -> Tensor:
        (scale_below, scale_above), a, below = self._scales, self.a, self.below
        level = torch.where(u < below, u * scale_below, a + (u - below) * scale_above)
        return self.base_quantile(level.clamp(0.0, 1.0))

    def cdf(self, t: Tensor) -> Tensor:
        """float64 on the CPU."""
        a, below = self.a, self.below
        t = as_flow_times(t)
        base = self.base_cdf(t)
        above = below + (base - a) * ((1 - below) / (1 - a) if a < 1 else 0.0)
        return torch.where(t < self.tau, base * (below / a if a > 0 else 0.0), above)


def flow_change_aware_weight(t: Tensor, tau: float, lam: float = 0.6) -> Tensor:
    """SpeeD's change-aware weight on a flow: (1 - lam) + (2 lam - 1) u(t) below tau, 1 from tau on,
    u(t) = t (1 - t) / (t^2 + (1 - t)^2)^2 (d psi / dt over its maximum 2)."""
    u = flow.psi_rate(t) / 2
    return torch.where(t < tau, (1 - lam) + (2 * lam - 1) * u, torch.ones_like(t))


def change_aware_weights(schedule: NoiseSchedule, tau: int, lam: float) -> Tensor:
    """w(t) of change-aware weighting as a float64 tensor (T,), for lam in [0.5, 1] (``SpeeD`` checks it)."""
    rate = schedule.psi_rate
    u = (rate - rate.min()) / (rate.max() - rate.min()).clamp_min(torch.finfo(rate.dtype).tiny)
    weights = (1.0 - lam) + (2.0 * lam - 1.0) * u
    weights[tau:] = 1.0
    return weights


class SpeeD(TableSampling, TableWeighting):
    """SpeeD: asymmetric time-step sampling and change-aware loss weights, with one tau.

    Args:
        tau: first time step of the convergence area (700 in the paper for linear T = 1000), or
            "auto" for the schedule's pivot m (642 for linear T = 1000); on a flow, a flow time in (0, 1)
            or "auto" (0.921). None: 700 on a DDPM schedule, "auto" on a flow.
        k: suppression intensity: t < tau is drawn k times more often than t >= tau (5; the paper's
            ablation: 1, 5, 10, 25).
        dual: pair each drawn t with its partner around the pivot m (official default).
        lam: lambda in [0.5, 1]; the weights below tau span [1 - lam, lam] (0.6).

    It plays both roles, or one for the ablations: ``lam=None`` samples only (unit weights),
    ``k=1, dual=False`` (uniform t) weights only. On a flow both halves are closed forms of t (module docstring).
    """

    processes = ("ddpm", "flow")

    def __init__(self, tau: SpeeDTau = None, k: float = 5.0, dual: bool = True, lam: Optional[float] = 0.6) -> None:
        self.tau = check_speed_tau(tau)
        self.k = check_k(k)
        self.dual = check_dual(dual)
        self.lam = None if lam is None else check_lam(lam)

    @property
    @override
    def roles(self) -> tuple[str, ...]:
        samples = self.k != 1.0 or self.dual
        return ("sampling",) * samples + ("weighting",) * (self.lam is not None)

    @override
    def build(self, schedule: NoiseSchedule, prediction: str) -> None:
        tau = self.resolved_tau
        warn_if_tau_precedes_convergence(tau, schedule)
        self.set_probabilities(asymmetric_probabilities(schedule.num_timesteps, tau, self.k))
        self.pivot = auto_tau(schedule, warn=False)
        # Mass of each t as a dual partner: q(s) = sum of p(t) over the t whose partner is s.
        partners = dual_pairs(torch.arange(schedule.num_timesteps), self.pivot)
        self.partner_probs = torch.zeros_like(self.probs).index_add_(0, partners, self.probs)
        T = schedule.num_timesteps
        self.set_weights(torch.ones(T) if self.lam is None else change_aware_weights(schedule, tau, self.lam))

    @override
    def tau_setting(self, process: str) -> Any:
        return DEFAULT_TAU[process] if self.tau is None else self.tau

    @override
    def build_flow(self, schedule: FlowSchedule) -> None:
        self.pivot = flow.auto_tau()
        self.density = AsymmetricDensity(schedule.warp, schedule.unwarp, self.resolved_tau, self.k)

    @override
    def quantile(self, u: Tensor) -> Tensor:
        """A primary draw (before dual pairing)."""
        return self.density.quantile(u)

    @override
    def cdf_at(self, t: Any) -> Tensor:
        """P(drawn t <= t) on a flow: with dual pairs the mean of the primary CDF G and the partners'
        G(m + t) - G(m - t)."""
        primary = self.density.cdf
        if not self.dual:
            return primary(t)
        t = as_flow_times(t)
        return 0.5 * (primary(t) + primary(self.pivot + t) - primary(self.pivot - t))

    @override
    def flow_weight(self, t: Tensor) -> Tensor:
        return torch.ones_like(t) if self.lam is None else flow_change_aware_weight(t, self.resolved_tau, self.lam)

    @override
    def probabilities(self) -> Tensor:
        """The marginal of one drawn t: the table p, or with dual pairs (p + q) / 2, since half of every
        batch are partners (q: ``partner_probs``). Exactly, a batch of n holds n//2 + 1 draws from p and
        the rest from q (``sample``); the monitor's sampled shares follow that. On a flow, bins of ``cdf_at``."""
        if self.process == "flow":
            return self.flow_probabilities()
        return 0.5 * (self.probs + self.partner_probs) if self.dual else self.probs

    @override
    def sample(self, n: int) -> Tensor:
        if not self.dual:
            return super().sample(n)
        t = super().sample(n // 2 + 1)
        return torch.cat([t, dual_pairs(t, self.pivot)])[:n]
