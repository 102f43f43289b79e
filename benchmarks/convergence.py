"""Convergence: does SpeeD reach the uniform baseline's FID in fewer steps?

Each run trains one shipped config (``configs/fashion_mnist_<strategy>.yaml``) through the
project's own CLI objects, evaluates FID (EMA weights, DDIM-50, the offline Fashion-MNIST
feature network) every ``--eval-every`` steps, and writes ``<out>/<strategy>_s<seed>/result.json``
(FID curve, per-area training loss from TimestepMonitor, wall time per part). Ablations
(``ABLATIONS``) are shipped configs with one callback dropped or changed.
Runs execute as processes spread over ``--gpus`` (``--per-gpu`` at a time on each). Every run
checkpoints when it stops (the call's ``--time-limit`` spent, or N reached), and running the
same command again skips finished runs and resumes the others from their checkpoints, so a long
benchmark fits in calls of a few minutes.

    python benchmarks/convergence.py launch --strategies uniform speed --seeds 0 1 --steps 20000 --gpus 0 1
    python benchmarks/convergence.py launch --jobs uniform:0:20000 speed_sampling_only:0:10000 ...
    python benchmarks/convergence.py report --out benchmarks/results/convergence
    python benchmarks/convergence.py launch --smoke ...   # tiny CPU run for the test suite
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Timer

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, device_name, today, update_summary, write_json  # noqa: E402

STRATEGIES = {
    "uniform": "fashion_mnist_uniform.yaml",
    "speed": "fashion_mnist_speed.yaml",
    "speed_auto": "fashion_mnist_speed_auto.yaml",
    "speed_cosine": "fashion_mnist_speed_cosine.yaml",
    "p2": "fashion_mnist_p2.yaml",
    "min_snr": "fashion_mnist_min_snr.yaml",
    "logit_normal": "fashion_mnist_logit_normal.yaml",
    "clts": "fashion_mnist_clts.yaml",
    "loss_aware": "fashion_mnist_loss_aware.yaml",
}
# Ablations for studying SpeeD: a shipped config with one change, named after the change.
# base: a key of STRATEGIES; drop: callback classes removed; set: {callback class: {attribute: value}};
# args: extra command-line arguments for the CLI.


def _weighting_only(**weighting: Any) -> dict[str, Any]:
    """SpeeD's config without asymmetric sampling (uniform t), its ChangeAwareWeighting set to ``weighting``."""
    return {"base": "speed", "drop": ["AsymmetricTimestepSampling"], "set": {"ChangeAwareWeighting": weighting}}


ABLATIONS: dict[str, dict[str, Any]] = {
    "uniform_cosine": {"base": "uniform", "args": ["--model.schedule", "cosine"]},  # the baseline for speed_cosine
    "speed_sampling_only": {"base": "speed", "drop": ["ChangeAwareWeighting"]},  # asymmetric sampling, w = 1
    "speed_weighting_only": {"base": "speed", "drop": ["AsymmetricTimestepSampling"]},  # uniform t, SpeeD's w
    "speed_k2": {"base": "speed", "set": {"AsymmetricTimestepSampling": {"k": 2.0}}},  # milder suppression
    "speed_no_dual": {"base": "speed", "set": {"AsymmetricTimestepSampling": {"dual": False}}},
    # lambda sweep of the best SpeeD variant. lambda 0.5 makes w = 0.5 below tau and 1 above it: only
    # "high-noise steps count twice", with no change-aware shape; lambda 1 gives the full [0, 1] shape below tau.
    "speed_weighting_only_lam05": _weighting_only(lam=0.5),
    "speed_weighting_only_lam1": _weighting_only(lam=1.0),
    "speed_weighting_only_lam08": _weighting_only(lam=0.8),
    # tau of the best variant: the schedule's pivot (642 on linear) and a later one
    "speed_weighting_only_lam1_tau_auto": _weighting_only(lam=1.0, tau="auto"),
    "speed_weighting_only_lam1_tau850": _weighting_only(lam=1.0, tau=850),
    # does the full shape rescue asymmetric sampling? official SpeeD with lambda 1
    "speed_lam1": {"base": "speed", "set": {"ChangeAwareWeighting": {"lam": 1.0}}},
}
RUNS = sorted([*STRATEGIES, *ABLATIONS])
# A strategy on another noise schedule is compared with uniform sampling on that schedule (the default: "uniform").
BASELINES = {"speed_cosine": "uniform_cosine"}
SMOKE_MODEL = [
    "--model.backbone.init_args.base_channels", "16", "--model.backbone.init_args.channel_mult", "[1, 2, 2]",
    "--model.backbone.init_args.num_res_blocks", "1", "--model.backbone.init_args.attention_resolutions", "[]",
    "--model.compile", "false", "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
    "--data.init_args.on_device", "false",
]  # fmt: skip


# ----------------------------------------------------------------------------- one run
class PartTimer(Timer):
    """A time limit for this part of a run only.

    Lightning's Timer (``Trainer(max_time=...)``) restores the time spent before from the
    checkpoint, so a run resumed with a budget smaller than what it had already used stopped at
    once: a whole call spent without a step (seen on the GPU). Each part here has its own budget.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # keep counting from zero


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume) one strategy/seed until ``args.steps`` or the time limit; write result.json."""
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_speed.callbacks import FIDCallback, SampleGridCallback, TimestepMonitor
    from lightning_speed.cli import main as cli_main

    run_dir = Path(args.out) / f"{args.strategy}_s{args.seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "last.ckpt"
    ablation = ABLATIONS.get(args.strategy, {})
    config = STRATEGIES[ablation.get("base", args.strategy)]
    cli_args = [
        "--config", str(REPO / "configs" / config),
        "--seed_everything", str(args.seed),
        "--trainer.max_steps", str(args.steps),
        "--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.logger.init_args.name", "tb",
        "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
    ]  # fmt: skip
    if args.root:
        cli_args += ["--data.init_args.root", args.root]
    if args.batch_size or args.smoke:
        cli_args += ["--data.init_args.batch_size", str(args.batch_size or 16)]
    if args.smoke:
        cli_args += SMOKE_MODEL
    elif args.eager:
        cli_args += ["--model.compile", "false"]
    elif args.compile_sampling:
        cli_args += ["--model.compile_sampling", "true"]
    cli_args += ablation.get("args", [])
    cli = cli_main(cli_args, run=False)
    trainer = cli.trainer
    callbacks = apply_ablation([c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)], ablation)
    for cb in callbacks:
        if isinstance(cb, FIDCallback):
            cb.every_n_steps, cb.num_samples, cb.eval_on_train_end = args.eval_every, args.fid_samples, False
            cb.batch_size = min(cb.batch_size, args.fid_samples)
            cb.sampling_steps, cb.sampler = args.fid_steps, args.fid_sampler
            fid_cb = cb
        if isinstance(cb, TimestepMonitor):
            monitor = cb
            monitor.log_every_n_steps = min(monitor.log_every_n_steps, args.eval_every)
        if isinstance(cb, SampleGridCallback):
            cb.every_n_steps = args.eval_every
            if args.smoke:  # a few small grids, not 64 images x 50 steps on one CPU thread
                cb.num_samples, cb.sampling_steps = min(cb.num_samples, args.fid_samples), args.fid_steps
    trainer.callbacks = [*callbacks, PartTimer(duration=timedelta(seconds=args.time_limit))]
    if args.smoke:
        torch.set_num_threads(1)
    # The previous part's result.json is written right after its checkpoint, so it says where we resume.
    result_file = run_dir / "result.json"
    previous = json.loads(result_file.read_text()) if ckpt.exists() and result_file.exists() else {}
    first_step, parts, start = previous.get("steps_done", 0), previous.get("parts", []), time.perf_counter()
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt) if ckpt.exists() else None)
    trainer.save_checkpoint(ckpt)
    # Wall time of this part (start-up, compilation and FID evaluations included): the cost of the protocol.
    parts.append({"from_step": first_step, "to_step": trainer.global_step,
                  "seconds": round(time.perf_counter() - start, 1), "fid_evaluations": len(fid_cb.history)})
    result = {
        "strategy": args.strategy,
        "seed": args.seed,
        "config": config,
        "ablation": ablation or None,
        "steps_target": args.steps,
        "steps_done": trainer.global_step,
        "batch_size": cli.datamodule.batch_size,
        "fid_samples": args.fid_samples,
        "fid_sampler": f"{args.fid_sampler}-{args.fid_steps}",
        "schedule": cli.model.noise_schedule.name,
        "fid_history": fid_cb.history,
        "fid_seconds": previous.get("fid_seconds", []) + [list(x) for x in fid_cb.seconds],  # every part
        "parts": parts,
        # Per-area loss, weight and share of sampled t (TimestepMonitor), every part appended.
        "timestep_areas": previous.get("timestep_areas", []) + list(monitor.history),
        "card": device_name(),
        "date": today(),
    }
    if trainer.global_step >= args.steps and args.final_samples and args.strategy in args.final_strategies:
        result["final"] = final_fids(trainer, cli.model, fid_cb, args)
    write_json(result_file, result)
    return result


def apply_ablation(callbacks: list[Any], ablation: dict[str, Any]) -> list[Any]:
    """Drop and change callbacks as an ``ABLATIONS`` entry says (before fit: the strategy
    callbacks build their tables from their attributes at setup)."""
    kept = [cb for cb in callbacks if type(cb).__name__ not in ablation.get("drop", ())]
    for cb in kept:
        for attribute, value in ablation.get("set", {}).get(type(cb).__name__, {}).items():
            if not hasattr(cb, attribute):
                raise AttributeError(f"ablation sets {type(cb).__name__}.{attribute}, which does not exist")
            setattr(cb, attribute, value)
    return kept


def final_fids(trainer: Any, module: Any, fid_cb: Any, args: argparse.Namespace) -> dict[str, float]:
    """FID at N with more samples: DDIM-50 and DDPM-250 (EMA weights)."""
    out = {}
    module.to(trainer.strategy.root_device)  # fit's teardown moved the module back to the CPU
    fid_cb.num_samples = args.final_samples
    for sampler, steps in (("ddim", 50), ("ddpm", 250)):
        fid_cb.sampler, fid_cb.sampling_steps = sampler, min(steps, args.fid_steps if args.smoke else steps)
        start = time.perf_counter()
        out[f"{sampler}-{steps}"] = fid_cb.evaluate(trainer, module)
        out[f"{sampler}-{steps}_seconds"] = time.perf_counter() - start
        fid_cb.history.pop()  # keep the curve (and its timings) to its fixed sample count
        fid_cb.seconds.pop()
    return out


# ----------------------------------------------------------------------------- many runs
def launch(args: argparse.Namespace) -> None:
    """Run every (strategy, seed) as a concurrent process, ``--per-gpu`` at a time on each of ``--gpus``.

    Jobs run seed-major (uniform s0, speed s0, uniform s1, ...), so the pairs that decide the
    speed-up finish first. ``--time-limit`` is the budget of this whole call: a run starts only
    if at least ``--min-run-seconds`` remain, and trains until the budget is spent (it then
    checkpoints; the next call resumes it). Runs whose result.json already reached N are skipped.
    """
    deadline = time.monotonic() + args.time_limit
    jobs = [job for job in _jobs(args) if not _finished(args, *job)]
    slots = [gpu for _ in range(args.per_gpu) for gpu in (args.gpus or [None])]  # round-robin over GPUs
    pending, running, failed = list(jobs), [], []
    retried: set[tuple[str, int, int]] = set()
    log_dir = Path(args.out) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    def start(job: tuple[str, int, int], gpu: int | None, extra: list[str]) -> None:
        strategy, seed, steps = job
        left = int(deadline - time.monotonic()) - args.stop_margin
        cmd = [sys.executable, str(Path(__file__).resolve()), "run", "--strategy", strategy, "--seed", str(seed),
               *_forward(args), "--steps", str(steps), "--time-limit", str(max(left, 1)), *extra]
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {}))
        log = open(log_dir / f"{strategy}_s{seed}.log", "a")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        running.append((job, proc, log, gpu, time.time()))
        print(f"started {strategy} seed {seed} to {steps} steps on gpu {gpu} ({left} s left)"
              f"{' ' + ' '.join(extra) if extra else ''}", flush=True)

    while pending or running:
        free = list(slots)
        for item in running:
            free.remove(item[3])
        while pending and free and deadline - time.monotonic() >= args.min_run_seconds:
            start(pending.pop(0), free.pop(0), [])
        if not running:
            break  # the rest does not fit in this call's budget
        time.sleep(1 if args.smoke else 5)
        for item in list(running):
            job, proc, log, gpu, started = item
            if proc.poll() is None:
                if not _stalled(Path(args.out) / f"{job[0]}_s{job[1]}", Path(log.name), args.stall_seconds, started):
                    continue
                # Seen once on the GPU: a run hung in its first FID evaluation. Stop it so it is retried.
                print(f"{job[0]} seed {job[1]}: no output for {args.stall_seconds} s, stopping it", flush=True)
                proc.kill()
                proc.wait()
            running.remove(item)
            log.close()
            print(f"finished {job[0]} seed {job[1]}: exit {proc.returncode}", flush=True)
            if proc.returncode and not args.eager and not args.smoke and job not in retried:
                # A compile or CUDA-graph failure must not cost the whole benchmark: retry eager.
                retried.add(job)
                start(job, gpu, ["--eager"])
            elif proc.returncode:
                failed.append(job)
    if pending:
        print(f"not started (no time left in this call): {pending}", flush=True)
    report(args)
    if failed:
        raise SystemExit(f"runs failed: {failed}; see {log_dir}")


def _stalled(run_dir: Path, log: Path, seconds: float, started: float) -> bool:
    """True when neither the run's log nor any file under its folder changed for ``seconds``.

    The clock starts at ``started`` (the process's start): files left by an earlier part or an
    earlier, killed attempt are older than that and must not count against the new process.
    """
    files = [log, *run_dir.rglob("*")] if run_dir.exists() else [log]
    latest = max([started, *(f.stat().st_mtime for f in files if f.is_file())])
    return time.time() - latest > seconds


def _jobs(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """``--jobs strategy:seed[:steps] ...`` in the given order, else every strategy for each seed in turn."""
    if not args.jobs:
        return [(s, seed, args.steps) for seed in args.seeds for s in args.strategies]
    jobs = []
    for job in args.jobs:
        strategy, seed, *steps = job.split(":")
        if strategy not in RUNS or not seed.isdigit() or len(steps) > 1 or (steps and not steps[0].isdigit()):
            raise SystemExit(f"--jobs takes strategy:seed or strategy:seed:steps with a strategy in {RUNS}, got {job!r}")
        jobs.append((strategy, int(seed), int(steps[0]) if steps else args.steps))
    return jobs


def _finished(args: argparse.Namespace, strategy: str, seed: int, steps: int) -> bool:
    path = Path(args.out) / f"{strategy}_s{seed}" / "result.json"
    return path.exists() and json.loads(path.read_text()).get("steps_done", 0) >= steps


def _forward(args: argparse.Namespace) -> list[str]:
    out = ["--out", args.out, "--eval-every", str(args.eval_every),
           "--fid-samples", str(args.fid_samples), "--fid-steps", str(args.fid_steps), "--fid-sampler", args.fid_sampler,
           "--final-samples", str(args.final_samples), "--final-strategies", *args.final_strategies]  # fmt: skip
    if args.root:
        out += ["--root", args.root]
    if args.batch_size:
        out += ["--batch-size", str(args.batch_size)]
    if args.smoke:
        out.append("--smoke")
    if not args.compile_sampling:
        out.append("--no-compile-sampling")
    return out


# ----------------------------------------------------------------------------- the figure of merit
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
    """The mean FID curve up to ``budget`` of a baseline's runs that evaluated ``budget``, and their number."""
    curves = [dict(r["fid_history"]) for r in results if r["strategy"] == strategy]
    curves = [curve for curve in curves if budget in curve]
    return [(s, mean) for s, mean, _, _ in _band(curves) if s <= budget], len(curves)


def speedups(results: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """Speed-up = budget / first step reaching the baseline's mean FID at ``budget``.

    The baseline is uniform sampling on the same schedule (BASELINES), or on the linear schedule when the
    folder has no such runs (each entry names its baseline). Only runs whose curve reaches ``budget`` count.
    """
    uniform_curve, uniform_seeds = _mean_curve(results, "uniform", budget)
    if not uniform_curve:
        return {}
    out: dict[str, Any] = {"_baseline_fid": uniform_curve[-1][1], "_baseline_seeds": uniform_seeds}
    for strategy in sorted({r["strategy"] for r in results} - {"uniform"}):
        baseline = BASELINES.get(strategy, "uniform")
        mean_curve, baseline_seeds = _mean_curve(results, baseline, budget)
        if not mean_curve:
            baseline, mean_curve, baseline_seeds = "uniform", uniform_curve, uniform_seeds
        target = mean_curve[-1][1]  # the baseline's mean FID at the budget
        per_seed, fids, equivalent = [], [], []
        for r in results:
            if r["strategy"] != strategy:
                continue
            curve = [(s, f) for s, f in r["fid_history"] if s <= budget]
            if not curve or curve[-1][0] < budget:
                continue
            reach = first_step_reaching(curve, target)
            per_seed.append(budget / reach if reach else None)
            fids.append(fid_at(curve, budget))
            # The reverse view, defined when the strategy is slower: the steps the baseline needs to
            # reach this run's FID at the budget, over the budget (None: the baseline never gets there).
            baseline_reach = first_step_reaching(mean_curve, fids[-1])
            equivalent.append(baseline_reach / budget if baseline_reach else None)
        if not per_seed:
            continue
        reached = [v for v in per_seed if v is not None]
        out[strategy] = {
            "mean": sum(reached) / len(reached) if len(reached) == len(per_seed) else None,
            # A seed that never reached the target has a speed-up below 1 (unknown): then min is unknown too.
            "min": min(reached) if reached and len(reached) == len(per_seed) else None,
            "max": max(reached) if reached else None,
            "per_seed": per_seed,
            "seeds": len(per_seed),
            "steps": budget,
            "fid_at_steps": fids,
            "equivalent_per_seed": equivalent,
            "note": None if len(reached) == len(per_seed) else "some seeds never reached the baseline FID (speed-up < 1)",
            "baseline": baseline,
            "baseline_fid": target,
            "baseline_seeds": baseline_seeds,
        }
    return out


def _headline(entry: dict[str, Any]) -> dict[str, Any]:
    """The stable summary.json fields of one strategy's speed-up."""
    return {f: entry[f] for f in ("mean", "min", "max", "seeds", "steps")}


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Collect result.json files, compute speed-ups, plot the curves, update summary.json.

    Each strategy is compared with the uniform baseline at its own N: the last evaluation step that
    all its runs and at least one uniform run reached (ablations may run shorter than the main
    pair), and at the evaluation step nearest below N/2.
    """
    out = Path(args.out)
    results = load_results([out, *map(Path, args.include)])
    sampler = curve_sampler(results, out)
    uniform_steps = sorted({s for r in results if r["strategy"] == "uniform" for s, _ in r["fid_history"]})
    if not results or not uniform_steps:
        print("no uniform baseline results yet")
        return {}
    tables: dict[int, dict[str, Any]] = {}
    budgets: dict[str, dict[str, int | None]] = {}
    for strategy in sorted({r["strategy"] for r in results} - {"uniform"}):
        runs = [r for r in results if r["strategy"] == strategy]
        last = min((r["fid_history"][-1][0] if r["fid_history"] else 0) for r in runs)
        n = max((s for s in uniform_steps if s <= last), default=None)
        half = max((s for s in uniform_steps if n and s <= n // 2), default=None)
        budgets[strategy] = {"N": n, "N_half": half}
        for b in (n, half):
            if b and b not in tables:
                tables[b] = speedups(results, b)
    headline = {key: {s: tables[b[key]][s] for s, b in budgets.items() if b[key] and s in tables[b[key]]}
                for key in ("N", "N_half")}
    summary = {"N": headline["N"], "N_half": headline["N_half"], "budgets": budgets,
               "tables": {str(b): t for b, t in sorted(tables.items())},
               "runs": [{k: r[k] for k in ("strategy", "seed", "steps_done", "folder")} for r in results]}
    write_json(out / "speedups.json", summary)
    plot(results, out / "fid_vs_step.png", sampler)
    plot_headline(results, out / "fid_vs_step_headline.png", sampler)
    plot_areas(results, out / "area_loss.png")
    if not args.smoke and args.summary and headline["N"]:
        def sources(strategy: str, field: str) -> str:  # the cards (folders) of its runs and its baseline's
            compared = (strategy, BASELINES.get(strategy, "uniform"))
            return ", ".join(sorted({r[field] for r in results if r["strategy"] in compared}))

        _merge_speedups(RESULTS / "summary.json", {
            key: {s: {**_headline(v), "card": sources(s, "card"), "results": sources(s, "folder")}
                  for s, v in headline[n].items()}
            for key, n in zip(summary_keys(sampler), ("N", "N_half"))
        })
    print(json.dumps({k: summary[k] for k in ("N", "N_half", "budgets")}, indent=1))
    return summary


def load_results(folders: list[Path]) -> list[dict[str, Any]]:
    """Every ``<folder>/<run>/result.json``, each marked with its folder's name under ``"folder"``.

    Several folders report together when they follow one protocol (say, new strategies run on another
    card against a folder's uniform baseline). A run found in two folders is ambiguous and refused.
    """
    results, seen = [], {}
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"no result folder {folder}: pass folders written by 'convergence.py launch'")
        for path in sorted(folder.glob("*/result.json")):
            result = {**json.loads(path.read_text()), "folder": folder.name}
            run = f"{result['strategy']}_s{result['seed']}"
            if run in seen:
                raise ValueError(f"{run} is in both {seen[run]} and {folder}: report each folder with only one of them")
            seen[run] = folder
            results.append(result)
    return results


PROTOCOL_SAMPLER = "ddim-50"  # the FID curve's sampler in BENCHMARK.md; summary.json's "speedup" uses it


def curve_sampler(results: list[dict[str, Any]], folder: Path) -> str:
    """The one sampler ("ddim-50", "ddpm-250", ...) of every FID curve in ``folder``.

    Speed-ups compare FIDs across runs, and FIDs of different samplers are not comparable: a folder
    mixing them is refused rather than reported.
    """
    by_sampler: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_sampler.setdefault(r.get("fid_sampler", PROTOCOL_SAMPLER), []).append(r)
    if len(by_sampler) > 1:
        runs = {s: [f"{r['strategy']}_s{r['seed']}" for r in rs] for s, rs in sorted(by_sampler.items())}
        raise ValueError(
            f"the runs reported into {folder} mix FID curves of different samplers {runs}: "
            "their FIDs are not comparable. Launch each sampler into its own --out folder and report them separately."
        )
    return next(iter(by_sampler), PROTOCOL_SAMPLER)


def summary_keys(sampler: str) -> tuple[str, str]:
    """summary.json keys of the speed-ups at N and N/2: the stable ones for the protocol's sampler,
    suffixed ones (``speedup_ddpm250``) for another, so that a sampler study never replaces the headline."""
    suffix = "" if sampler == PROTOCOL_SAMPLER else "_" + sampler.replace("-", "")
    return f"speedup{suffix}", f"speedup_half{suffix}"


def _merge_speedups(path: Path, updates: dict[str, dict[str, Any]]) -> None:
    """Replace these strategies' entries in summary.json and keep the others'.

    Result folders are reported one after another (say H200 runs, then H100 runs of some of the
    same strategies): the folder reported last wins for the strategies it has.
    """
    summary = json.loads(path.read_text()) if path.exists() else {}
    update_summary(path, {key: {**summary.get(key, {}), **entries} for key, entries in updates.items()})


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
    others = [r for r in RUNS if r not in FIXED_COLORS]
    i = others.index(strategy) if strategy in others else len(others)
    return matplotlib.colormaps["tab20"]((2 * i + 2) % 20 + ((2 * i + 2) // 20) % 2)  # skip tab20's blue; dark hues first


def plot(results: list[dict[str, Any]], path: Path, sampler: str = PROTOCOL_SAMPLER) -> None:
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
    ax.set_ylabel(f"FID (Fashion-MNIST features, EMA, {sampler.upper()})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: many runs
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# The headline figure: the main pair, the best SpeeD variant we found and the fastest baseline.
HEADLINE = ("uniform", "speed", "speed_weighting_only_lam1", "min_snr")


def plot_headline(results: list[dict[str, Any]], path: Path, sampler: str = PROTOCOL_SAMPLER) -> None:
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
    ax.set_ylabel(f"FID (Fashion-MNIST features, EMA, {sampler.upper()})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(title="mean, range over seeds shaded")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Runs whose sampler is uniform inside each area, so that their mean loss per area is comparable.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["launch", "run", "report"])
    p.add_argument("--strategies", nargs="+", default=["uniform", "speed"], choices=RUNS)
    p.add_argument("--strategy", choices=RUNS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", nargs="+", default=None,
                   help="launch: explicit strategy:seed[:steps] list (steps default: --steps), run in this order")
    p.add_argument("--steps", type=int, default=20_000, help="N: the training budget")
    p.add_argument("--eval-every", type=int, default=2_000)
    p.add_argument("--fid-samples", type=int, default=5_000)
    p.add_argument("--fid-steps", type=int, default=50)
    p.add_argument("--fid-sampler", choices=["ddim", "ddpm"], default="ddim", help="sampler of the FID curve")
    p.add_argument("--final-samples", type=int, default=0, help="if > 0: FID with this many samples at N (DDIM-50, DDPM-250)")
    p.add_argument("--final-strategies", nargs="+", default=["uniform", "speed"], choices=RUNS,
                   help="the strategies that get the final FIDs")
    p.add_argument("--no-compile-sampling", dest="compile_sampling", action="store_false",
                   help="sample eagerly for FID (default: compiled sampling network, on the GPU)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--gpus", type=int, nargs="+", default=None, help="GPU indices to spread runs over (default: the visible one)")
    p.add_argument("--per-gpu", type=int, default=1, help="concurrent runs per GPU")
    p.add_argument("--time-limit", type=int, default=540, help="launch: seconds for this whole call; run: seconds of training")
    p.add_argument("--min-run-seconds", type=int, default=120, help="launch: start no run with less time than this left")
    p.add_argument("--stop-margin", type=int, default=40, help="launch: seconds kept for start-up and the final checkpoint")
    p.add_argument("--stall-seconds", type=float, default=300,
                   help="launch: stop (and retry once, eager) a run whose files have not changed for this long")
    p.add_argument("--root", default=None)
    p.add_argument("--out", default=str(RESULTS / "convergence"))
    p.add_argument("--include", nargs="+", default=[], metavar="FOLDER",
                   help="report: also read these result folders (same protocol, e.g. the uniform baseline of "
                        "another card); speedups.json and the plots still go to --out")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--no-summary", dest="summary", action="store_false",
                   help="report: leave benchmarks/results/summary.json alone")
    p.add_argument("--eager", action="store_true", help="train without torch.compile")
    args = p.parse_args()
    if args.command == "run":
        if not args.strategy:
            p.error("run needs --strategy")
        run_one(args)
    elif args.command == "launch":
        launch(args)
    else:
        try:
            report(args)
        except (ValueError, FileNotFoundError) as error:  # mixed samplers, a run in two folders, a missing folder
            p.exit(2, f"convergence.py report: {error}\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
