"""A profiler window shared by the benchmarks: per step, GPU kernel time against wall time.

A step whose GPU time is much shorter than its wall time leaves the GPU idle: the host (Python, the training loop,
kernel launches) or a wait for the GPU is the limit. ``summarise_profile`` splits the kernel time of the traced steps
into compute and NCCL (and their overlap) and gives the idle rest. Windows can trace a step closure
(``profile_closure``) or steps of a ``trainer.fit`` (``TrainerProfile``). The profiler adds host time of its own, so
the wall time of a traced window is longer than an untraced one; compare kernel times, and idle times only between
windows traced the same way.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch.profiler import ProfilerActivity, profile
from typing_extensions import override

from benchmarks.windows import sync


# ATen's generic elementwise kernels: copies, casts and layout conversions outside the compiled graphs' Triton kernels
# (where they come from is what ``kernel_launchers`` answers).
ATEN_ELEMENTWISE = r"at::native::.*elementwise_kernel"


def start_profiler(device: torch.device) -> Any:
    """A started ``torch.profiler.profile`` of host operators (with their input shapes) and, on CUDA, GPU kernels."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, record_shapes=True)
    prof.__enter__()
    return prof


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals in microseconds, in milliseconds."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


def kernel_launchers(events: list[dict[str, Any]], pattern: str, steps: int, top: int = 12) -> list[dict[str, Any]]:
    """Which host operators launch the kernels whose names match ``pattern``, from a Chrome trace's events.

    A kernel is matched to the CPU operator with its ``External id`` (the innermost operator that launched it; for a
    kernel replayed from a CUDA graph, the call that replayed the graph). Each row is one (context, operator, its
    inputs' shapes, strides and dtypes: a layout or dtype conversion shows there). ``context`` names the operator's
    enclosing host events, outermost first, without the profiler's own (``ProfilerStep``) and Python-function events;
    ``kernels`` and ``ms`` are per step, largest ``ms`` first.
    """
    wanted = defaultdict(lambda: [0, 0.0])  # External id -> [kernels, us]
    for e in events:
        if e.get("cat") == "kernel" and re.search(pattern, e.get("name", "")):
            ext = e.get("args", {}).get("External id")
            if ext is not None:
                wanted[ext][0] += 1
                wanted[ext][1] += e.get("dur", 0)
    host = sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e),
                  key=lambda e: (e.get("pid"), e.get("tid"), e["ts"], -e["dur"]))
    rows: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    stack: list[dict[str, Any]] = []
    thread = None
    for e in host:  # a sweep over each thread's events: the stack holds the open events that enclose e
        if (e.get("pid"), e.get("tid")) != thread:
            thread, stack = (e.get("pid"), e.get("tid")), []
        while stack and stack[-1]["ts"] + stack[-1]["dur"] < e["ts"] + e["dur"]:
            stack.pop()
        ext = e.get("args", {}).get("External id")
        if e.get("cat") == "cpu_op" and ext in wanted:
            context = " > ".join(s["name"] for s in stack if not s["name"].startswith("ProfilerStep"))
            args = e.get("args", {})
            inputs = json.dumps([args.get(key, []) for key in ("Input Dims", "Input Strides", "Input type")])
            row = rows[(context, e["name"], inputs)]
            row[0] += wanted[ext][0]
            row[1] += wanted[ext][1]
        stack.append(e)
    ranked = sorted(rows.items(), key=lambda item: -item[1][1])[:top]
    return [{"context": c, "op": op, **dict(zip(("input_dims", "input_strides", "input_types"), json.loads(inputs))),
             "kernels": n / steps, "ms": us / 1e3 / steps}
            for (c, op, inputs), (n, us) in ranked]


def summarise_profile(prof: Any, wall_s: float, steps: int, trace: str | None) -> dict[str, Any]:
    """Per step: GPU kernel time (compute, NCCL, NCCL overlapping compute), busy and idle time, in ms, and who launches
    ATen's generic elementwise kernels (``kernel_launchers``); ``trace``: also keep the Chrome trace there."""
    path = Path(trace) if trace else Path(tempfile.mkdtemp(prefix="trace_")) / "trace.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text()).get("traceEvents", [])
    if not trace:
        path.unlink()
    kernels = [(e["ts"], e["ts"] + e.get("dur", 0), "nccl" in e.get("name", "").lower())
               for e in events if e.get("cat") == "kernel" and "ts" in e]
    nccl = [(a, b) for a, b, is_nccl in kernels if is_nccl]
    compute = [(a, b) for a, b, is_nccl in kernels if not is_nccl]
    compute_ms, nccl_ms = _union_ms(compute), _union_ms(nccl)
    busy_ms = _union_ms(compute + nccl)
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if kernels else "self_cpu_time_total", row_limit=15)
    return {
        "steps": steps,
        "wall_ms_per_step": wall_s * 1e3 / steps,
        "compute_kernels_ms_per_step": compute_ms / steps,
        "nccl_kernels_ms_per_step": nccl_ms / steps,
        "nccl_overlapping_compute_ms_per_step": (compute_ms + nccl_ms - busy_ms) / steps,
        "gpu_busy_ms_per_step": busy_ms / steps,
        "gpu_idle_ms_per_step": max(0.0, wall_s * 1e3 - busy_ms) / steps,
        "kernels_per_step": len(kernels) / steps,
        "aten_elementwise_launchers": kernel_launchers(events, ATEN_ELEMENTWISE, steps),
        "trace": str(path) if trace else None,
        "table": table,
    }


def trace_closure(step: Callable[[], None], device: torch.device, steps: int) -> tuple[Any, float]:
    """``steps`` calls of a (warm) step closure under the profiler: the finished profile and the wall seconds, the
    device synchronised at both ends."""
    sync(device)
    prof, start = start_profiler(device), time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    wall = time.perf_counter() - start
    prof.__exit__(None, None, None)
    return prof, wall


def host_probe_closure(step: Callable[[], None], device: torch.device, steps: int) -> dict[str, float]:
    """Host time per call of a (warm) step closure: ``steps`` calls started on an idle device and timed without
    waiting for it, then the wait. ``host_ms_per_step`` below the GPU's time per step means the host runs ahead and
    its own cost is hidden; at or above it, the host is the limit. ``steps`` must be few enough that the launch
    queue never fills (its waits would count as host time)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return _host_probe_result(device, steps, start, launched=time.perf_counter())


def _host_probe_result(device: torch.device, steps: int, start: float, launched: float) -> dict[str, float]:
    """Wait for the device, then the host time (``start`` to ``launched``) and wall time per step of a probe."""
    sync(device)
    return {"steps": steps, "host_ms_per_step": (launched - start) * 1e3 / steps,
            "wall_ms_per_step": (time.perf_counter() - start) * 1e3 / steps}


def python_functions(prof: cProfile.Profile, steps: int, top: int = 40) -> list[dict[str, Any]]:
    """The Python functions (and C functions called from Python) with the most host time of their own in a
    ``cProfile`` window of ``steps`` steps: calls and microseconds per step, own (``self_us``) and with callees
    (``total_us``). cProfile slows every Python call, so read the ranking, not the absolute times."""
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls": calls / steps,
             "self_us": own * 1e6 / steps, "total_us": cumulative * 1e6 / steps}
            for (file, line, name), (_, calls, own, cumulative, _) in ranked]


def python_functions_closure(step: Callable[[], None], device: torch.device, steps: int) -> list[dict[str, Any]]:
    """``python_functions`` of ``steps`` calls of a (warm) step closure."""
    sync(device)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    sync(device)
    return python_functions(prof, steps)


class _StepWindow(pl.Callback):
    """A window over the training steps ``start`` .. ``start + steps - 1`` of a fit on rank 0, hook to hook:
    ``begin`` runs at the start of step ``start``, ``end`` at the start of step ``start + steps``."""

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.steps = start, steps
        self.open = False

    def begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None: ...

    def end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None: ...

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank != 0:
            return
        if trainer.global_step == self.start:
            self.open = True
            self.begin(trainer, pl_module)
        elif self.open and trainer.global_step == self.start + self.steps:
            self.open = False
            self.end(trainer, pl_module)


class PythonFunctions(_StepWindow):
    """``python_functions`` of the training steps of the window; the ranking is in ``result``."""

    def __init__(self, start: int, steps: int) -> None:
        super().__init__(start, steps)
        self.profiler = cProfile.Profile()
        self.result: list[dict[str, Any]] | None = None

    @override
    def begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(pl_module.device)
        self.profiler.enable()

    @override
    def end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.profiler.disable()
        self.result = python_functions(self.profiler, self.steps)


class HostProbe(_StepWindow):
    """``host_probe_closure`` for the training steps of the window: the device is synchronised before step ``start``
    and only after the host has begun step ``start + steps``; the summary is in ``result``."""

    def __init__(self, start: int, steps: int) -> None:
        super().__init__(start, steps)
        self.t0 = 0.0
        self.result: dict[str, float] | None = None

    @override
    def begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(pl_module.device)
        self.t0 = time.perf_counter()

    @override
    def end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.result = _host_probe_result(pl_module.device, self.steps, self.t0, launched=time.perf_counter())


def profile_closure(step: Callable[[], None], device: torch.device, steps: int, trace: str | None = None) -> dict[str, Any]:
    """``steps`` calls of a (warm) step closure, traced and summarised."""
    prof, wall = trace_closure(step, device, steps)
    return summarise_profile(prof, wall, steps, trace)


class TrainerProfile(_StepWindow):
    """Traces the training steps of the window (whole loop iterations, hook to hook: data, step, callbacks); the
    summary is in ``result``. ``stop``: end the fit after the window."""

    def __init__(self, start: int, steps: int, trace: str | None = None, stop: bool = False) -> None:
        super().__init__(start, steps)
        self.trace, self.stop = trace, stop
        self.profiler: Any = None
        self.t0 = 0.0
        self.result: dict[str, Any] | None = None

    @override
    def begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(pl_module.device)
        self.profiler, self.t0 = start_profiler(pl_module.device), time.perf_counter()

    @override
    def end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(pl_module.device)
        wall = time.perf_counter() - self.t0
        self.profiler.__exit__(None, None, None)
        self.result = summarise_profile(self.profiler, wall, self.steps, self.trace)
        self.profiler = None
        if self.stop:
            trainer.should_stop = True
