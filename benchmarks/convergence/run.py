"""One training run of the convergence benchmark: train (or resume) to N or a time limit, write result.json."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback, Timer
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from benchmarks.common import device_name, load_config, set_overrides, smoke_args, today, write_json
from benchmarks.convergence.runs import PER_PART, RUNS, config_args


class PartTimer(Timer):
    """A time limit for this part of a run only, counted from ``start`` (the process's start), that also holds
    inside an FID evaluation.

    Lightning's Timer (``Trainer(max_time=...)``) restores the time spent before from the
    checkpoint, so a run resumed with a limit smaller than the time it had already used would stop at
    once, without a step. Each part here has its own limit, and it counts the start-up too: a
    launcher's deadline does.

    The time limit is checked between steps, and an FID evaluation (a minute or more for a DiT with
    IDDPM-250) runs inside a step's end. So the part stops one step before an evaluation that the
    time left cannot hold, judged by the longest evaluation seen so far (``fid_seconds``: earlier
    parts', then this process's, from ``fid.seconds``); the next part makes that evaluation. Without
    an evaluation seen yet there is nothing to judge by: when the time is up, the timer sends this
    process SIGTERM, the stop signal that FIDCallback honours after its current sampling batch (and
    Lightning's loops after the current step). ``CheckpointOnSignal`` then saves the checkpoint, and
    the next part makes the evaluation when it starts (``FIDCallback.on_train_start``).
    """

    def __init__(self, *args: Any, fid: Any = None, fid_seconds: Sequence[float] = (), start: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fid, self.fid_seconds, self.start = fid, list(fid_seconds), start
        self.expired = False  # the time ran out and the stop signal was sent
        self._alarm: threading.Timer | None = None
        self._lock = threading.Lock()  # the signal is never sent once the alarm is disarmed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # keep counting from zero

    def stops_before_fid(self, step: int) -> bool:
        """True when step ``step + 1`` evaluates FID and the time left is shorter than the longest evaluation."""
        every = getattr(self.fid, "every_n_steps", None)
        if not every or (step + 1) % every:
            return False
        seen = self.fid_seconds + [seconds for _, seconds in getattr(self.fid, "seconds", [])]
        remaining = self.time_remaining()
        return bool(seen) and remaining is not None and remaining < max(seen)

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        if self.start is not None:
            self._start_time[RunningStage.TRAINING] = self.start
        remaining = self.time_remaining()
        # Armed now, when Lightning's SIGTERM handler is in place (the default one would end the process).
        if remaining is not None and callable(signal.getsignal(signal.SIGTERM)):
            self._alarm = threading.Timer(max(remaining, 0.0), self._time_up)
            self._alarm.daemon = True
            self._alarm.start()

    def _time_up(self) -> None:
        with self._lock:
            if self._alarm is None:
                return
            self.expired = True
            print("this part's time limit is up: stopping after the current step or FID sampling batch", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

    def _disarm(self) -> None:
        with self._lock:
            if self._alarm is not None:
                self._alarm.cancel()
                self._alarm = None

    @override
    def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, *args, **kwargs)
        if not trainer.should_stop and self.stops_before_fid(trainer.global_step):
            print(f"stopping at step {trainer.global_step}: the FID evaluation at the next step would outlast this "
                  f"part's time limit", flush=True)
            trainer.should_stop = True  # one process per run: no rank to agree with

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        self._disarm()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._disarm()


class StopAt(Callback):
    """Ends training at ``step`` of a longer schedule (a screen of the first steps); the checkpoint resumes it to N."""

    def __init__(self, step: int) -> None:
        self.step = step

    @override
    def on_train_start(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step >= self.step:  # resumed at the step (to make a pending evaluation): no step more
            trainer.should_stop = True

    @override
    def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The protocol's command-line overrides of the composed config (recorded in result.json)."""
    out = [
        "--seed_everything", str(args.seed),
        "--trainer.max_steps", str(args.steps),
        "--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.logger.init_args.name", "tb",
        "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
        # each part ends with its own last.ckpt; the FID at N is final_fids' (more samples, both solvers)
        "--checkpoint", "null", "--trainer.enable_checkpointing", "false", "--final_fid", "null",
        "--fid.init_args.on_train_end", "false",
        # per-area rows at least at every FID point, so that each evaluation has its loss summary
        "--monitor.init_args.log_every_n_steps", str(min(args.monitor_every, args.eval_every or args.monitor_every)),
    ]  # fmt: skip
    if args.eval_every:
        out += ["--fid.init_args.every_n_steps", str(args.eval_every),
                "--samples.init_args.every_n_steps", str(args.eval_every)]
    if args.fid_samples:
        out += ["--fid.init_args.num_samples", str(args.fid_samples)]
    if args.fid_solver:
        out += ["--fid.init_args.solver", args.fid_solver]
    if args.fid_steps:
        out += ["--fid.init_args.solver_steps", str(args.fid_steps)]
    if args.root:
        out += ["--data.init_args.root", args.root]
    if args.batch_size or args.smoke:
        out += ["--data.init_args.batch_size", str(args.batch_size or 16)]
    if args.smoke:  # a tiny model and a few small grids, not 64 images x 50 steps on one CPU thread
        base = load_config(args.base)
        out += [*smoke_args(base["model"]["backbone"]["class_path"]), "--data.init_args.on_device", "false",
                "--samples.init_args.num_samples", "4", "--samples.init_args.solver_steps", "2"]
    elif args.eager:  # the retry of a run whose compiled step failed
        out += ["--model.compile_mode", "null"]
    elif args.compile_sampling:
        out += ["--model.compile_sampling", "true"]
    return out + set_overrides(args.set)


def check_resumable(previous: dict[str, Any], configs: list[str], protocol: list[str], run_dir: Path) -> None:
    """Refuse to resume a run whose earlier parts were trained with other configs or overrides (less PER_PART):
    its curve would mix two settings. Results from before these fields are not checked."""
    def settings(configs: list[str], overrides: list[str]) -> list[tuple[str, str]]:
        return [("configs", " ".join(configs))] + [(k, v) for k, v in zip(overrides[::2], overrides[1::2])
                                                    if k not in PER_PART]

    if "overrides" not in previous:
        return
    before, now = settings(previous["configs"], previous["overrides"]), settings(configs, protocol)
    if before != now:
        was = [f"{k} {v}" for k, v in before if (k, v) not in now]
        asked = [f"{k} {v}" for k, v in now if (k, v) not in before]
        raise SystemExit(f"{run_dir} holds a run trained with {was or 'the defaults'}, and this part asks for {asked}: "
                         "resume it with the same settings, or give these settings another --out")


def checkpoint_steps(ckpt: Path, fid_key: str) -> tuple[int, list[int]]:
    """The step ``ckpt`` resumes from and the steps of the FID evaluations it holds (the callback's ``fid_key``)."""
    import torch

    state = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=False)  # the weights are not read
    history = state.get("callbacks", {}).get(fid_key, {}).get("history", [])
    return int(state["global_step"]), [int(step) for step, _ in history]


def logged_rows(log_dir: Path, steps: range, prefix: str) -> dict[int, dict[str, float]]:
    """{step: {tag: value}} of the TensorBoard scalars under ``log_dir`` (a folder per part) whose tag starts with
    ``prefix``, at ``steps``. A step logged by several parts (one killed before its checkpoint, then its retry) is
    read from the last."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows: dict[int, dict[str, float]] = {}
    for version in sorted(log_dir.glob("version_*"), key=lambda path: int(path.name.rpartition("_")[2])):
        events = EventAccumulator(str(version), size_guidance={"scalars": 0}, purge_orphaned_data=False)
        events.Reload()
        found: dict[int, dict[str, float]] = {}
        for tag in (tag for tag in events.Tags()["scalars"] if tag.startswith(prefix)):
            for event in events.Scalars(tag):
                if event.step in steps:
                    found.setdefault(event.step, {})[tag] = event.value
        rows.update(found)
    return rows


def unrecorded(run_dir: Path, previous: dict[str, Any], resumed: int, fid_steps: list[int], fid_name: str
               ) -> tuple[dict[str, Any], list[list[float]], list[dict[str, float]]] | None:
    """What the record ``previous`` lacks when the checkpoint (step ``resumed``, FID evaluations at ``fid_steps``) is
    ahead of it (a part was killed between saving its checkpoint and writing result.json): a part entry for its steps
    marked ``"recorded": false`` (its wall time is unknown), and the timings of its FID evaluations and its per-area
    rows as far as its TensorBoard logs hold them (float32 there; what the logs lack, such as events not yet flushed
    at the kill, stays missing). None without a gap. A checkpoint behind its record is refused: the record would
    describe training that the run repeats."""
    recorded = previous.get("steps_done", 0)
    if resumed < recorded:
        raise SystemExit(f"{run_dir / 'last.ckpt'} holds step {resumed} but {run_dir / 'result.json'} records "
                         f"{recorded} steps: put back the checkpoint of step {recorded}, or train the run again under "
                         "another --out")
    if resumed == recorded:
        return None
    print(f"{run_dir}: the checkpoint holds step {resumed}, the record ends at step {recorded} (its part was stopped "
          f"before writing result.json): steps {recorded} to {resumed} are recorded as a part of unknown wall time, "
          "their FID timings and per-area losses read from the logs", flush=True)
    evaluated = [step for step in fid_steps if step not in {step for step, _ in previous.get("fid_history", [])}]
    log_dir, tag = run_dir / "tb", f"{fid_name}/seconds"
    seconds = logged_rows(log_dir, range(recorded, resumed + 1), tag)
    # TimestepMonitor logs the row of step s at s - 1 (where Lightning logs those batches' own values)
    areas = logged_rows(log_dir, range(recorded, resumed), "timesteps/")
    return ({"from_step": recorded, "to_step": resumed, "recorded": False, "fid_evaluations": len(evaluated)},
            [[step, seconds[step][tag]] for step in evaluated if step in seconds],
            [{"step": float(step + 1), **areas[step]} for step in sorted(areas)])


def write_record(path: Path, result: dict[str, Any]) -> None:
    """result.json, replaced whole: a part killed while writing it leaves the previous record, not a truncated one."""
    saving = path.with_name(f"saving.{path.name}")
    write_json(saving, result)
    saving.replace(path)


def run_one(args: argparse.Namespace, started: float | None = None) -> dict[str, Any]:
    """Train (or resume) one run/seed until ``args.steps`` or the time limit; write result.json.

    The time limit counts from ``started`` (``time.monotonic()`` at the process's start; None: now), so
    start-up is included. When it runs out inside an FID evaluation, the evaluation stops after its
    current batch; the part saves last.ckpt and result.json (``fid_pending``: the step of that
    evaluation) and ends with status 0. Another stop signal (SIGTERM, Ctrl+C) saves them the same way
    and ends with 128 + the signal.
    """
    started = time.monotonic() if started is None else started
    import torch

    from lightning_speed.callbacks import CheckpointOnSignal, FIDCallback, TimestepMonitor
    from lightning_speed.cli import main as cli_main

    run_dir = Path(args.out) / f"{args.strategy}_s{args.seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt, saving = run_dir / "last.ckpt", run_dir / "saving.ckpt"  # saved, then renamed: a kill keeps the last part
    protocol = overrides(args, run_dir)
    # The previous part's record; the checkpoint, renamed into place just before it, says where we resume.
    result_file = run_dir / "result.json"
    previous = json.loads(result_file.read_text()) if ckpt.exists() and result_file.exists() else {}
    configs = [args.base, *RUNS[args.strategy]]
    check_resumable(previous, configs, protocol, run_dir)
    cli = cli_main([*config_args(args.base, args.strategy), *protocol], run=False)
    trainer = cli.trainer
    (fid_cb,) = (cb for cb in trainer.callbacks if isinstance(cb, FIDCallback))
    (monitor,) = (cb for cb in trainer.callbacks if isinstance(cb, TimestepMonitor))
    (on_signal,) = (cb for cb in trainer.callbacks if isinstance(cb, CheckpointOnSignal))
    on_signal.dirpath, on_signal.filename = str(run_dir), saving.stem
    if args.smoke:
        torch.set_num_threads(1)
    first_step, parts = 0, previous.get("parts", [])
    fid_seconds, areas = previous.get("fid_seconds", []), previous.get("timestep_areas", [])
    if ckpt.exists():
        first_step, fid_steps = checkpoint_steps(ckpt, fid_cb.state_key)
        gap = unrecorded(run_dir, previous, first_step, fid_steps, fid_cb.name)
        if gap is not None:
            part, logged_seconds, logged_areas = gap
            parts, fid_seconds, areas = [*parts, part], fid_seconds + logged_seconds, areas + logged_areas
    limit = timedelta(seconds=args.time_limit) if args.time_limit else None  # None: train to N
    timer = PartTimer(duration=limit, fid=fid_cb, start=started, fid_seconds=[seconds for _, seconds in fid_seconds])
    trainer.callbacks.insert(trainer.callbacks.index(fid_cb), timer)  # armed before a resumed evaluation starts
    if args.stop_at and args.stop_at < args.steps:
        trainer.callbacks.append(StopAt(args.stop_at))
    stop = None
    try:
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt) if ckpt.exists() else None)
    except SIGTERMException as signal_stop:  # CheckpointOnSignal saved the checkpoint, unless it could not
        if on_signal.checkpoint_path is None:
            raise
        stop = signal_stop
    else:
        if fid_cb.due_by_step(trainer):  # resumed at N, stopped inside that evaluation: no step left to make it in
            cli.model.to(trainer.strategy.root_device)
            fid_cb.evaluate(trainer, cli.model)
        trainer.save_checkpoint(saving)
    saving.replace(ckpt)
    # Wall time of this part (start-up, compilation and FID evaluations included): the cost of the protocol.
    parts.append({"from_step": first_step, "to_step": trainer.global_step,
                  "seconds": round(time.monotonic() - started, 1), "fid_evaluations": len(fid_cb.seconds)})
    result = {
        "strategy": args.strategy,
        "seed": args.seed,
        "configs": configs,
        "overrides": protocol,
        "steps_target": args.steps,
        "steps_done": trainer.global_step,
        "stop_at": args.stop_at,
        "batch_size": cli.datamodule.batch_size,
        "fid_samples": fid_cb.num_samples,
        "fid_solver": f"{fid_cb.solver}-{fid_cb.solver_steps}",
        "schedule": cli.model.hparams.schedule,
        "fid_history": fid_cb.history,
        "fid_pending": trainer.global_step if fid_cb.due_by_step(trainer) else None,  # the next part evaluates it
        "fid_seconds": fid_seconds + [list(x) for x in fid_cb.seconds],  # every part
        "parts": parts,
        # Per-area loss, weight and share of sampled t (TimestepMonitor), every part appended.
        "timestep_areas": areas + list(monitor.history),
        "card": device_name(),
        "date": today(),
    }
    write_record(result_file, result)
    if stop is not None:
        print(f"{ckpt} holds step {trainer.global_step} (the checkpoint above, renamed): the same command resumes the "
              f"run{'; stopped by its time limit: exit status 0' if timer.expired else ''}", flush=True)
        if not timer.expired:
            raise stop  # stopped from outside: its exit status (128 + the signal)
        return result
    if trainer.global_step >= args.steps and args.final_samples and args.strategy in args.final_strategies:
        result["final"] = final_fids(trainer, cli.model, fid_cb, args)  # a launch without them does not count N as done
        write_record(result_file, result)
    return result


def final_fids(trainer: Any, module: Any, fid_cb: Any, args: argparse.Namespace) -> dict[str, float]:
    """FID at N with more samples, for each of ``--final-solvers`` (EMA weights), by the curve's own callback."""
    out = {}
    module.to(trainer.strategy.root_device)  # fit's teardown moved the module back to the CPU
    fid_cb.num_samples, curve_steps = args.final_samples, fid_cb.solver_steps
    fid_cb.batch_size = args.final_batch_size or fid_cb.batch_size
    for solver, steps in (name.split("-") for name in args.final_solvers):
        steps = int(steps)
        fid_cb.solver, fid_cb.solver_steps = solver, min(steps, curve_steps) if args.smoke else steps
        start = time.perf_counter()
        out[f"{solver}-{steps}"] = fid_cb.evaluate(trainer, module)
        out[f"{solver}-{steps}_seconds"] = time.perf_counter() - start
        fid_cb.history.pop()  # keep the curve (and its timings) to its fixed sample count
        fid_cb.seconds.pop()
    return out
