"""The time-step analysis behind SpeeD's Figure 1, for any noise schedule.

Given x_0, the forward process x_{t+1} = sqrt(1 - b_{t+1}) x_t + sqrt(b_{t+1}) eps has the
increment delta_t = x_{t+1} - x_t = (sqrt(1 - b_{t+1}) - 1) x_t + sqrt(b_{t+1}) eps, so

* its mean is (sqrt(alpha_bar_{t+1}) - sqrt(alpha_bar_t)) x_0 (it shrinks to 0 as t grows);
* its variance per dimension is (sqrt(1 - b_{t+1}) - 1)^2 (1 - alpha_bar_t) + b_{t+1}
  (Var[x_t | x_0] = 1 - alpha_bar_t and eps is independent of x_t).

Psi(t) = Var[x_t | x_0] = 1 - alpha_bar_t; its rate d/dt Psi rises, peaks and decays to ~0.
That splits t into three areas:

* acceleration: t < argmax d/dt Psi (the rate still rises; peak t = 219 for linear T = 1000);
* deceleration: argmax d/dt Psi <= t < tau (the rate falls but is not negligible);
* convergence: t >= tau (x_t is almost pure noise: the loss is low and alike for every image).

``tau="auto"`` (``auto_tau``) is the official pivot rule: the first t where
numpy.gradient(sqrt(1 - alpha_bar)) falls below 1e-4, plus one (642 for linear T = 1000,
959 for cosine, 829 for quadratic, 229 for constant beta = 0.02). For T != 1000 the threshold
is 1e-4 * 1000 / T, i.e. 0.1 per unit of normalised time t / T, so the pivot stays at the same
fraction of the process when T changes (linear T = 100 -> 64; the fixed 1e-4 would drift to 80).
The result is clamped to [1, T - 1]. When the schedule never gets there (its x_{T-1} still
carries signal: constant beta = 0.02 at T <= 100, quadratic at T <= 500 as defined in
``schedules``), there is no convergence area; "auto" then falls back to tau = T - 1 (only the
last step counts as converged, so asymmetric sampling is uniform up to one step and the
change-aware weights cover every other t) and warns, because such a schedule also makes
sampling from N(0, I) inconsistent with training.

The areas are a property of the forward process, not of the network's parameterisation: the
same tau and areas apply to epsilon-, v- and x0-prediction (only the loss's scale per t
differs, which is what weighting baselines like Min-SNR correct).

Command line: ``python -m lightning_speed.analysis --schedule linear --num-timesteps 1000
--out analysis.png`` writes the figure (needs matplotlib) and prints the areas.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lightning_speed.schedules import SCHEDULE_NAMES, NoiseSchedule

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

AREA_NAMES = ("acceleration", "deceleration", "convergence")
PIVOT_THRESHOLD = 1e-4
"""Official pivot threshold on the per-step gradient of sqrt(1 - alpha_bar), at T = 1000."""


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
                f"{threshold * 1000.0 / T:.3g}, so there is no convergence area and tau='auto' falls back "
                f"to T - 1 = {T - 1}. Consider more steps or larger betas so x_(T-1) is close to pure noise.",
                stacklevel=2,
            )
        return T - 1
    return int(min(max(int(below[0]) + 1, 1), T - 1))


def check_tau_spec(tau: int | str, name: str = "tau") -> int | str:
    """Validate a tau given in a constructor (before the schedule is known): int >= 1 or "auto"."""
    if isinstance(tau, str):
        if tau.strip().lower() != "auto":
            raise ValueError(f"{name} must be a positive integer or 'auto', got {tau!r}.")
        return "auto"
    if isinstance(tau, bool) or not isinstance(tau, (int, np.integer)):
        raise ValueError(f"{name} must be a positive integer or 'auto', got {tau!r} ({type(tau).__name__}).")
    if tau < 1:
        raise ValueError(f"{name} must be at least 1 (the first converged time step), got {tau}.")
    return int(tau)


def resolve_tau(tau: int | str, schedule: NoiseSchedule, name: str = "tau") -> int:
    """An int tau checked against the schedule, or ``auto_tau(schedule)`` for "auto"."""
    tau = check_tau_spec(tau, name)
    if tau == "auto":
        return auto_tau(schedule)
    T = schedule.num_timesteps
    if tau >= T:
        raise ValueError(
            f"{name}={tau} must be smaller than the schedule's number of time steps T={T} "
            f"(use a value in [1, {T - 1}], or 'auto' for {auto_tau(schedule, warn=False)})."
        )
    return int(tau)


# ---------------------------------------------------------------------------- per-t curves
def _as_schedule(schedule: NoiseSchedule | str, num_timesteps: int = 1000) -> NoiseSchedule:
    return NoiseSchedule.create(schedule, num_timesteps)


def increment_mean_scale(schedule: NoiseSchedule) -> Tensor:
    """sqrt(alpha_bar_{t+1}) - sqrt(alpha_bar_t) for t = 0 .. T-2: E[x_{t+1} - x_t | x_0] / x_0."""
    root = schedule.alpha_bar.sqrt()
    return root[1:] - root[:-1]


def increment_variance(schedule: NoiseSchedule) -> Tensor:
    """Var[x_{t+1} - x_t | x_0] per dimension for t = 0 .. T-2.

    (sqrt(1 - b_{t+1}) - 1)^2 (1 - alpha_bar_t) + b_{t+1}.
    """
    b_next = schedule.betas[1:]
    return ((1 - b_next).sqrt() - 1) ** 2 * schedule.psi[:-1] + b_next


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


def timestep_areas(schedule: NoiseSchedule, tau: int | str = "auto") -> TimestepAreas:
    """Split [0, T) into acceleration / deceleration / convergence for ``schedule``."""
    return TimestepAreas(schedule.num_timesteps, psi_rate_peak(schedule), resolve_tau(tau, schedule))


@dataclass(frozen=True)
class TimestepAnalysis:
    """Everything Figure 1 plots, as float64 numpy arrays (increments have length T - 1)."""

    schedule: str
    increment_mean_scale: np.ndarray
    increment_variance: np.ndarray
    psi: np.ndarray
    psi_rate: np.ndarray
    areas: TimestepAreas


def analyse(schedule: NoiseSchedule | str, num_timesteps: int = 1000, tau: int | str = "auto") -> TimestepAnalysis:
    """Compute the increment statistics, Psi, d/dt Psi and the areas of a schedule."""
    s = _as_schedule(schedule, num_timesteps)
    return TimestepAnalysis(
        schedule=s.name,
        increment_mean_scale=increment_mean_scale(s).numpy(),
        increment_variance=increment_variance(s).numpy(),
        psi=s.psi.numpy(),
        psi_rate=s.psi_rate.numpy(),
        areas=timestep_areas(s, tau),
    )


# ---------------------------------------------------------------------------------- plotting
AREA_COLOURS = {"acceleration": "#4c9be8", "deceleration": "#f2a541", "convergence": "#b0b0b0"}


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt  # falls back to Agg when there is no display
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Plotting the time-step analysis needs matplotlib: `pip install matplotlib` "
            "(or `pip install lightning-speed[plots]`)."
        ) from err
    return plt


def shade_areas(ax: Any, areas: TimestepAreas, alpha: float = 0.18, label: bool = True) -> None:
    """Shade the three areas on a matplotlib axis whose x axis is t."""
    for name, span in areas.ranges().items():
        if len(span):
            ax.axvspan(span.start, span.stop - 1, color=AREA_COLOURS[name], alpha=alpha, lw=0, label=name if label else None)


def plot_analysis(
    schedules: Sequence[NoiseSchedule | str] | NoiseSchedule | str = ("linear", "cosine"),
    num_timesteps: int = 1000,
    tau: int | str = "auto",
) -> Figure:
    """Figure 1 for each schedule (one row each): increment mean scale, variance, d/dt Psi with the areas."""
    plt = _pyplot()
    if isinstance(schedules, (NoiseSchedule, str)):
        schedules = [schedules]
    rows = [analyse(s, num_timesteps, tau) for s in schedules]
    fig, axes = plt.subplots(len(rows), 3, figsize=(13, 3.2 * len(rows)), squeeze=False)
    for row, result in zip(axes, rows):
        t_inc = np.arange(result.increment_mean_scale.size)
        t = np.arange(result.psi.size)
        curves = (
            (t_inc, result.increment_mean_scale, "mean of $x_{t+1}-x_t$ (per unit $x_0$)"),
            (t_inc, result.increment_variance, "Var$[x_{t+1}-x_t \\mid x_0]$"),
            (t, result.psi_rate, "$d\\Psi/dt$"),
        )
        for col, (ax, (x, y, title)) in enumerate(zip(row, curves)):
            shade_areas(ax, result.areas, label=col == 2)
            ax.plot(x, y, color="black", lw=1.2)
            ax.set_title(f"{result.schedule}: {title}", fontsize=10)
            ax.set_xlabel("t")
        a = result.areas
        row[2].axvline(a.peak, color="tab:blue", ls="--", lw=0.8)
        row[2].axvline(a.tau, color="tab:red", ls="--", lw=0.8)
        row[2].legend(fontsize=8, title=f"peak {a.peak}, tau {a.tau}", title_fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------- CLI
def _parse_tau(value: str) -> int | str:
    return value if value.strip().lower() == "auto" else int(value)


def main(argv: Sequence[str] | None = None) -> TimestepAnalysis:
    """``python -m lightning_speed.analysis``: print the areas, optionally write the figure."""
    parser = argparse.ArgumentParser(prog="python -m lightning_speed.analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", default="linear", choices=SCHEDULE_NAMES)
    parser.add_argument("--num-timesteps", type=int, default=1000)
    parser.add_argument("--tau", type=_parse_tau, default="auto", help="an integer or 'auto' (default)")
    parser.add_argument("--out", default=None, help="write the figure to this PNG file")
    args = parser.parse_args(list(argv) if argv is not None else None)
    result = analyse(args.schedule, args.num_timesteps, args.tau)
    a = result.areas
    print(f"schedule={result.schedule} T={a.num_timesteps} peak(dPsi/dt)={a.peak} tau={a.tau} (auto pivot {auto_tau(NoiseSchedule.from_name(args.schedule, args.num_timesteps), warn=False)})")
    for name, span in a.ranges().items():
        print(f"  {name:<13} t in [{span.start}, {span.stop})  {100 * len(span) / a.num_timesteps:.1f}% of uniform draws")
    if args.out:
        fig = plot_analysis([args.schedule], args.num_timesteps, args.tau)
        fig.savefig(args.out, dpi=120)
        _pyplot().close(fig)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
