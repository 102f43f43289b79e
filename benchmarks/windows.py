"""Repeated, interleaved timing windows shared by the throughput benchmarks.

A row (one way of training) is measured in several windows, and the windows of different rows
alternate in one process, so that clock, thermal and ordering effects spread over all rows instead of
landing on whichever row ran first or last. Plain rows are step closures, timed by ``timed_window``;
the rows that train under a ``pl.Trainer`` are timed from inside one ``trainer.fit`` by
``TrainerWindows``, which also runs the plain rows' windows between its own (module docstring of
dit_throughput.py). Every window synchronises the GPU at both ends.

This module imports torch and Lightning: ``benchmarks.common`` must not (its users need neither).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import lightning.pytorch as pl
import torch

Step = Callable[[], None]


def sync(device: torch.device) -> None:
    """Wait for ``device`` (nothing on the CPU), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def settled(device: torch.device) -> int:
    """Bytes allocated once Python's garbage is collected: the baseline of a resident-memory difference, which
    tensors of earlier work freed later by the collector would otherwise drive below zero."""
    gc.collect()
    sync(device)
    return allocated(device)


@dataclass
class Row:
    """One row's step closure, resident memory (bytes) and measured windows."""

    step: Step | None = None
    resident: int = 0
    images_per_s: list[float] = field(default_factory=list)
    transient: list[int] = field(default_factory=list)  # bytes allocated on top of the resident state

    def spread(self) -> dict[str, Any]:
        """Median images/s of the windows, their min and max, and every window in the order measured."""
        ips = self.images_per_s
        return {"images_per_s": statistics.median(ips), "min": min(ips), "max": max(ips), "windows": list(ips)}

    def peak_memory_gib(self) -> float | None:
        """Resident state plus the most the row's steps allocated on top of it in any window; None when the
        accounting is inconsistent (a negative resident state or peak: memory freed that was allocated before the
        baseline), rather than a number that is not a memory size."""
        if self.resident < 0 or self.resident + max(self.transient) < 0:
            return None
        return (self.resident + max(self.transient)) / 2**30


class Window:
    """A timed window, synchronised at both ends; records images/s and the memory its steps allocated."""

    def __init__(self, device: torch.device) -> None:
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.device, self.base, self.start = device, allocated(device), time.perf_counter()

    def close(self, row: Row, images: int) -> None:
        sync(self.device)
        row.images_per_s.append(images / (time.perf_counter() - self.start))
        row.transient.append(torch.cuda.max_memory_allocated() - self.base if self.device.type == "cuda" else 0)


def timed_window(row: Row, batch: int, seconds: float, min_steps: int, device: torch.device) -> None:
    """One window of a plain row: at least ``min_steps`` steps and at least ``seconds``."""
    window, n = Window(device), 0
    while n < min_steps or time.perf_counter() - window.start < seconds:
        row.step()
        n += 1
    window.close(row, batch * n)


def warm(step: Step, steps: int, device: torch.device, before: int) -> Row:
    """Run ``steps`` untimed steps (compilation); the row's resident memory is what it holds afterwards."""
    for _ in range(steps):
        step()
    return Row(step, settled(device) - before)


class TrainerWindows(pl.Callback):
    """Times the Trainer's windows and runs the other rows' windows between them.

    After ``warmup`` training steps, and whenever a Trainer window has lasted ``min_steps`` steps and
    ``seconds``, it calls ``between()``, which runs the schedule up to the Trainer's next window and
    returns the row that window counts for (several rows may share the fit, e.g. with different
    time-step strategies that ``between`` installs), or None when the schedule is done (the fit then
    stops). A window counts whole loop iterations, hook to hook: data, step and callbacks. ``resident``:
    what the fit holds once warm (weights, optimizer, EMA ...), given to every row it times.
    """

    def __init__(self, between: Callable[[], Row | None], batch: int, warmup: int, seconds: float,
                 min_steps: int, before_fit: int) -> None:
        self.between, self.batch, self.warmup = between, batch, warmup
        self.seconds, self.min_steps, self.before_fit = seconds, min_steps, before_fit
        self.resident = 0
        self.window: Window | None = None
        self.row: Row | None = None
        self.start_step = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step < self.warmup:
            return
        if self.window is None:  # warm: what the Trainer holds now is its resident state
            self.resident = settled(pl_module.device) - self.before_fit
        else:
            n = step - self.start_step
            if n < self.min_steps or time.perf_counter() - self.window.start < self.seconds:
                return
            self.window.close(self.row, self.batch * n)
        self.row = self.between()
        if self.row is None:
            trainer.should_stop = True
            return
        self.row.resident = self.resident
        self.window, self.start_step = Window(pl_module.device), step


def windowed_trainer(cuda: bool, callbacks: list[pl.Callback]) -> pl.Trainer:
    """The Trainer of a measurement driven by ``TrainerWindows``: one device, bf16 on the GPU, no logging,
    checkpointing or validation, and no step limit (the windows' callback stops it)."""
    return pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
        max_steps=10**9, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
    )
