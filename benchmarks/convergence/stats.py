"""The figure of merit: the steps a run needs to reach the baseline's FID, from hand-checkable curve arithmetic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.convergence.runs import BASE, BASE_KEYS, BASELINES, PROTOCOL_SOLVERS

PROTOCOL_SOLVER = "ddim-50"  # the FID curve's solver in BENCHMARKS.md (runs.PROTOCOL_SOLVERS: other bases')


def first_step_reaching(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step, linearly interpolated, at which the FID curve falls to ``target``."""
    prev = None
    for step, fid in curve:
        if fid <= target:
            if prev is None or prev[1] == fid:
                return float(step)
            s0, f0 = prev
            return s0 + (f0 - target) / (f0 - fid) * (step - s0)
        prev = (step, fid)
    return None


def reached_before_first_evaluation(curve: list[tuple[int, float]], target: float) -> bool:
    """Whether the curve is already below ``target`` at its first evaluation after step 0: it crossed at some
    earlier, unmeasured step, so ``first_step_reaching`` gives only an upper bound on the crossing."""
    return bool(curve) and curve[0][0] > 0 and curve[0][1] < target


def fid_at(curve: list[tuple[int, float]], step: int) -> float | None:
    return next((f for s, f in curve if s == step), None)


def _band(curves: list[dict[int, float]]) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) of FID over ``curves`` ({step: FID}), at the steps all of them evaluated."""
    if not curves:
        return []
    steps = sorted(set.intersection(*map(set, curves)))
    return [(s, sum(c[s] for c in curves) / len(curves), min(c[s] for c in curves), max(c[s] for c in curves))
            for s in steps]


def seed_band(results: list[dict[str, Any]], strategy: str) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) of FID over a strategy's seeds, at the steps every one of its seeds evaluated."""
    return _band([dict(r["fid_history"]) for r in results if r["strategy"] == strategy and r["fid_history"]])


def _mean_curve(results: list[dict[str, Any]], strategy: str, budget: int) -> tuple[list[tuple[int, float]], int]:
    """The mean FID curve of a baseline's runs that evaluated ``budget`` (all of it: the reverse views read past the
    budget), and their number."""
    curves = [dict(r["fid_history"]) for r in results if r["strategy"] == strategy]
    curves = [curve for curve in curves if budget in curve]
    return [(s, mean) for s, mean, _, _ in _band(curves)], len(curves)


def speedups(results: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """Speed-up = budget / first step reaching the baseline's mean FID at ``budget``.

    A run already below that FID at its first evaluation crossed it at an unmeasured earlier step: its speed-up is
    at least the figure given (``at_least_per_seed``; "at_least" when any seed's is). The reverse view is bounded
    the same way when the baseline is below the run's FID at its own first evaluation (``equivalent_at_most_per_seed``).

    The baseline is uniform sampling on the same schedule (BASELINES), or on the linear schedule when the
    folder has no such runs (each entry names its baseline); a strategy whose baseline has runs, none of which
    evaluated ``budget``, gets no entry. Only runs whose curve reaches ``budget`` count.
    """
    uniform_curve, uniform_seeds = _mean_curve(results, "uniform", budget)
    if not uniform_curve:
        return {}
    out: dict[str, Any] = {"_baseline_fid": fid_at(uniform_curve, budget), "_baseline_seeds": uniform_seeds}
    for strategy in sorted({r["strategy"] for r in results} - {"uniform"}):
        baseline = BASELINES.get(strategy, "uniform")
        mean_curve, baseline_seeds = _mean_curve(results, baseline, budget)
        if not mean_curve:
            if any(r["strategy"] == baseline for r in results):
                continue  # its own baseline has not evaluated the budget: no other baseline stands in for it
            baseline, mean_curve, baseline_seeds = "uniform", uniform_curve, uniform_seeds
        target = fid_at(mean_curve, budget)  # the baseline's mean FID at the budget
        per_seed, fids, equivalent, at_least, at_most = [], [], [], [], []
        for r in results:
            if r["strategy"] != strategy:
                continue
            curve = [(s, f) for s, f in r["fid_history"] if s <= budget]
            if not curve or curve[-1][0] < budget:
                continue
            reach = first_step_reaching(curve, target)
            per_seed.append(budget / reach if reach else None)
            at_least.append(reach is not None and reached_before_first_evaluation(curve, target))
            fids.append(fid_at(curve, budget))
            # The reverse view: the steps the baseline needs to reach this run's FID at the budget, over the
            # budget (None: its curve never gets there, past the budget included).
            baseline_reach = first_step_reaching(mean_curve, fids[-1])
            equivalent.append(baseline_reach / budget if baseline_reach else None)
            at_most.append(baseline_reach is not None and reached_before_first_evaluation(mean_curve, fids[-1]))
        if not per_seed:
            continue
        reached = [v for v in per_seed if v is not None]
        out[strategy] = {
            "mean": sum(reached) / len(reached) if len(reached) == len(per_seed) else None,
            # A seed that never reached the target has a speed-up below 1 (unknown): then min is unknown too.
            "min": min(reached) if reached and len(reached) == len(per_seed) else None,
            "max": max(reached) if reached else None,
            "per_seed": per_seed,
            "at_least": any(at_least),
            "at_least_per_seed": at_least,
            "seeds": len(per_seed),
            "steps": budget,
            "fid_at_steps": fids,
            "equivalent_per_seed": equivalent,
            "equivalent_at_most_per_seed": at_most,
            "note": None if len(reached) == len(per_seed) else "some seeds never reached the baseline FID (speed-up < 1)",
            "baseline": baseline,
            "baseline_fid": target,
            "baseline_seeds": baseline_seeds,
        }
    return out



def screen(results: list[dict[str, Any]], budget: bool = False) -> dict[str, Any]:
    """For runs stopped early (``--stop-at s``): does each strategy reach, by step s, the FID uniform has at 2s?

    A strategy that is twice as fast as uniform at N = 2s must; one that does not is not. Per strategy whose runs
    all stopped at one step s of N = 2s's schedule (a schedule of another N, such as a curriculum's, trains another
    run), with a uniform curve that reaches 2s: its FIDs at s, uniform's mean FID at 2s, and how
    far each seed got: the steps uniform's mean curve needs to reach its FID, over s (None: never; a bound, "at most",
    when uniform is below it already at its first evaluation).

    With ``budget``, a strategy whose runs all trained their whole schedule of s steps (no stop) takes the same test
    when uniform runs reach 2s: "trained for half of uniform's steps, with a schedule made for that budget (a
    learning rate annealed by s), is it as good?". Its entry says ``budget``; its baseline is plain uniform (its own
    baseline trained the same s steps). Opt-in: at a constant rate it only repeats what the speed-ups say, and where
    uniform's curve is flat between N and 2N (the UNet) it reads a plateau as 2x.
    """
    out: dict[str, Any] = {}
    for strategy in sorted({r["strategy"] for r in results} - {"uniform"}):
        runs = [r for r in results if r["strategy"] == strategy]
        stops = {r.get("stop_at") for r in runs}
        if stops == {None} and budget:  # trained to the end of its schedule: a budget run if uniform reaches twice it
            lengths = {r.get("steps_target") for r in runs}
            if len(lengths) != 1 or None in lengths or any(r["steps_done"] < r["steps_target"] for r in runs):
                continue
            (step,), baseline_name, whole = lengths, "uniform", True
        elif len(stops) != 1 or None in stops:
            continue
        else:
            (step,), baseline_name, whole = stops, BASELINES.get(strategy, "uniform"), False
            if any(r.get("steps_target", 2 * step) != 2 * step for r in runs):  # results without N: before the field
                continue
        baseline, seeds = _mean_curve(results, baseline_name, 2 * step)
        fids = [fid_at(r["fid_history"], step) for r in runs]
        if not baseline or None in fids:
            continue
        target = fid_at(baseline, 2 * step)
        reach = [first_step_reaching(baseline, f) for f in fids]  # how far each got: the baseline's steps to its FID
        out[strategy] = {"step": step, "fid_per_seed": fids, "baseline_fid_at_double": target,
                         "baseline_seeds": seeds, "reaches_2x": all(f <= target for f in fids),
                         "equivalent_per_seed": [r / step if r else None for r in reach],
                         "equivalent_at_most_per_seed": [r is not None and reached_before_first_evaluation(baseline, f)
                                                         for r, f in zip(reach, fids)],
                         **({"budget": True, "baseline": baseline_name} if whole else {})}
    return out


def run_solver(result: dict[str, Any]) -> str:
    """The solver of a run's FID curve: "fid_solver" ("fid_sampler" in results written before the naming
    rule; neither in the first results, which all used the protocol's DDIM-50)."""
    return result.get("fid_solver", result.get("fid_sampler", PROTOCOL_SOLVER))


def curve_solver(results: list[dict[str, Any]], folder: Path) -> str:
    """The one solver ("ddim-50", "ddpm-250", ...) of every FID curve in ``folder``.

    Speed-ups compare FIDs across runs, and FIDs of different solvers are not comparable: a folder
    mixing them is refused rather than reported.
    """
    by_solver: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_solver.setdefault(run_solver(r), []).append(r)
    if len(by_solver) > 1:
        runs = {s: [f"{r['strategy']}_s{r['seed']}" for r in rs] for s, rs in sorted(by_solver.items())}
        raise ValueError(
            f"the runs reported into {folder} mix FID curves of different solvers {runs}: "
            "their FIDs are not comparable. Launch each solver into its own --out folder and report them separately."
        )
    return next(iter(by_solver), PROTOCOL_SOLVER)


def summary_keys(solver: str, base: str = BASE) -> tuple[str, str]:
    """summary.json keys of the speed-ups at N and N/2: the stable ones for the protocol's solver,
    suffixed ones (``speedup_ddpm250``) for another, so that a solver study never replaces the headline;
    a study on another base config gets its own prefix (``speedup_dit``: BASE_KEYS)."""
    suffix = "" if solver == PROTOCOL_SOLVERS.get(base, PROTOCOL_SOLVER) else "_" + solver.replace("-", "")
    prefix = BASE_KEYS.get(base, "speedup_" + Path(base).stem)
    return f"{prefix}{suffix}", f"{prefix}_half{suffix}"
