"""The convergence benchmark's figures: FID against step (every run; the headline runs; a screen), loss per area."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.convergence.runs import ABLATIONS, BASELINES, NAMES
from benchmarks.convergence.stats import PROTOCOL_SOLVER, seed_band


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return None
    return plt


def _legend_label(run: dict[str, Any], runs: list[dict[str, Any]]) -> str | None:
    """The strategy's name on its lowest seed's line, so that each strategy is listed once."""
    first = min(r["seed"] for r in runs if r["strategy"] == run["strategy"])
    return run["strategy"] if run["seed"] == first else None


# The headline runs keep their colours in every plot, whatever runs are added; the others cycle through tab20.
FIXED_COLORS = {"uniform": "black", "speed": "#d62728", "speed_weighting_only_lam1": "#1f77b4", "min_snr": "#2ca02c"}


def _color(strategy: str) -> Any:
    import matplotlib

    if strategy in FIXED_COLORS:
        return FIXED_COLORS[strategy]
    others = [r for r in NAMES if r not in FIXED_COLORS]
    i = others.index(strategy) if strategy in others else len(others)
    return matplotlib.colormaps["tab20"]((2 * i + 2) % 20 + ((2 * i + 2) // 20) % 2)  # skip tab20's blue; dark hues first


def plot(results: list[dict[str, Any]], path: Path, solver: str = PROTOCOL_SOLVER) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(10, 5))
    for r in sorted(results, key=lambda r: (r["strategy"], r["seed"])):
        curve = r["fid_history"]
        if not curve:
            continue
        color = _color(r["strategy"])
        ax.plot([s for s, _ in curve], [f for _, f in curve], color=color, marker="o", ms=3,
                label=_legend_label(r, results),
                lw=2.5 if r["strategy"] in ("uniform", "speed") else 1.2,
                ls="--" if r["strategy"] in ABLATIONS else "-")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"FID (Fashion-MNIST features, EMA, {solver.upper()})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: many runs
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# The headline figure: the main pair, the best SpeeD variant we found and the fastest baseline.
HEADLINE = ("uniform", "speed", "speed_weighting_only_lam1", "min_snr")


def plot_headline(results: list[dict[str, Any]], path: Path, solver: str = PROTOCOL_SOLVER) -> None:
    """FID against step for ``HEADLINE``: the mean over seeds, with the range over seeds shaded."""
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in HEADLINE:
        band = seed_band(results, strategy)
        if not band:
            continue
        steps, mean, low, high = zip(*band)
        seeds = len({r["seed"] for r in results if r["strategy"] == strategy})
        ax.plot(steps, mean, color=_color(strategy), marker="o", ms=3, lw=2,
                label=f"{strategy} ({seeds} seed{'s' * (seeds > 1)})")
        if seeds > 1:
            ax.fill_between(steps, low, high, color=_color(strategy), alpha=0.2, lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"FID (Fashion-MNIST features, EMA, {solver.upper()})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(title="mean, range over seeds shaded")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_screen(results: list[dict[str, Any]], screened: dict[str, Any], path: Path,
                solver: str = PROTOCOL_SOLVER) -> None:
    """The screened runs' FID curves (seed means) against the baseline's, with the 2x mark: the baseline's FID at
    twice the stop step, which a 2x strategy reaches by the stop step. Legend in order of FID at the stop; runs
    reported alongside that were not screened (trained to N) are dashed."""
    plt = _pyplot()
    if plt is None or not screened:
        return
    fig, ax = plt.subplots(figsize=(10, 5))
    baselines = {e.get("baseline", BASELINES.get(s, "uniform")) for s, e in screened.items()}
    order = sorted(screened, key=lambda s: sum(screened[s]["fid_per_seed"]) / len(screened[s]["fid_per_seed"]))
    others = sorted({r["strategy"] for r in results} - baselines - set(screened))  # reported alongside: dashed
    for strategy in [*sorted(baselines), *order, *others]:
        band = seed_band(results, strategy)
        if band:
            steps, mean, _, _ = zip(*band)
            ax.plot(steps, mean, color=_color(strategy), marker="o", ms=3, lw=2.5 if strategy in baselines else 1.2,
                    ls="--" if strategy in others else "-", label=strategy)
    for step, target in {(e["step"], e["baseline_fid_at_double"]) for e in screened.values()}:
        ax.axhline(target, color="black", ls=":", lw=1)
        ax.axvline(step, color="black", ls=":", lw=1)
        ax.annotate(f"2x: FID {target:.2f} by step {step}", (step, target), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"FID (Fashion-MNIST features, EMA, {solver.upper()})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title="by FID at the stop step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Runs whose time-step sampler is uniform inside each area, so that their mean loss per area is comparable.
AREA_PLOT = ("uniform", "speed", "speed_sampling_only", "speed_weighting_only", "speed_weighting_only_lam1")


def plot_areas(results: list[dict[str, Any]], path: Path) -> None:
    """Training loss per time-step area against step (TimestepMonitor), one panel per area.

    Only ``AREA_PLOT`` runs: a sampler that is not uniform inside an area (logit-normal, CLTS,
    loss-aware) shifts which t the area's mean loss averages over, so its curve is not comparable.
    """
    plt = _pyplot()
    if plt is None:
        return
    areas = ("acceleration", "deceleration", "convergence")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    shown = [r for r in results if r["strategy"] in AREA_PLOT and r.get("timestep_areas")]
    for r in sorted(shown, key=lambda r: (r["strategy"], r["seed"])):
        for ax, area in zip(axes, areas):
            key = f"timesteps/loss/{area}"
            points = [(row["step"], row[key]) for row in r["timestep_areas"] if key in row]
            if points:
                ax.plot(*zip(*points), color=_color(r["strategy"]), lw=1.2, ls="--" if r["strategy"] in ABLATIONS else "-",
                        label=_legend_label(r, shown) if area == areas[0] else None)
    for ax, area in zip(axes, areas):
        ax.set_title(f"{area}: mean unweighted training loss")
        ax.set_xlabel("training step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
