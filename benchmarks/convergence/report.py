"""Reports of the convergence benchmark: speedups.json per result folder, the speed-up keys of summary.json,
and the figures."""

from __future__ import annotations

import argparse
import inspect
import json
import math
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import load_config, update_summary, write_json
from benchmarks.convergence.plots import plot, plot_areas, plot_headline, plot_screen
from benchmarks.convergence.runs import BASELINES, PER_PART, PER_RUN
from benchmarks.convergence.stats import curve_solver, screen, speedups, summary_keys
from benchmarks.convergence.table import check_cost_matches, load_cost, markdown


def _headline(entry: dict[str, Any]) -> dict[str, Any]:
    """The stable summary.json fields of one strategy's speed-up; "at_least" (true) where they are lower bounds."""
    fields = {f: entry[f] for f in ("mean", "min", "max", "seeds", "steps")}
    return {**fields, "at_least": True} if entry["at_least"] else fields


def _screen_headline(entry: dict[str, Any]) -> dict[str, Any]:
    """The summary.json fields of one screened strategy: its step s, N (the steps its schedule was made for: 2s for a
    run stopped at s, s for a ``budget`` run trained to its end), whether it reaches 2x, and how far it
    got (the baseline's steps to its FID, over s: the mean over seeds, None when a seed's baseline never gets there);
    "how_far_at_most" (true) where a seed's figure is an upper bound (the baseline below its FID already at its first
    evaluation)."""
    how_far, n = entry["equivalent_per_seed"], entry["step"] if entry.get("budget") else 2 * entry["step"]
    fields = {"steps": entry["step"], "N": n, "seeds": len(how_far), "reaches_2x": entry["reaches_2x"],
              "how_far": None if None in how_far else sum(how_far) / len(how_far), "how_far_per_seed": how_far,
              "fid_per_seed": entry["fid_per_seed"], **({"budget": True} if entry.get("budget") else {})}
    return {**fields, "how_far_at_most": True} if any(entry["equivalent_at_most_per_seed"]) else fields


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Collect result.json files, compute speed-ups, write speedups.json and speedups.md (its Markdown tables, with
    wall-clock speed-ups from the step costs of ``args.cost``), plot the curves, update ``args.summary_file``.

    Each strategy is compared with the uniform baseline at its own N: the last step that all its runs and at least
    one uniform run evaluated (ablations may run shorter than the main pair, or evaluate at other steps), and at the
    last such step at or below N/2.
    """
    out = Path(args.out)
    cost = load_cost(args.cost) if getattr(args, "cost", None) else None  # refused here, before any work
    results = load_results([out, *map(Path, args.include)])
    if not results:  # a launch whose runs all failed or never started
        print(f"no results to report yet in {out}")
        return {}
    if cost is not None:
        check_cost_matches(cost, results, args.cost)
    solver = curve_solver(results, out)
    base = base_config(results, args.base)
    check_same_protocol(results)
    uniform_steps = sorted({s for r in results if r["strategy"] == "uniform" for s, _ in r["fid_history"]})
    if not uniform_steps:
        print("no uniform baseline results yet")
        return {}
    tables: dict[int, dict[str, Any]] = {}
    budgets: dict[str, dict[str, int | None]] = {}
    for strategy in sorted({r["strategy"] for r in results} - {"uniform"}):
        runs = [r for r in results if r["strategy"] == strategy]
        # the steps that all its runs and a uniform run evaluated (runs may evaluate at other intervals)
        steps = set(uniform_steps).intersection(*({s for s, _ in r["fid_history"]} for r in runs))
        n = max(steps, default=None)
        half = max((s for s in steps if n and s <= n // 2), default=None)
        budgets[strategy] = {"N": n, "N_half": half}
        for b in (n, half):
            if b and b not in tables:
                tables[b] = speedups(results, b)
    headline = {key: {s: tables[b[key]][s] for s, b in budgets.items() if b[key] and s in tables[b[key]]}
                for key in ("N", "N_half")}
    summary = {"N": headline["N"], "N_half": headline["N_half"], "budgets": budgets,
               "tables": {str(b): t for b, t in sorted(tables.items())},
               "runs": [{k: r[k] for k in ("strategy", "seed", "steps_done", "folder")} for r in results]}
    screened = screen(results, budget=getattr(args, "budget", False))
    if screened:  # runs launched with --stop-at: the 2x test at N = twice their step
        summary["screen"] = screened
    write_json(out / "speedups.json", summary)
    table = markdown(summary, cost)  # the same numbers as tables for BENCHMARKS.md
    (out / "speedups.md").write_text(table)
    if args.plots:
        plot(results, out / "fid_vs_step.png", solver)
        plot_headline(results, out / "fid_vs_step_headline.png", solver)
        plot_areas(results, out / "area_loss.png")
        plot_screen(results, screened, out / "screen.png", solver)
    if not args.smoke and args.summary and headline["N"]:
        # The cards (folders) of its runs and of the baseline its entry was compared with (uniform where its own
        # baseline has no runs, or for a budget screen)
        def sources(strategy: str, field: str, entry: dict[str, Any]) -> str:
            compared = (strategy, entry.get("baseline", BASELINES.get(strategy, "uniform")))
            return ", ".join(sorted({r[field] for r in results if r["strategy"] in compared}))

        keys = summary_keys(solver, base)
        study = getattr(args, "summary_key", None)  # a study's own key: its entries also name N and the EMA decay
        if study:
            keys = (study, f"{study}_half")
        updates = {
            key: {s: {**_headline(v), **({"N": schedule_length(results, s, budgets[s]["N"]), **ema_fields(results, s)}
                                        if study else {}),
                      "card": sources(s, "card", v), "results": sources(s, "folder", v)}
                  for s, v in headline[n].items() if not (study and s in screened)}  # a screen's step is no N
            for key, n in zip(keys, ("N", "N_half"))
        }
        if study and screened:
            updates[f"{study}_screen"] = {s: {**_screen_headline(e), **ema_fields(results, s),
                                              "card": sources(s, "card", e), "results": sources(s, "folder", e)}
                                          for s, e in screened.items()}
        merge_speedups(Path(args.summary_file), updates)
    print(table)
    print(json.dumps({k: summary[k] for k in ("N", "N_half", "budgets", "screen") if k in summary}, indent=1))
    return summary


def schedule_length(results: list[dict[str, Any]], strategy: str, measured: int | None) -> int | None:
    """N, the steps the strategy's runs were scheduled for (``steps_target``; a run may stop before): a study entry
    measured at N / 2, or at a launch's stop, still names the N whose schedule it trained. ``measured`` (the budget at
    N) for results that predate the field; None when the runs disagree."""
    lengths = {r.get("steps_target", measured) for r in results if r["strategy"] == strategy}
    return lengths.pop() if len(lengths) == 1 else None


def ema_fields(results: list[dict[str, Any]], strategy: str) -> dict[str, Any]:
    """A study entry's averaging: ``ema`` (the decay) and, for runs composed with a warm-up config, the warm-up's
    ``ema_warmup_power`` (the decay then grows towards ``ema`` over the run)."""
    power = ema_warmup_power(results, strategy)
    return {"ema": ema_decay(results, strategy), **({} if power is None else {"ema_warmup_power": power})}


def ema_args(run: dict[str, Any]) -> dict[str, Any]:
    """The ``ema.init_args`` a run trained with: its configs' in order, then its ``--ema`` / ``--ema.init_args.*``
    overrides (``--ema null``, as ``--set ema=null`` gives it, trains without an average: no arguments)."""
    args: dict[str, Any] = {}
    for config in run["configs"]:
        ema = load_config(config).get("ema", {})
        args = {} if ema is None else {**args, **((ema or {}).get("init_args") or {})}
    overrides = run.get("overrides", [])
    for flag, value in zip(overrides[::2], overrides[1::2]):  # flag, value pairs, as run.py records them
        if flag == "--ema":  # a whole new callback (or none): the earlier arguments go
            given = yaml.safe_load(value)
            args = dict(given.get("init_args") or {}) if isinstance(given, dict) else {}
        elif flag.startswith("--ema.init_args."):
            args[flag.removeprefix("--ema.init_args.")] = yaml.safe_load(value)
    return args


def ema_warmup_power(results: list[dict[str, Any]], strategy: str) -> float | None:
    """The power of the EMA warm-up a strategy's runs turned on (``ema.init_args.warmup`` true in one of their configs
    or in an override); None without one, or for runs that disagree."""
    from lightning_speed.callbacks.ema import EMAWeightAveraging

    default = inspect.signature(EMAWeightAveraging).parameters["power"].default
    powers = set()
    for r in results:
        if r["strategy"] == strategy:
            args = ema_args(r)
            powers.add(float(args.get("power", default)) if args.get("warmup") else None)
    return powers.pop() if len(powers) == 1 else None


def ema_decay(results: list[dict[str, Any]], strategy: str) -> float | None:
    """The EMA decay a strategy's runs used (``ema_args``; None: no EMA, or runs that disagree)."""
    decays = set()
    for r in results:
        if r["strategy"] == strategy:
            decay = ema_args(r).get("decay")
            decays.add(None if decay is None else float(decay))
    return decays.pop() if len(decays) == 1 else None


def base_config(results: list[dict[str, Any]], default: str) -> str:
    """The base config the runs were composed on (result.json "configs"[0]; ``default`` for results
    written before that field). Runs on different bases answer different questions: refused."""
    bases = {r["configs"][0] if r.get("configs") else default for r in results}
    if len(bases) > 1:
        raise ValueError(f"the runs reported together were trained on different base configs {sorted(bases)}: "
                         "report each base's runs into their own --out folder")
    return bases.pop()


def check_same_protocol(results: list[dict[str, Any]]) -> None:
    """Runs reported together are compared with each other, so they may differ only in their run's config files, seed
    and per-part settings (runs.PER_PART, runs.PER_RUN): another batch, FID sample count or override (``--set``: an
    EMA decay, a learning rate) is another experiment. Refused, naming each setting's runs; a field that a result
    does not record (results from before it) is not checked."""
    def overrides(r: dict[str, Any]) -> frozenset[str] | None:
        pairs = zip(r["overrides"][::2], r["overrides"][1::2]) if "overrides" in r else ()
        return frozenset(f"{k} {v}" for k, v in pairs if k not in PER_PART | PER_RUN) if "overrides" in r else None

    for name, of in (("batch", lambda r: r.get("batch_size")), ("FID samples", lambda r: r.get("fid_samples")),
                     ("overrides", overrides)):
        runs: dict[Any, list[str]] = {}
        for r in results:
            if (value := of(r)) is not None:
                runs.setdefault(value, []).append(f"{r['strategy']}_s{r['seed']} ({r['folder']})")
        if len(runs) < 2:
            continue
        if name == "overrides":  # each set of runs by the overrides that not all runs share
            shared = frozenset.intersection(*runs)
            found = [f"{' '.join(sorted(v - shared)) or 'no other override'}: {rs}" for v, rs in runs.items()]
        else:
            found = [f"{name} {v}: {rs}" for v, rs in sorted(runs.items())]
        raise ValueError(f"the runs reported together differ in their {name} ({'; '.join(found)}): their FIDs answer "
                         "different questions. Report each setting's runs into their own --out folder")


def load_results(folders: list[Path]) -> list[dict[str, Any]]:
    """Every ``<folder>/<run>/result.json``, each marked with its folder's name under ``"folder"``.

    Several folders report together when they follow one protocol (say, new strategies run on another
    card against a folder's uniform baseline). A run found in two folders is ambiguous and refused, and so is
    a run with a FID that is not finite (a diverged run).
    """
    results, seen = [], {}
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"no result folder {folder}: pass folders written by 'python -m benchmarks.convergence launch'")
        for path in sorted(folder.glob("*/result.json")):
            result = {**json.loads(path.read_text()), "folder": folder.name}
            for step, fid in result["fid_history"]:  # a NaN would compare False everywhere: a NaN speed-up
                if not math.isfinite(fid):
                    raise ValueError(f"{path.parent} has FID {fid} at step {step} (a diverged run?): remove or rerun "
                                     "that run")
            run = f"{result['strategy']}_s{result['seed']}"
            if run in seen:
                raise ValueError(f"{run} is in both {seen[run]} and {folder}: report each folder with only one of them")
            seen[run] = folder
            results.append(result)
    return results


def merge_speedups(path: Path, updates: dict[str, dict[str, Any]]) -> None:
    """Replace these strategies' entries in summary.json and keep the others'.

    Result folders are reported one after another (say H200 runs, then H100 runs of some of the
    same strategies): the folder reported last wins for the strategies it has.
    """
    summary = json.loads(path.read_text()) if path.exists() else {}
    update_summary(path, {key: {**summary.get(key, {}), **entries} for key, entries in updates.items()})
