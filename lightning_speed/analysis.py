"""The time-step analysis behind SpeeD's Figure 1, for any noise schedule: figures and their CLI.

Given x_0, the forward process x_{t+1} = sqrt(1 - b_{t+1}) x_t + sqrt(b_{t+1}) eps has the
increment delta_t = x_{t+1} - x_t = (sqrt(1 - b_{t+1}) - 1) x_t + sqrt(b_{t+1}) eps, so

* its mean is (sqrt(alpha_bar_{t+1}) - sqrt(alpha_bar_t)) x_0 (it shrinks to 0 as t grows);
* its variance per dimension is (sqrt(1 - b_{t+1}) - 1)^2 (1 - alpha_bar_t) + b_{t+1}
  (Var[x_t | x_0] = 1 - alpha_bar_t and eps is independent of x_t).

The schedule facts the strategies use (Psi, its rate, the pivot, tau "auto", the three areas)
live in ``lightning_speed.schedules``; this module plots them. Nothing in the package imports it.

Command line: ``python -m lightning_speed.analysis --schedule linear --num-timesteps 1000
--out analysis.png`` writes the figure (needs matplotlib) and prints the areas.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from lightning_speed.schedules import (
    SCHEDULE_NAMES,
    NoiseSchedule,
    Tau,
    TimestepAreas,
    auto_tau,
    timestep_areas,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


# ---------------------------------------------------------------------------- per-t curves
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


@dataclass(frozen=True)
class TimestepAnalysis:
    """Everything Figure 1 plots, as float64 numpy arrays (increments have length T - 1)."""

    schedule: str
    increment_mean_scale: np.ndarray
    increment_variance: np.ndarray
    psi: np.ndarray
    psi_rate: np.ndarray
    areas: TimestepAreas


def analyse(schedule: NoiseSchedule | str, num_timesteps: int = 1000, tau: Tau = "auto") -> TimestepAnalysis:
    """Compute the increment statistics, Psi, d/dt Psi and the areas of a schedule."""
    s = NoiseSchedule.create(schedule, num_timesteps)
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
    tau: Tau = "auto",
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
    if value.strip().lower() == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tau must be an integer time step or 'auto', got {value!r}.") from None


def main(argv: Sequence[str] | None = None) -> TimestepAnalysis:
    """``python -m lightning_speed.analysis``: print the areas, optionally write the figure."""
    parser = argparse.ArgumentParser(prog="python -m lightning_speed.analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", default="linear", choices=SCHEDULE_NAMES)
    parser.add_argument("--num-timesteps", type=int, default=1000)
    parser.add_argument("--tau", type=_parse_tau, default="auto", help="an integer or 'auto' (default)")
    parser.add_argument("--out", default=None, help="write the figure to this PNG file")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        result = analyse(args.schedule, args.num_timesteps, args.tau)
    except ValueError as err:  # a value out of range: its message, not a traceback
        parser.error(str(err))
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
