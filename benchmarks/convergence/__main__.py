"""``python -m benchmarks.convergence {launch,run,report}``: see the package docstring."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from benchmarks.common import RESULTS, load_config
from benchmarks.convergence import __doc__ as DOC
from benchmarks.convergence.launch import launch
from benchmarks.convergence.report import report
from benchmarks.convergence.runs import BASE, NAMES
from benchmarks.convergence.table import load_cost


def _count(least: int) -> Any:
    """An argparse type: a whole number of at least ``least`` (steps, seconds, samples, a GPU index, a seed)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"takes a whole number of at least {least}, got {text!r}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["launch", "run", "report"])
    p.add_argument("--base", default=BASE, help=f"the base config: a file of configs/ or a path (default {BASE}; "
                   "fashion_mnist_dit.yaml is the paper's recipe, fashion_mnist_sit.yaml its flow)")
    p.add_argument("--strategies", nargs="+", default=["uniform", "speed"], choices=NAMES)
    p.add_argument("--strategy", choices=NAMES)
    p.add_argument("--seeds", type=_count(0), nargs="+", default=[0, 1])
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--jobs", nargs="+", default=None,
                   help="launch: explicit strategy:seed[:steps] list (steps default: --steps), run in this order")
    p.add_argument("--steps", type=_count(1), default=20_000, help="N: the training budget")
    # FID curve settings: by default the base config's fid callback
    p.add_argument("--stop-at", type=_count(1), default=None,
                   help="a screen: train N's schedule (curricula and LR schedules read N) but stop every run at this "
                        "step; a later launch without it resumes them to N")
    p.add_argument("--eval-every", type=_count(1), default=None, help="FID and sample-grid interval (default: the config's)")
    p.add_argument("--fid-samples", type=_count(1), default=None, help="samples per FID point (default: the config's)")
    p.add_argument("--fid-solver", choices=["ddim", "ddpm", "dpmpp_2m", "euler", "heun"], default=None,
                   help="solver of the FID curve (default: the config's)")
    p.add_argument("--fid-steps", type=_count(1), default=None, help="solver steps of the FID curve (default: the config's)")
    p.add_argument("--monitor-every", type=_count(1), default=500, help="TimestepMonitor's summary interval, in steps (at most --eval-every)")
    p.add_argument("--final-samples", type=_count(0), default=0, help="if > 0: FID with this many samples at N (DDIM-50, DDPM-250)")
    p.add_argument("--final-solvers", nargs="+", default=["ddim-50", "ddpm-250"],
                   choices=["ddim-50", "ddpm-250", "dpmpp_2m-20", "euler-50", "heun-125"],
                   help="the solvers of the FIDs at N (ddpm-250 with learned sigma: IDDPM-250; a flow: euler-50, heun-125)")
    p.add_argument("--final-batch-size", type=_count(1), default=None, help="sampling batch of the FIDs at N (default: the curve's)")
    p.add_argument("--final-strategies", nargs="+", default=["uniform", "speed"], choices=NAMES,
                   help="the runs that get the final FIDs")
    p.add_argument("--no-compile-sampling", dest="compile_sampling", action="store_false",
                   help="sample eagerly for FID (default: compiled sampling network, on the GPU)")
    p.add_argument("--batch-size", type=_count(1), default=None)
    p.add_argument("--gpus", type=_count(0), nargs="+", default=None, help="GPU indices to spread runs over (default: the visible one)")
    p.add_argument("--per-gpu", type=_count(1), default=1, help="concurrent runs per GPU")
    p.add_argument("--time-limit", type=_count(1), default=None,
                   help="launch: seconds for the whole launch; run: seconds from the process's start (default: none, "
                        "train to N). Runs stopped by it (inside an FID evaluation: after its current batch) "
                        "checkpoint, and the same command resumes them")
    p.add_argument("--min-run-seconds", type=_count(1), default=120, help="launch: start no run with less time than this left")
    p.add_argument("--stop-margin", type=_count(0), default=40,
                   help="launch: a run stops this long before the launch's deadline, for the step or FID sampling "
                        "batch in progress and its checkpoint; one still running at the deadline is killed")
    p.add_argument("--stall-seconds", type=float, default=300,
                   help="launch: stop (and retry once, eager) a run whose files have not changed for this long")
    p.add_argument("--root", default=None)
    p.add_argument("--out", default=str(RESULTS / "convergence"))
    p.add_argument("--include", nargs="+", default=[], metavar="FOLDER",
                   help="report: also read these result folders (same protocol, e.g. the uniform baseline of "
                        "another card); speedups.json and the plots still go to --out")
    p.add_argument("--cost", default=None, metavar="FILE",
                   help="report: the JSON of python -m benchmarks.strategy_cost (each run's steps/s over uniform's); "
                        "speedups.md then gives each measured run's wall-clock speed-up beside its speed-up in steps")
    p.add_argument("--smoke", action="store_true", help="a tiny CPU model (the test suite)")
    p.add_argument("--no-summary", dest="summary", action="store_false", help="report: leave summary.json alone")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="report: write no figures")
    p.add_argument("--budget", action="store_true",
                   help="report: also screen runs trained to the end of a schedule half as long as uniform's (a rate "
                        "annealed by then), against plain uniform's FID at twice their N")
    p.add_argument("--summary-key", default=None,
                   help="report: write the speed-ups under this summary.json key (and KEY_half), each entry with its N "
                        "and EMA decay (the strategy study: speedup_study), instead of the base config's key")
    p.add_argument("--summary-file", default=str(RESULTS / "summary.json"),
                   help="report: the summary.json whose speed-up keys are updated")
    p.add_argument("--eager", action="store_true", help="train without torch.compile")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more config overrides for every run (an ablation: ema.init_args.decay=0.999); recorded in "
                        "result.json, so give each ablation its own --out")
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    process = (load_config(args.base).get("model") or {}).get("process", "ddpm")
    flow_solver = {name.split("-")[0] in ("euler", "heun") for name in args.final_solvers}
    if args.final_samples and flow_solver != {process == "flow"}:
        p.error(f"--final-solvers {' '.join(args.final_solvers)} do not all sample the {process} model of {args.base}: "
                f"use {'euler-50 / heun-125' if process == 'flow' else 'ddim-50 / ddpm-250 / dpmpp_2m-20'}")
    if args.cost:  # launch reports at its end: a bad file is refused before training, not after
        try:
            load_cost(args.cost)
        except (ValueError, FileNotFoundError) as error:
            p.error(str(error))
    if args.command == "run":
        if not args.strategy:
            p.error("run needs --strategy")
        started = time.monotonic()  # the run's time limit counts its start-up, these imports included
        from benchmarks.convergence.run import run_one  # torch and Lightning: only the run command needs them

        run_one(args, started)
    else:
        try:  # launch reports at its end too (its runs' files are saved by then)
            if args.command == "launch":
                launch(args)
            else:
                report(args)
        except (ValueError, FileNotFoundError) as error:  # mixed solvers, a run in two folders, a NaN FID
            p.exit(2, f"python -m benchmarks.convergence {args.command}: {error}\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
