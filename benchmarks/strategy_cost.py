"""Training-step cost of the convergence runs relative to uniform t, on one GPU.

The convergence study compares strategies at equal steps; its wall-clock time-to-FID needs each run's cost per
step, and adaptive samplers (loss_decrease, loss_aware) do more work per step than uniform t. The convergence
harness's own wall times cannot tell: its runs share a GPU. Here the runs train one at a time in one process.

Each run is built as the convergence harness builds it (``benchmarks.convergence``: the base config composed with
the run's config files, through the project's CLI), at ``--batch-size``, with its time-step strategy, EMA, divergence
guard and the base's precision and compile settings: the per-step work of a study run. Left out: FID, sample grids,
checkpoints, the time-step monitor, the logger and validation (work that runs every few thousand steps, or writes).

For each of ``--repeats`` repeats, every run in turn (the order rotated by one per repeat, so no run always comes
first or last) is built afresh and trains ``--warmup-steps`` untimed steps (compilation), then one window of at
least ``--window`` seconds, the GPU synchronised at both ends of the window only (``benchmarks.windows``); compiled
code is dropped after each window. Per run: steps/s, the median over repeats with its min and max, and ``ratio``,
its median over uniform's (below 1: a step costs 1 / ratio of uniform's, so a run that needs s times fewer steps
than uniform reaches its FID s * ratio times sooner in wall-clock time); ``ratios_per_repeat`` divides each repeat's
windows. uniform, the baseline, is always measured.

    python -m benchmarks.strategy_cost --root .data       # uniform and every study candidate on the DiT base
    python -m benchmarks.strategy_cost --runs uniform loss_decrease loss_aware --window 20 --repeats 5
    python -m benchmarks.strategy_cost --smoke --runs uniform speed loss_decrease --out /tmp/cost.json  # tests
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, device_name, load_config, set_overrides, smoke_args, today, write_json
from benchmarks.convergence.runs import CONFIGS, NAMES, RUNS, STUDY, config_args

DEFAULT_RUNS = ["uniform", *STUDY]
# What a study run does besides training steps: evaluations, sample grids, checkpoints, logging. Each is off.
OFF_KEYS = ("monitor", "samples", "fid", "final_fid", "checkpoint")


def overrides(args: argparse.Namespace) -> list[str]:
    """The command-line overrides of every run's composed config: one device, the batch, and nothing but training."""
    out = [
        "--trainer.devices", "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        *(arg for key in OFF_KEYS for arg in (f"--{key}", "null")),
        "--data.init_args.batch_size", str(args.batch_size),
    ]  # fmt: skip
    if args.root:
        out += ["--data.init_args.root", args.root]
    if args.smoke:
        out += [*smoke_args(load_config(args.base)["model"]["backbone"]["class_path"]), "--data.init_args.on_device", "false"]
    return out + set_overrides(args.set)


def build(run: str, args: argparse.Namespace) -> Any:
    """The run's CLI (model, data module, trainer), its trainer without callbacks that need a logger or write files."""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.cli import SaveConfigCallback

    from lightning_speed.callbacks import CheckpointOnSignal
    from lightning_speed.cli import main as cli_main

    with warnings.catch_warnings():  # LightningCLI warns that sys.argv holds options too: this script's, not its
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = cli_main([*config_args(args.base, run), *overrides(args)], run=False)
    dropped = (LearningRateMonitor, SaveConfigCallback, CheckpointOnSignal)
    cli.trainer.callbacks[:] = [cb for cb in cli.trainer.callbacks if not isinstance(cb, dropped)]
    return cli


def measure(run: str, args: argparse.Namespace, cuda: bool) -> tuple[dict[str, Any], list[str]]:
    """One window of ``run`` (a fresh build, ``--warmup-steps`` untimed steps, then at least ``--window`` seconds),
    and the callbacks it trained with."""
    import gc

    import torch

    from benchmarks.windows import Row, TrainerWindows, settled

    device = torch.device("cuda" if cuda else "cpu")
    before = settled(device)
    cli = build(run, args)
    row, marks = Row(), []

    def between() -> Row | None:  # called when the window opens, then when it closes
        marks.append(cli.trainer.global_step)
        return row if len(marks) == 1 else None

    # batch 1: the window's rate (Row.images_per_s) counts steps
    cli.trainer.callbacks.append(TrainerWindows(between, 1, args.warmup_steps, args.window, 1, before))
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if len(marks) < 2:
            raise RuntimeError(f"{run} stopped at step {cli.trainer.global_step}, before its window closed: the "
                               f"base's trainer.max_steps is too small for --warmup-steps and --window")
        rate = row.images_per_s[0]
        window = {"steps": marks[1] - marks[0], "seconds": (marks[1] - marks[0]) / rate, "steps_per_s": rate}
        if cuda:
            window["peak_memory_gib"] = row.peak_memory_gib()
        return window, [type(cb).__name__ for cb in cli.trainer.callbacks[:-1]]
    finally:
        cli = None  # the model and trainer go before the next build
        torch._dynamo.reset()  # the next build compiles afresh, under the same conditions as this one
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def summarise(windows: dict[str, list[dict[str, Any]]], callbacks: dict[str, list[str]], base: str) -> dict[str, Any]:
    """Per run: median steps/s over the repeats, min, max, and the ratios to uniform (None without a rate)."""
    rates = {run: [w["steps_per_s"] for w in ws if "error" not in w] for run, ws in windows.items()}
    uniform = statistics.median(rates["uniform"]) if rates["uniform"] else None
    out = {}
    for run, ws in windows.items():
        entry: dict[str, Any] = {"configs": [base, *RUNS[run]], "callbacks": callbacks.get(run), "windows": ws}
        if rates[run]:
            median = statistics.median(rates[run])
            entry.update(steps_per_s=median, min=min(rates[run]), max=max(rates[run]))
            entry["ratio"] = median / uniform if uniform else None
            entry["ratios_per_repeat"] = [w["steps_per_s"] / u["steps_per_s"] for w, u in zip(ws, windows["uniform"])
                                          if "error" not in w and "error" not in u]
        out[run] = entry
    return out


def main() -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.strategy_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="fashion_mnist_dit.yaml", help="the base config, relative to configs/")
    p.add_argument("--runs", nargs="+", choices=NAMES, default=DEFAULT_RUNS, metavar="RUN",
                   help="runs of benchmarks/convergence/runs.py (default: uniform and every study candidate); "
                        "uniform is always measured")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--window", type=float, default=10.0, help="seconds per timed window (at least; 0.05 with --smoke)")
    p.add_argument("--repeats", type=int, default=3, help="windows per run, one per round over the runs")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="untimed steps before each window, compilation included (default: 30; 2 with --smoke)")
    p.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--out", default=str(RESULTS / "strategy_cost.json"))
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, a few steps (the test suite)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run, as the convergence harness takes them "
                        "(model.compile_mode=reduce-overhead: the step with CUDA graphs)")
    args = p.parse_args()
    set_overrides(args.set)  # a malformed item fails here, before any build
    if not (CONFIGS / args.base).is_file():
        p.error(f"--base {args.base}: no such file in {CONFIGS}; give a base config relative to configs/")
    if args.batch_size < 1 or args.repeats < 1 or args.window < 0:
        p.error("--batch-size and --repeats must be at least 1, --window at least 0")
    if args.warmup_steps is not None and args.warmup_steps < 1:
        p.error("--warmup-steps must be at least 1: the first steps compile, and a window that holds them times the "
                "compilation")
    runs = list(dict.fromkeys(["uniform", *args.runs]))
    if args.warmup_steps is None:
        args.warmup_steps = 2 if args.smoke else 30
    if args.smoke:
        args.window = min(args.window, 0.05)

    import lightning
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        torch.set_num_threads(1)  # the tiny smoke steps are fastest so, and leave a busy CI machine's other cores alone
    result: dict[str, Any] = {
        "card": device_name() if cuda else "cpu", "date": today(), "torch": torch.__version__,
        "lightning": lightning.__version__, "command": shlex.join(["python", "-m", "benchmarks.strategy_cost", *sys.argv[1:]]),
        "base": args.base, "batch_size": args.batch_size, "window_s": args.window, "repeats": args.repeats,
        "warmup_steps": args.warmup_steps, "smoke": args.smoke, "set": args.set, "orders": [],
    }
    windows: dict[str, list[dict[str, Any]]] = {run: [] for run in runs}
    callbacks: dict[str, list[str]] = {}
    for repeat in range(args.repeats):
        order = runs[repeat % len(runs):] + runs[:repeat % len(runs)]
        result["orders"].append(order)
        for run in order:
            try:
                window, callbacks[run] = measure(run, args, cuda)
                print(f"repeat {repeat + 1}/{args.repeats} {run}: {window['steps_per_s']:.2f} steps/s", flush=True)
            except Exception as err:  # keep the other runs' windows; the run reports what failed
                print(f"repeat {repeat + 1}/{args.repeats} {run} failed: {err!r}", flush=True)
                window = {"error": repr(err)[:500]}
            windows[run].append(window)
        result["runs"] = summarise(windows, callbacks, args.base)
        write_json(Path(args.out), result)  # after every repeat, so a cut-off measurement keeps what it measured
    print(json.dumps(result, indent=1), flush=True)
    if any("error" in w for ws in windows.values() for w in ws):
        raise SystemExit(f"some windows failed (their errors are in {args.out})")
    return result


if __name__ == "__main__":
    main()
