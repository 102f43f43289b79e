"""Many runs of the convergence benchmark as concurrent processes, resumable across launches."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.common import REPO
from benchmarks.convergence.report import report
from benchmarks.convergence.runs import CONFIGS, NAMES


def launch(args: argparse.Namespace) -> None:
    """Run every (run, seed) as a concurrent process, ``--per-gpu`` at a time on each of ``--gpus``.

    Jobs run seed-major (uniform s0, speed s0, uniform s1, ...), so the pairs that decide the
    speed-up finish first. Without ``--time-limit`` every run trains to its N. With it, the limit
    holds for this whole launch: a run starts only if at least ``--min-run-seconds`` remain, and
    stops ``--stop-margin`` seconds before the launch's deadline (inside an FID evaluation: after its
    current sampling batch), then saves its checkpoint and result.json; the next launch resumes it.
    The margin is for that batch and the save: a run still going at the deadline is killed (its last
    part is lost, not its earlier ones). Runs whose result.json already reached N are skipped.
    """
    if args.time_limit and args.stop_margin >= args.min_run_seconds:
        raise SystemExit(f"--stop-margin {args.stop_margin} leaves runs started with --min-run-seconds "
                         f"{args.min_run_seconds} left no time to train: make --min-run-seconds the larger")
    if args.time_limit and args.time_limit < args.min_run_seconds:
        raise SystemExit(f"--time-limit {args.time_limit} is shorter than --min-run-seconds {args.min_run_seconds}: no "
                         "run would start; give the launch more time or lower --min-run-seconds")
    interval = _eval_interval(args)
    if args.stop_at and interval and args.stop_at % interval:
        raise SystemExit(f"--stop-at {args.stop_at} is no step the FID evaluates (every {interval} steps): the screen "
                         f"would have no FID at its stop; give a multiple of {interval}, or an --eval-every that "
                         "divides it")
    if args.gpus and len(set(args.gpus)) < len(args.gpus):
        raise SystemExit(f"--gpus {' '.join(map(str, args.gpus))} names a GPU more than once: name each once, and set "
                         "the runs per GPU with --per-gpu")
    began = time.monotonic()
    deadline = began + args.time_limit if args.time_limit else math.inf
    jobs = [job for job in jobs_of(args) if not _finished(args, *job)]
    steps_before = {job: _steps_done(args, *job[:2]) for job in jobs}
    slots = [gpu for _ in range(args.per_gpu) for gpu in (args.gpus or [None])]  # round-robin over GPUs
    pending, running, failed, killed = list(jobs), [], [], []
    retried: set[tuple[str, int, int]] = set()
    log_dir = Path(args.out) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    def start(job: tuple[str, int, int], gpu: int | None) -> None:
        strategy, seed, steps = job
        extra = ["--eager"] if job in retried else []
        left = deadline - time.monotonic() - args.stop_margin  # the run counts it from its start; inf without a limit
        limit = [] if math.isinf(left) else ["--time-limit", str(max(int(left), 1))]
        left_text = f"{limit[1]} s left" if limit else "no time limit"
        cmd = [sys.executable, "-m", "benchmarks.convergence", "run", "--strategy", strategy, "--seed", str(seed),
               *_forward(args), "--steps", str(steps), *limit, *extra]
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {}))
        log = open(log_dir / f"{strategy}_s{seed}.log", "a")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        running.append((job, proc, log, gpu, time.time()))
        print(f"started {strategy} seed {seed} to {steps} steps on gpu {gpu} ({left_text})"
              f"{' ' + ' '.join(extra) if extra else ''}", flush=True)

    while pending or running:
        free = list(slots)
        for item in running:
            free.remove(item[3])
        while pending and free and deadline - time.monotonic() >= args.min_run_seconds:
            start(pending.pop(0), free.pop(0))
        if not running:
            break  # the rest does not fit in this launch's time limit
        time.sleep(max(0.1, min(1 if args.smoke else 5, deadline - time.monotonic())))  # wake at the deadline too
        for item in list(running):
            job, proc, log, gpu, started = item
            late = time.monotonic() >= deadline
            if proc.poll() is None:
                if late:  # its own stop came --stop-margin earlier: the batch in progress or the save took longer
                    print(f"{job[0]} seed {job[1]}: still running at the launch's deadline, killing it (raise "
                          f"--stop-margin)", flush=True)
                elif stalled(Path(args.out) / f"{job[0]}_s{job[1]}", Path(log.name), args.stall_seconds, started):
                    # A run can hang (once: in its first FID evaluation). Stop it so that it is retried.
                    print(f"{job[0]} seed {job[1]}: no output for {args.stall_seconds} s, stopping it", flush=True)
                else:
                    continue
                proc.kill()
                proc.wait()
            running.remove(item)
            log.close()
            print(f"finished {job[0]} seed {job[1]}: exit {proc.returncode}", flush=True)
            if proc.returncode and not late and not args.eager and not args.smoke and job not in retried:
                # A compile or CUDA-graph failure must not cost the whole benchmark: retry eager, time permitting.
                retried.add(job)
                pending.insert(0, job)
            elif proc.returncode:
                (killed if late else failed).append(job)
    if pending:
        print(f"not started (no time left in this launch): {pending}", flush=True)
    trained = sum(_steps_done(args, *job[:2]) - before for job, before in steps_before.items())
    seconds = time.monotonic() - began
    print(f"trained {trained} steps in {seconds:.0f} s: {trained / max(seconds, 1e-9):.1f} steps/s in all, on "
          f"{len(args.gpus or [None])} GPU(s) with up to {args.per_gpu} runs each (compilation and FID included)",
          flush=True)
    report(args)
    problems = [f"runs failed: {failed}; see {log_dir}"] if failed else []
    if killed:  # not failures of the run: each resumes from its last checkpoint when launched again
        problems.append(f"runs killed at the deadline, before their own stop had saved them: {killed}; the same "
                        "command resumes each from its last checkpoint; raise --stop-margin")
    if problems:
        raise SystemExit("\n".join(problems))


def _eval_interval(args: argparse.Namespace) -> int | None:
    """The FID's interval in steps: ``--eval-every``, else the base config's ``fid`` (None when it names none)."""
    if args.eval_every:
        return args.eval_every
    try:
        config = yaml.safe_load((CONFIGS / args.base).read_text()) or {}
    except (OSError, yaml.YAMLError):  # the run reports a base it cannot read
        return None
    fid = config.get("fid") if isinstance(config, dict) else None
    every = (fid.get("init_args") or {}).get("every_n_steps") if isinstance(fid, dict) else None
    return every if isinstance(every, int) and every > 0 else None


def stalled(run_dir: Path, log: Path, seconds: float, started: float) -> bool:
    """True when neither the run's log nor any file under its folder changed for ``seconds``.

    The clock starts at ``started`` (the process's start): files left by an earlier part or an
    earlier, killed attempt are older than that and must not count against the new process.
    """
    files = [log, *run_dir.rglob("*")] if run_dir.exists() else [log]
    latest = max([started, *(f.stat().st_mtime for f in files if f.is_file())])
    return time.time() - latest > seconds


def jobs_of(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """``--jobs run:seed[:steps] ...`` in the given order, else every run of ``--strategies`` for each seed in turn.

    A run listed twice is refused: both processes would train in its one folder at the same time."""
    if not args.jobs:
        jobs = [(s, seed, args.steps) for seed in args.seeds for s in args.strategies]
    else:
        jobs = []
        for job in args.jobs:
            strategy, seed, *steps = job.split(":")
            if (strategy not in NAMES or not seed.isdigit() or len(steps) > 1
                    or (steps and not (steps[0].isdigit() and int(steps[0]) > 0))):
                raise SystemExit(f"--jobs takes strategy:seed or strategy:seed:steps (steps at least 1) with a "
                                 f"strategy in {NAMES}, got {job!r}")
            jobs.append((strategy, int(seed), int(steps[0]) if steps else args.steps))
    runs = [f"{strategy}:{seed}" for strategy, seed, _ in jobs]
    if twice := sorted({run for run in runs if runs.count(run) > 1}):
        raise SystemExit(f"runs {twice} are listed more than once: give each strategy and seed once, with the steps "
                         "to train it to")
    return jobs


def _finished(args: argparse.Namespace, strategy: str, seed: int, steps: int) -> bool:
    """The run reached N (a screen: its stop step) with every FID point (none left to its next part) and the final
    FIDs asked for (made at N only)."""
    result = _result(args, strategy, seed)
    if result is None:
        return False
    stop = min(steps, args.stop_at or steps)
    wants_final = args.final_samples and strategy in args.final_strategies and stop == steps
    return (result.get("steps_done", 0) >= stop and result.get("fid_pending") is None
            and (not wants_final or "final" in result))


def _result(args: argparse.Namespace, strategy: str, seed: int) -> dict | None:
    """The run's result.json (None before its first part)."""
    path = Path(args.out) / f"{strategy}_s{seed}" / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def _steps_done(args: argparse.Namespace, strategy: str, seed: int) -> int:
    """The steps a run's result.json says it trained (0 before its first part)."""
    return int((_result(args, strategy, seed) or {}).get("steps_done", 0))


def _forward(args: argparse.Namespace) -> list[str]:
    """The launcher's arguments that each run process needs."""
    out = ["--out", args.out, "--base", args.base, "--monitor-every", str(args.monitor_every),
           "--final-samples", str(args.final_samples), "--final-strategies", *args.final_strategies,
           "--final-solvers", *args.final_solvers]
    for flag, value in (("--eval-every", args.eval_every), ("--fid-samples", args.fid_samples),
                        ("--fid-solver", args.fid_solver), ("--fid-steps", args.fid_steps),
                        ("--root", args.root), ("--batch-size", args.batch_size),
                        ("--final-batch-size", args.final_batch_size)):
        if value:
            out += [flag, str(value)]
    if args.stop_at:
        out += ["--stop-at", str(args.stop_at)]
    if args.smoke:
        out.append("--smoke")
    if args.eager:
        out.append("--eager")
    if not args.compile_sampling:
        out.append("--no-compile-sampling")
    if args.set:
        out += ["--set", *args.set]
    return out
