"""Noise schedules and every fact about them that the time-step strategies use.

``NoiseSchedule`` holds a discrete DDPM schedule over t = 0 .. T-1 (betas in, alpha_bar, SNR,
Psi and d/dt Psi out), built from a name, from betas, or from the ``alphas_cumprod`` a
diffusers scheduler carries (``as_schedule`` accepts any of them). All tables are float64 CPU
tensors computed once; consumers in the training step copy what they need to the device.

Zero terminal SNR (diffusers' ``rescale_betas_zero_snr``: a final beta of 1, alpha_bar_(T-1) = 0)
is supported: SNR(T-1) = 0 and Psi(T-1) = 1, and the strategies' tables are defined there.

The schedule facts SpeeD needs (METHOD.md):

Psi(t) = Var[x_t | x_0] = 1 - alpha_bar_t; its rate d/dt Psi rises, peaks and decays to ~0.
That splits t into three areas:

* acceleration: t < argmax d/dt Psi (the rate still rises; peak t = 219 for linear T = 1000);
* deceleration: argmax d/dt Psi <= t < tau (the rate falls but is not negligible);
* convergence: t >= tau (x_t is almost pure noise: the loss is low and alike for every image).

``tau="auto"`` (``auto_tau``) is the official pivot rule: the first t where
numpy.gradient(sqrt(1 - alpha_bar)) falls below 1e-4, plus one (642 for linear T = 1000,
959 for cosine, 829 for quadratic, 229 for constant beta = 0.02). For T != 1000 the threshold
is 1e-4 * 1000 / T, i.e. 0.1 per unit of normalised time t / T, so the pivot stays at the same
fraction of the process when T changes (linear T = 100 -> 64; the fixed 1e-4 would give 80).
The result is clamped to [1, T - 1]. When the schedule never gets there (its x_{T-1} still
carries signal: constant beta = 0.02 at T <= 100, quadratic at T <= 500), there is no
convergence area; "auto" then gives tau = T - 1 (only the last step counts as converged, so
asymmetric sampling is uniform up to one step and the change-aware weights cover every other
t) and warns, because such a schedule also makes sampling from N(0, I) inconsistent with training.

The areas are a property of the forward process, not of the network's parameterisation: the
same tau and areas apply to epsilon-, v- and x0-prediction (only the loss's scale per t
differs, which is what weighting baselines like Min-SNR correct).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
import torch
from torch import Tensor

from lightning_speed.validation import check_choice, check_int

if TYPE_CHECKING:
    from lightning_speed.flow import FlowSchedule

SCHEDULE_NAMES = ("linear", "quadratic", "cosine", "constant")

Prediction = Literal["epsilon", "v", "x0"]
"""What the network predicts: the noise, v = sqrt(ab) eps - sqrt(1 - ab) x0, or the clean data."""
PREDICTIONS: tuple[str, ...] = Prediction.__args__

Tau = Union[int, Literal["auto"]]
"""The first time step of the convergence area, or "auto" for the schedule's pivot."""

AREA_NAMES = ("acceleration", "deceleration", "convergence")
PIVOT_THRESHOLD = 1e-4
"""Official pivot threshold on the per-step gradient of sqrt(1 - alpha_bar), at T = 1000."""


DIFFUSERS_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
"""diffusers' ``prediction_type`` names and ours."""


def check_prediction(prediction: Any) -> str:
    """One of ``PREDICTIONS``."""
    return check_choice(prediction, "prediction", PREDICTIONS)


def prediction_of(source: Any) -> str | None:
    """The prediction type a diffusers scheduler was configured with (``config.prediction_type``), in our
    names; None when ``source`` does not say."""
    name = getattr(getattr(source, "config", None), "prediction_type", None)
    if name is None:
        return None
    if name not in DIFFUSERS_PREDICTIONS:
        raise ValueError(
            f"The scheduler's prediction_type {name!r} has no counterpart here; "
            f"known: {', '.join(DIFFUSERS_PREDICTIONS)} (our epsilon, v, x0)."
        )
    return DIFFUSERS_PREDICTIONS[name]


def linear_betas(num_timesteps: int) -> Tensor:
    """DDPM's linear schedule, 1e-4 to 0.02 at T = 1000; both ends scale by 1000 / T."""
    if num_timesteps <= 20:  # the last beta, 0.02 * 1000 / T, reaches 1 (alpha_bar 0) at T = 20
        raise ValueError(
            f"The linear schedule scales its betas by 1000 / T, so at T = {num_timesteps} its last beta is "
            f"{20 / num_timesteps:g} (1 or more: x_t is pure noise before the last step): use more than 20 steps, or "
            "the cosine schedule."
        )
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def quadratic_betas(num_timesteps: int) -> Tensor:
    """sqrt(beta) linear between sqrt(1e-4) and sqrt(0.02)."""
    return torch.linspace(1e-4**0.5, 0.02**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def constant_betas(num_timesteps: int, beta: float = 0.02) -> Tensor:
    """The same beta at every step (an ablation in the paper)."""
    return torch.full((num_timesteps,), beta, dtype=torch.float64)


_BUILDERS = {
    "linear": linear_betas,
    "quadratic": quadratic_betas,
    "cosine": cosine_betas,
    "constant": constant_betas,
}


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _positions(mask: Tensor, limit: int = 5) -> str:
    """The first few indices where ``mask`` holds, as text ("0, 1, 2, ... (7 in all)")."""
    where = torch.nonzero(mask).flatten().tolist()
    text = ", ".join(map(str, where[:limit]))
    return f"{text}, ... ({len(where)} in all)" if len(where) > limit else text


class NoiseSchedule:
    """A discrete DDPM noise schedule over t = 0 .. T-1.

    Build one by name (``NoiseSchedule.from_name("linear", 1000)``), from explicit betas, or from
    cumulative products (``NoiseSchedule.from_alphas_cumprod``). Attributes are float64 CPU
    tensors of length T. Every beta lies in (0, 1); the last may be exactly 1 (zero terminal SNR).
    """

    def __init__(self, betas: Tensor | Sequence[float], name: str = "custom") -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
        if betas.numel() < 2:
            raise ValueError(f"A noise schedule needs at least 2 betas, got {betas.numel()}.")
        inner, last = betas[:-1], betas[-1]
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (inner >= 1).any() or last > 1:
            raise ValueError(
                "Every beta must lie strictly between 0 and 1 (the last may be exactly 1, for zero terminal SNR); "
                f"got min {betas.min().item():.3g}, max {betas.max().item():.3g}"
                + (f" at t = {_positions(~((betas > 0) & (betas < 1)))}." if torch.isfinite(betas).all() else ".")
            )
        self.name = name
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000) -> NoiseSchedule:
        """One of ``linear``, ``quadratic``, ``cosine``, ``constant``."""
        if name not in _BUILDERS:
            raise ValueError(
                f"Unknown noise schedule {name!r}. Choose one of {', '.join(SCHEDULE_NAMES)}, "
                "or pass a list of betas."
            )
        num_timesteps = check_int(num_timesteps, "num_timesteps", minimum=2)
        return cls(_BUILDERS[name](num_timesteps), name=name)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor | np.ndarray, name: str = "alphas_cumprod") -> NoiseSchedule:
        """The schedule whose cumulative products are ``alphas_cumprod`` (betas = 1 - ab_t / ab_(t-1)).

        Any floating dtype is accepted and converted to float64; the values must decrease
        strictly from below 1, and only the last may be 0 (zero terminal SNR).
        """
        source = torch.as_tensor(alphas_cumprod).detach()
        what = f"alphas_cumprod ({source.dtype}, shape {tuple(source.shape)})"
        if not source.is_floating_point() or source.ndim != 1 or source.numel() < 2:
            raise ValueError(f"{what} must be a 1-D floating-point tensor with at least 2 entries.")
        ab = source.to("cpu", torch.float64)
        if not torch.isfinite(ab).all():
            raise ValueError(f"{what} has non-finite entries at t = {_positions(~torch.isfinite(ab))}.")
        if ((ab < 0) | (ab > 1)).any():
            raise ValueError(f"{what} must lie in [0, 1]; entries at t = {_positions((ab < 0) | (ab > 1))} do not.")
        previous = torch.cat([ab.new_ones(1), ab[:-1]])
        stalled = ab >= previous
        if stalled.any():
            if source.dtype in _LOW_PRECISION:
                resolution = torch.finfo(source.dtype).eps
                raise ValueError(
                    f"{what} is too coarse for this schedule: at t = {_positions(stalled)} an entry rounds to 1 or to "
                    f"the entry before it ({source.dtype} resolves about {resolution:.1e} near 1), which would make "
                    "beta_t = 1 - ab_t / ab_(t-1) zero. Pass alphas_cumprod in float32 or float64 (e.g. "
                    "torch.cumprod(1 - scheduler.betas.double(), 0)) or a NoiseSchedule; lightning_speed converts "
                    "it to float64 itself."
                )
            raise ValueError(
                f"{what} must decrease strictly, starting below 1 (each beta_t = 1 - ab_t / ab_(t-1) must be > 0); "
                f"at t = {_positions(stalled)} an entry is not smaller than the one before (1 before t = 0). "
                "Only the last entry may be 0 (zero terminal SNR)."
            )
        if source.dtype in _LOW_PRECISION:
            warnings.warn(
                f"alphas_cumprod is {source.dtype}: converted to float64, but its values keep {source.dtype}'s "
                "rounding, so SNR and tau='auto' are approximate. Pass the float32 or float64 table for the "
                "exact schedule.",
                stacklevel=2,
            )
        return cls(1.0 - ab / previous, name=name)

    @classmethod
    def create(cls, schedule: str | Sequence[float] | NoiseSchedule, num_timesteps: int = 1000) -> NoiseSchedule:
        """Accept whatever a config may say: a name, a list of betas, or a schedule."""
        if isinstance(schedule, NoiseSchedule):
            return schedule
        if isinstance(schedule, str):
            return cls.from_name(schedule, num_timesteps)
        return cls(schedule)

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar); 0 at a zero-terminal-SNR last step."""
        return self.alpha_bar / (1.0 - self.alpha_bar)

    @property
    def psi(self) -> Tensor:
        """Psi(t) = Var[x_t | x_0] = 1 - alpha_bar_t, per dimension."""
        return 1.0 - self.alpha_bar

    @property
    def psi_rate(self) -> Tensor:
        """d/dt Psi(t) by central differences (one-sided at the ends), as numpy.gradient."""
        return torch.gradient(self.psi)[0]

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, num_timesteps={self.num_timesteps})"


def as_schedule(source: Any) -> NoiseSchedule | FlowSchedule:
    """The schedule a module holds: a NoiseSchedule, an ``alphas_cumprod`` tensor (or array), or an object
    with an ``alphas_cumprod`` attribute (a diffusers scheduler); for flow matching a ``flow.FlowSchedule`` or a
    diffusers flow-matching scheduler (``FlowMatchEulerDiscreteScheduler``: its ``config.shift``)."""
    from lightning_speed.flow import FlowSchedule, is_flow_scheduler  # flow imports this module

    if isinstance(source, (NoiseSchedule, FlowSchedule)):
        return source
    if is_flow_scheduler(source):
        return FlowSchedule.from_scheduler(source)
    if isinstance(source, (Tensor, np.ndarray)):
        return NoiseSchedule.from_alphas_cumprod(source)
    alphas_cumprod = getattr(source, "alphas_cumprod", None)
    if isinstance(alphas_cumprod, (Tensor, np.ndarray)):
        if getattr(getattr(source, "config", None), "rescale_betas_zero_snr", False) and 0 < alphas_cumprod[-1] <= 2**-24:
            # diffusers' sigma-based solvers (Euler, DPM-Solver, UniPC) store zero terminal SNR's last alpha_bar as
            # 2^-24 so that their first sigma is finite; the schedule they rescaled to ends at 0, as DDPM's does
            alphas_cumprod = torch.as_tensor(alphas_cumprod).clone()
            alphas_cumprod[-1] = 0
        return NoiseSchedule.from_alphas_cumprod(alphas_cumprod, name=type(source).__name__)
    if isinstance(source, type):  # e.g. TimestepStrategy(DDPMScheduler): the class, not a scheduler built from it
        raise TypeError(f"Cannot read a noise schedule from the class {source.__name__}: pass an instance, "
                        f"{source.__name__}(...), the scheduler the training step noises with.")
    raise TypeError(
        f"Cannot read a noise schedule from {type(source).__name__}: pass a lightning_speed.schedules.NoiseSchedule "
        "(e.g. NoiseSchedule.from_name('linear', 1000)), an alphas_cumprod tensor, an object with an "
        "`alphas_cumprod` tensor such as a diffusers scheduler, or for flow matching a lightning_speed.flow."
        "FlowSchedule(shift) or a diffusers FlowMatchEulerDiscreteScheduler."
    )


# ---------------------------------------------------------------------------------- tau
def auto_tau(schedule: NoiseSchedule, threshold: float = PIVOT_THRESHOLD, *, warn: bool = True) -> int:
    """The pivot m: first t with gradient(sqrt(1 - alpha_bar)) < threshold * 1000 / T, plus one.

    642 for linear T = 1000, 959 for cosine. Clamped to [1, T - 1]; T - 1 (with a warning)
    when the schedule never converges. See the module docstring.
    """
    T = schedule.num_timesteps
    rate = np.gradient(np.sqrt(schedule.psi.numpy()))
    below = np.flatnonzero(rate < threshold * 1000.0 / T)
    if below.size == 0:
        if warn:
            warnings.warn(
                f"The {schedule.name} schedule with T = {T} never converges (alpha_bar_(T-1) = "
                f"{float(schedule.alpha_bar[-1]):.3g}): gradient(sqrt(1 - alpha_bar)) stays above "
                f"{threshold * 1000.0 / T:.3g}, so there is no convergence area and tau='auto' gives "
                f"T - 1 = {T - 1}. Consider more steps or larger betas so x_(T-1) is close to pure noise.",
                stacklevel=2,
            )
        return T - 1
    return int(min(max(int(below[0]) + 1, 1), T - 1))


def check_tau(tau: Any, name: str = "tau") -> int | str:
    """A tau given before the schedule is known: an integer >= 1 or "auto"."""
    if isinstance(tau, str):
        if tau.strip().lower() != "auto":
            raise ValueError(f"{name} must be a positive integer or 'auto', got {tau!r}.")
        return "auto"
    try:
        return check_int(tau, name, minimum=1, hint="it is the first converged time step, or 'auto'")
    except TypeError as err:
        flow_time = isinstance(tau, float) and 0 < tau < 1
        hint = " (a flow time: a DDPM schedule's tau is a time step, e.g. 700)" if flow_time else ""
        got = f"{tau!r} ({type(tau).__name__}){hint}"
        raise TypeError(f"{name} must be a positive integer or 'auto', got {got}.") from err


def resolve_tau(tau: Any, schedule: NoiseSchedule, name: str = "tau") -> int:
    """An int tau checked against the schedule, or ``auto_tau(schedule)`` for "auto"."""
    tau = check_tau(tau, name)
    if tau == "auto":
        return auto_tau(schedule)
    T = schedule.num_timesteps
    if tau >= T:
        raise ValueError(
            f"{name}={tau} must be smaller than the schedule's number of time steps T={T} "
            f"(use a value in [1, {T - 1}], or 'auto' for {auto_tau(schedule, warn=False)})."
        )
    return int(tau)


# ---------------------------------------------------------------------------------- areas
def psi_rate_peak(schedule: NoiseSchedule) -> int:
    """argmax_t d/dt Psi(t): where the acceleration area ends (219 for linear T = 1000)."""
    return int(torch.argmax(schedule.psi_rate))


@dataclass(frozen=True)
class TimestepAreas:
    """The three areas of [0, T): acceleration [0, peak), deceleration [peak, tau), convergence [tau, T).

    If tau <= peak the deceleration area is empty and acceleration ends at tau.
    """

    num_timesteps: int
    peak: int
    tau: int

    @property
    def acceleration(self) -> range:
        return range(0, min(self.peak, self.tau))

    @property
    def deceleration(self) -> range:
        return range(min(self.peak, self.tau), self.tau)

    @property
    def convergence(self) -> range:
        return range(self.tau, self.num_timesteps)

    def ranges(self) -> dict[str, range]:
        return {name: getattr(self, name) for name in AREA_NAMES}

    def labels(self) -> Tensor:
        """Area index per t (0 acceleration, 1 deceleration, 2 convergence), long tensor (T,)."""
        labels = torch.empty(self.num_timesteps, dtype=torch.long)
        for index, span in enumerate(self.ranges().values()):
            labels[span.start : span.stop] = index
        return labels

    def fractions(self) -> dict[str, float]:
        """Share of uniformly drawn time steps that falls in each area."""
        return {name: len(span) / self.num_timesteps for name, span in self.ranges().items()}


def timestep_areas(schedule: NoiseSchedule, tau: Tau = "auto") -> TimestepAreas:
    """Split [0, T) into acceleration / deceleration / convergence for ``schedule``."""
    return TimestepAreas(schedule.num_timesteps, psi_rate_peak(schedule), resolve_tau(tau, schedule))
