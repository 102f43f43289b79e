"""Training throughput: how close is the Lightning training loop to what the GPU can do?

Measured in one process, same backbone and batch:
  a0  naive eager fp32 PyTorch loop (AdamW, TF32 off)
  a   plain PyTorch loop with our fast settings (bf16 autocast, torch.compile, fused AdamW, channels_last)
  b   DiffusionModule under the Lightning Trainer, uniform sampling and unit weights (same fast settings)
  c   b with SpeeD's strategy (asymmetric sampling + change-aware weighting, as the SpeeD callback installs it)
  d   c plus EMA weights, as the configs train: our sync-free EMAWeightAveraging, and (d_lightning)
      Lightning's own, whose update reads a device counter on the host twice per step
Also: FLOPs per training image, the achieved fraction of the card's measured bf16 matmul
rate, peak memory, and host-device syncs per step in (d) and in (b) (profiler trace + sync debug mode).

Rows a, b and c are interleaved (benchmarks/windows.py, as dit_throughput.py measures the DiT): row a
is a step closure, built and warmed up first; rows b and c are one ``trainer.fit`` with the SpeeD callback,
in which a callback swaps the module's time-step strategy at window boundaries: b's windows train with
TimestepStrategy's defaults (UniformSampling + ConstantWeighting), c's with what SpeeD installed
(the SpeeD strategy, sampling and weighting). Sampling and weighting run outside the compiled losses, so b
and c share one compiled step and c/b is the cost of SpeeD's strategy alone (the SpeeD callback's per-step
hooks are host-side checks: in b's windows it only sits in the callback list). The schedule a, b, c, a, b, c, ... runs
``--repeats`` times from inside the fit; every window lasts at least ``--window`` seconds and ``--steps``
steps, the GPU synchronised at both ends. Each row reports the median images/s of its windows, their min
and max and every window; ratios use the medians, and for two interleaved rows also the ratio within
each repeat (``ratios_per_repeat``, spread in ``ratio_spread``). Peak memory of an interleaved row is the
resident state of its loop plus the most its steps allocated on top in a window.
Rows a0, d and d_lightning are measured alone, one window of ``--steps`` steps after ``--warmup``: a0
before the interleaved rows, d and d_lightning after them, each in its own fit. ``--profile-steps N`` then measures
the host time per step of row a and of row b (a fit of its own; steps launched on an idle GPU and not waited for),
and traces N steps of each with ``benchmarks.profiling``: kernel time, GPU idle time, kernels per step and the host
operators that launch ATen's elementwise (copy) kernels, under ``profile`` in the batch's results (where b/a < 1: does
b's GPU work longer or wait longer, and for its host?).

    python -m benchmarks.throughput --batch-sizes 128 512 --out benchmarks/results/throughput.json
    python -m benchmarks.throughput --batch-sizes 128 --repeats 3 --window 10 --root .data   # about 5-6 min on an H200
    python -m benchmarks.throughput --batch-sizes 128 --rows a b --repeats 2 --profile-steps 20 --root .data
    python -m benchmarks.throughput --smoke          # a few CPU steps of a tiny model (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    RESULTS,
    SMOKE_BACKBONES,
    default_backbone,
    device_name,
    measured_bf16_matmul_tflops,
    today,
    update_summary,
    write_json,
)
from benchmarks.profiling import (HostProbe, PythonFunctions, TrainerProfile, host_probe_closure, profile_closure,
                                  python_functions_closure)
from benchmarks.windows import Row, TrainerWindows, settled, sync, timed_window, warm, windowed_trainer
from lightning_speed import DiffusionModule
from lightning_speed.module import uses_cuda_graphs
from lightning_speed.process import GaussianDiffusion
from lightning_speed.schedules import NoiseSchedule


# The tiny UNet of the CPU smoke runs (tests); seeded_backbone builds it for every benchmark script.
SMOKE_BACKBONE = SMOKE_BACKBONES["UNet"]

# --profile-steps: first the host time of each row, in HOST_PROBE_REPEATS bursts of HOST_PROBE_STEPS steps started on
# an idle GPU (benchmarks.profiling.host_probe_closure), then the traced steps.
HOST_PROBE_STEPS, HOST_PROBE_REPEATS = 10, 5

# --rows names of the result rows
ROWS = {"a0": "a0_naive_fp32", "a": "a_plain_fast", "b": "b_lightning", "c": "c_lightning_speed",
        "d": "d_speed_ema", "d_lightning": "d_speed_ema_lightning"}
RATIOS = {
    "a_over_a0": ("a_plain_fast", "a0_naive_fp32"),
    "b_over_a": ("b_lightning", "a_plain_fast"),
    "c_over_b": ("c_lightning_speed", "b_lightning"),
    "b_over_a0": ("b_lightning", "a0_naive_fp32"),
    "d_over_c": ("d_speed_ema", "c_lightning_speed"),
    "d_over_d_lightning": ("d_speed_ema", "d_speed_ema_lightning"),
}
INTERLEAVED = ("a_plain_fast", "b_lightning", "c_lightning_speed")  # in schedule order; the others run alone
TRAINER_ROWS = ("b_lightning", "c_lightning_speed")  # share one fit


def seeded_backbone(smoke: bool, device: torch.device) -> torch.nn.Module:
    """The default UNet (or the tiny smoke one), from seed 0, so every row starts from the same weights."""
    torch.manual_seed(0)
    return default_backbone(**(SMOKE_BACKBONE if smoke else {})).to(device)


def synthetic_images(n: int, device: torch.device) -> torch.Tensor:
    """uint8 images standing in for a device-resident data set (the loops only gather from it)."""
    return torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, device=device)


def plain_loop(
    backbone: torch.nn.Module, data: torch.Tensor, batch: int, warmup: int, steps: int, fast: bool,
    compile_mode: str = "reduce-overhead", channels_last: bool = False,
) -> float:
    """Images/s of a hand-written training loop (the a0 / a rows)."""
    step = plain_step(backbone, data, batch, fast, compile_mode, channels_last)
    for _ in range(warmup):
        step()
    sync(data.device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(data.device)
    return batch * steps / (time.perf_counter() - start)


def plain_step(
    backbone: torch.nn.Module, data: torch.Tensor, batch: int, fast: bool, compile_mode: str = "reduce-overhead",
    channels_last: bool = False,
) -> Callable[[], None]:
    """One training step of the hand-written loop, as a closure (timed by plain_loop, profiled by step_profile.py)."""
    device = data.device
    layout = torch.channels_last if channels_last else torch.contiguous_format
    backbone = backbone.to(memory_format=layout)
    diffusion = GaussianDiffusion(NoiseSchedule.from_name("linear", 1000)).to(device)
    # The same fast settings DiffusionModule uses: compiled with CUDA graphs (small UNets are launch-bound).
    cuda = fast and device.type == "cuda"
    graphs = cuda and uses_cuda_graphs(compile_mode)
    model = torch.compile(backbone, mode=compile_mode if cuda else None) if fast else backbone
    opt = torch.optim.AdamW(backbone.parameters(), lr=1e-4, weight_decay=0.0, fused=fast and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if fast else contextlib.nullcontext()

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        idx = torch.randint(0, data.shape[0], (batch,), device=device)
        x0 = (data[idx].float() / 127.5 - 1).contiguous(memory_format=layout)
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x0)
        with autocast:
            out = model(diffusion.q_sample(x0, t, noise), t)
        loss = F.mse_loss(out.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


class _StepTimer(pl.Callback):
    """Times the steps after ``warmup`` with one synchronisation at each end of the window."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0
        self.timed_steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        sync(pl_module.device)
        self.end = time.perf_counter()
        self.timed_steps = trainer.global_step - self.warmup


def lightning_loop(
    backbone: torch.nn.Module, root: str | None, batch: int, warmup: int, steps: int, speed: bool, smoke: bool,
    ema: str | None = None, devices: int = 1, compile_mode: str = "reduce-overhead", channels_last: bool = False,
    extra_callbacks: tuple[pl.Callback, ...] = (),
) -> float:
    """Images/s of DiffusionModule under the Trainer (the b / c / d rows); ema: None, "ours" or "lightning".

    ``devices`` > 1 trains with DDP, ``batch`` per device; the result counts the images of all devices.
    """
    from lightning_speed.data import FashionMNISTDataModule

    callbacks: list[pl.Callback] = []
    if speed:
        from lightning_speed.callbacks import SpeeD

        callbacks.append(SpeeD(tau=700, k=5, dual=True, lam=0.6))
    if ema == "ours":
        from lightning_speed.callbacks import EMAWeightAveraging

        callbacks.append(EMAWeightAveraging(decay=0.999))
    elif ema == "lightning":
        callbacks.append(pl.callbacks.EMAWeightAveraging(decay=0.999))
    timer = _StepTimer(warmup)
    cuda = torch.cuda.is_available() and not smoke  # a smoke run is all on the CPU, as the other rows
    module = DiffusionModule(backbone, compile_mode=None if smoke else compile_mode if cuda else "default",
                             channels_last=channels_last)
    data = FashionMNISTDataModule(root=root, batch_size=batch, on_device=cuda, val_images=0)
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[*callbacks, timer, *extra_callbacks],
    )
    trainer.fit(module, datamodule=data)
    return batch * devices * timer.timed_steps / (timer.end - timer.start)


class StrategySwap(pl.Callback):
    """Installs row b's or row c's time-step strategy in the module: alternately during the Trainer's
    ``warmup`` steps (so both are warm before the first window), then when ``install`` is called."""

    def __init__(self, uniform: tuple[Any, Any], rows: list[str], warmup: int) -> None:
        self.strategies = {"b_lightning": uniform}
        self.rows, self.warmup = rows, warmup
        self.module: DiffusionModule | None = None
        self.installed: dict[str, str] = {}  # row -> the strategies it trained with (for the results)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:  # SpeeD installed its pair at setup
        self.strategies["c_lightning_speed"] = (pl_module.timesteps.sampler, pl_module.timesteps.weights)
        self.module = pl_module

    def install(self, row: str) -> None:
        sampler, weights = self.module.timesteps.sampler, self.module.timesteps.weights = self.strategies[row]
        self.installed[row] = " + ".join(dict.fromkeys(type(s).__name__ for s in (sampler, weights)))  # SpeeD plays both

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step < self.warmup:
            self.install(self.rows[trainer.global_step % len(self.rows)])


def interleaved_rows(
    names: list[str], fresh: Callable[[], torch.nn.Module], data: torch.Tensor, root: str | None, batch: int,
    args: argparse.Namespace,
) -> tuple[dict[str, Row], dict[str, str]]:
    """Rows a, b, c (those in ``names``), their windows interleaved as the module docstring says, and the
    time-step strategy each Trainer row trained with."""
    device, smoke = data.device, args.smoke
    cuda = device.type == "cuda"
    rows: dict[str, Row] = {}
    if "a_plain_fast" in names:
        step = plain_step(fresh(), data, batch, fast=cuda, compile_mode=args.compile_mode, channels_last=args.channels_last)
        rows["a_plain_fast"] = warm(step, args.warmup, device, settled(device))
    schedule = [name for _ in range(args.repeats) for name in INTERLEAVED if name in names]
    trainer_rows = [name for name in TRAINER_ROWS if name in names]
    if not trainer_rows:  # row a alone: its windows back to back
        for name in schedule:
            timed_window(rows[name], batch, args.window, args.steps, device)
        return rows, {}
    from lightning_speed.callbacks import SpeeD
    from lightning_speed.data import FashionMNISTDataModule

    module = DiffusionModule(fresh(), compile_mode=None if smoke else args.compile_mode if cuda else "default",
                             channels_last=args.channels_last)
    swap = StrategySwap((module.timesteps.sampler, module.timesteps.weights), trainer_rows, args.warmup)
    rows.update({name: Row() for name in trainer_rows})

    def between() -> Row | None:  # the schedule up to the Trainer's next window; None when it is done
        while schedule:
            name = schedule.pop(0)
            if name in TRAINER_ROWS:
                swap.install(name)
                return rows[name]
            timed_window(rows[name], batch, args.window, args.steps, device)
        return None

    windows = TrainerWindows(between, batch, args.warmup, args.window, args.steps, settled(device))
    trainer = windowed_trainer(cuda, [SpeeD(tau=700, k=5, dual=True, lam=0.6), swap, windows])
    trainer.fit(module, datamodule=FashionMNISTDataModule(root=root, batch_size=batch, on_device=cuda, val_images=0))
    if schedule or any(len(rows[name].images_per_s) != args.repeats for name in trainer_rows):
        raise RuntimeError(f"the Trainer stopped before the measurement schedule ended ({schedule} left)")
    return rows, swap.installed


def flops_per_image(
    backbone: torch.nn.Module, device: torch.device, batch: int = 16, image_shape: tuple[int, int, int] = (1, 32, 32),
) -> float:
    """Forward + backward FLOPs of one training image of ``image_shape`` (matmuls, convolutions, attention).

    The attention runs as PyTorch's math kernel here, so that it is counted as the model's products (backward twice
    the forward) whatever the device: the counter does not see the CPU's fused kernel at all, and counts the GPU's
    fused kernels with their backward's recomputation of the scores."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = torch.randn(batch, *image_shape, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        backbone(x, t).square().mean().backward()
    backbone.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def count_syncs(
    backbone: torch.nn.Module, root: str | None, batch: int, speed_ema: bool = True, steps: int = 20,
) -> dict[str, float]:
    """Host-device syncs per training step of (d), or of (b) without ``speed_ema``: sync-debug warnings
    and profiler CUDA events."""
    from torch.profiler import ProfilerActivity, profile

    from lightning_speed.callbacks import EMAWeightAveraging, SpeeD
    from lightning_speed.data import FashionMNISTDataModule

    class Probe(pl.Callback):
        def __init__(self) -> None:
            self.warned = 0
            self.prof = None
            self._ctx = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if trainer.global_step == 10:
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self._ctx = warnings.catch_warnings(record=True)
                self.records = self._ctx.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

        def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            torch.cuda.set_sync_debug_mode("default")
            self._ctx.__exit__(None, None, None)
            self.prof.__exit__(None, None, None)
            self.warned = sum("synchroniz" in str(w.message) for w in self.records)
            self.messages = sorted({str(w.message)[:120] for w in self.records if "synchroniz" in str(w.message)})

    probe = Probe()
    # Eager on purpose: host syncs come from the Python step code, and eager makes every op visible to the
    # sync debug mode and the profiler (a compiled graph would hide them inside one call).
    module = DiffusionModule(backbone)
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=10 + steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[SpeeD(), EMAWeightAveraging(), probe] if speed_ema else [probe],
    )
    trainer.fit(module, datamodule=FashionMNISTDataModule(root=root, batch_size=batch, on_device=True, val_images=0))
    names = [e.name for e in probe.prof.events()]
    sync_calls = sum(("Synchronize" in n) for n in names)
    dtoh = sum(("DtoH" in n) or ("Device -> Pageable" in n) for n in names)
    return {
        "sync_debug_warnings_per_step": probe.warned / steps,
        "cuda_synchronize_calls_per_step": sync_calls / steps,
        "device_to_host_copies_per_step": dtoh / steps,
        "sync_messages": probe.messages,
    }


def _save(result: dict[str, Any], args: argparse.Namespace, cuda: bool) -> None:
    write_json(Path(args.out), result)
    if not cuda or not result["rows"] or set(args.rows) != set(ROWS):
        return
    rows = result["rows"]
    small, large = rows[min(rows, key=int)], rows[max(rows, key=int)]
    update_summary(RESULTS / "summary.json", {
        "card": result["card"],
        "date": result["date"],
        "throughput": {
            "card": result["card"],
            "date": result["date"],
            "command": result["command"],
            "repeats": result["repeats"],
            "window_s": result["window_s"],
            "lightning_vs_naive": small["ratios"]["b_over_a0"],
            "lightning_vs_plain": small["ratios"]["b_over_a"],
            "lightning_vs_plain_spread": small.get("ratio_spread", {}).get("b_over_a"),
            "callbacks_vs_lightning": small["ratios"]["c_over_b"],
            "callbacks_vs_lightning_spread": small.get("ratio_spread", {}).get("c_over_b"),
            "bf16_peak_fraction": large.get("fraction_of_bf16_rate_b"),
            "bf16_peak_fraction_batch": int(max(rows, key=int)),
            "ema_ours_vs_lightning": small["ratios"]["d_over_d_lightning"],
            "images_per_s": {b: r["b_lightning"]["images_per_s"] for b, r in rows.items()},
            "spread": {b: {name: [r[name].get("min"), r[name].get("max")] for name in INTERLEAVED} for b, r in rows.items()},
        },
    })


def profile_rows(batch: int, fresh: Callable[[], torch.nn.Module], data: torch.Tensor,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Rows a and b, one after the other, each after its warm-up: first its host time per step
    (``host_ms_per_step``, the median of ``HOST_PROBE_REPEATS`` untraced bursts), then ``--profile-steps`` traced
    steps: kernel time, GPU idle time and kernels per step (``benchmarks.profiling``), and before the traced steps as
    many under cProfile (``python_functions``: where the host time goes). Where b/a < 1, this says whether b's GPU works
    longer or waits longer, whether the host is what it waits for, and which Python code holds the host."""
    device = data.device
    step = plain_step(fresh(), data, batch, fast=device.type == "cuda", compile_mode=args.compile_mode,
                      channels_last=args.channels_last)
    for _ in range(args.warmup):
        step()
    # Host time first (no profiler), HOST_PROBE_STEPS steps at a time: few enough not to fill the launch queue.
    probes = {"a_plain_fast": [host_probe_closure(step, device, HOST_PROBE_STEPS) for _ in range(HOST_PROBE_REPEATS)]}
    functions = {"a_plain_fast": python_functions_closure(step, device, args.profile_steps)}
    profiles = {"a_plain_fast": profile_closure(step, device, args.profile_steps)}
    del step
    probe_b = [HostProbe(args.warmup + i * (HOST_PROBE_STEPS + 1), HOST_PROBE_STEPS) for i in range(HOST_PROBE_REPEATS)]
    start = args.warmup + HOST_PROBE_REPEATS * (HOST_PROBE_STEPS + 1)
    python_b = PythonFunctions(start, args.profile_steps)
    start += args.profile_steps + 1
    traced = TrainerProfile(start, args.profile_steps, stop=True)
    lightning_loop(fresh(), args.root, batch, start, args.profile_steps + 1, speed=False, smoke=args.smoke,
                   compile_mode=args.compile_mode, channels_last=args.channels_last,
                   extra_callbacks=(*probe_b, python_b, traced))
    profiles["b_lightning"] = traced.result
    probes["b_lightning"] = [p.result for p in probe_b]
    functions["b_lightning"] = python_b.result
    for name, summary in profiles.items():
        table = summary.pop("table")
        summary["host_probe"] = probes[name]
        summary["python_functions"] = functions[name]
        summary["host_ms_per_step"] = statistics.median(p["host_ms_per_step"] for p in probes[name])
        print(f"--- profile of {name}, batch {batch}\n{table}\n{json.dumps(summary)}", flush=True)
    return profiles


def measure_batch(batch: int, names: list[str], fresh: Callable[[], torch.nn.Module], data: torch.Tensor,
                  args: argparse.Namespace) -> dict[str, Any]:
    """Every requested row at one batch size: a0 alone, a / b / c interleaved, then d and d_lightning alone."""
    device = data.device
    cuda = device.type == "cuda"
    row: dict[str, Any] = {}

    def alone(name: str, measure: Callable[[], float]) -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            ips = measure()
            row[name] = {"images_per_s": ips, "min": ips, "max": ips, "windows": [ips], "interleaved": False}
        except Exception as err:  # keep the other rows; report what failed
            print(f"batch {batch} {name} failed: {err!r}", flush=True)
            row[name] = {"images_per_s": float("nan"), "error": repr(err)[:500]}
        if cuda:
            row[name]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30

    def lit(speed: bool, ema: str | None = None) -> Callable[[], float]:
        return lambda: lightning_loop(fresh(), args.root, batch, args.warmup, args.steps, speed, args.smoke, ema,
                                      compile_mode=args.compile_mode, channels_last=args.channels_last)

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # a0 is the naive fp32 baseline
    if "a0_naive_fp32" in names:
        alone("a0_naive_fp32", lambda: plain_loop(fresh(), data, batch, args.warmup, args.steps, fast=False))
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    together = [name for name in INTERLEAVED if name in names]
    if together:
        try:
            measured, strategies = interleaved_rows(together, fresh, data, args.root, batch, args)
            for name, windows in measured.items():
                row[name] = {**windows.spread(), "interleaved": True}
                if name in strategies:
                    row[name]["strategy"] = strategies[name]
                if cuda:
                    row[name]["peak_memory_gib"] = windows.peak_memory_gib()
        except Exception as err:  # keep the rows measured alone; report what failed
            print(f"batch {batch} {', '.join(together)} failed: {err!r}", flush=True)
            row.update({name: {"images_per_s": float("nan"), "error": repr(err)[:500]} for name in together})
    if "d_speed_ema" in names:
        alone("d_speed_ema", lit(speed=True, ema="ours"))
    if "d_speed_ema_lightning" in names:
        alone("d_speed_ema_lightning", lit(speed=True, ema="lightning"))
    row = {name: row[name] for name in ROWS.values() if name in row}  # the rows in table order
    for name, entry in row.items():
        print(f"batch {batch} {name}: {entry['images_per_s']:.0f} images/s", entry.get("windows", ""), flush=True)
    ips = {k: v["images_per_s"] for k, v in row.items()}
    row["ratios"] = {
        name: ips[top] / ips[bottom]
        for name, (top, bottom) in RATIOS.items()
        if top in ips and bottom in ips
    }
    per_repeat = {  # interleaved rows: the ratio within each repeat (windows of one round of the schedule)
        name: [x / y for x, y in zip(row[top]["windows"], row[bottom]["windows"])]
        for name, (top, bottom) in RATIOS.items()
        if row.get(top, {}).get("interleaved") and row.get(bottom, {}).get("interleaved")
    }
    row["ratios_per_repeat"] = per_repeat
    row["ratio_spread"] = {name: [min(r), max(r)] for name, r in per_repeat.items()}
    if args.profile_steps:
        row["profile"] = profile_rows(batch, fresh, data, args)
    return row


def main() -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    p.add_argument("--steps", type=int, default=200,
                   help="timed steps of the rows measured alone, and the fewest steps of an interleaved window")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps before a row's first window (compilation)")
    p.add_argument("--window", type=float, default=10.0, help="seconds per interleaved window (at least; 0.05 with --smoke)")
    p.add_argument("--repeats", type=int, default=3, help="windows per interleaved row (rows a, b, c)")
    p.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--out", default=None,
                   help="default: benchmarks/results/throughput.json, or throughput_<rows>.json for a subset of rows")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                   help="measure only these rows (summary.json is updated only when all rows ran)")
    p.add_argument("--compile-mode", default="reduce-overhead", choices=["reduce-overhead", "max-autotune", "default"],
                   help="torch.compile mode of rows a to d on CUDA (the configs use reduce-overhead)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC weights and activations in rows a to d (the configs' setting)")
    p.add_argument("--merge", action="store_true",
                   help="keep the batch sizes already in --out (same card): measure 128 and 512 in separate runs")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="also trace this many steps of rows a and b per batch size, each after its warm-up (0: none)")
    p.add_argument("--smoke", action="store_true", help="tiny model, CPU, a few steps (for the test suite)")
    args = p.parse_args()
    if args.out is None:
        subset = "" if set(args.rows) == set(ROWS) else "_" + "_".join(args.rows)
        args.out = str(RESULTS / f"throughput{subset}.json")
    if args.repeats < 1 or args.steps < 1 or args.warmup < 1 or args.window < 0 or args.profile_steps < 0:
        raise SystemExit("--repeats, --steps and --warmup must be at least 1, --window and --profile-steps at least 0")

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        torch.set_num_threads(1)  # one thread: the tiny smoke steps are fastest so, and do not thrash a busy two-core CI machine
        args.window = min(args.window, 0.05)

    def fresh() -> torch.nn.Module:
        return seeded_backbone(args.smoke, device)

    result: dict[str, Any] = {"card": device_name(), "date": today(), "rows": {}, "torch": torch.__version__,
                              "compile_mode": args.compile_mode, "channels_last": args.channels_last,
                              "repeats": args.repeats, "window_s": args.window,
                              "command": " ".join(["python -m benchmarks.throughput", *sys.argv[1:]])}
    if args.merge and Path(args.out).exists():
        earlier = json.loads(Path(args.out).read_text())
        if any(earlier.get(k) != result[k] for k in ("card", "channels_last", "repeats")):
            raise SystemExit(f"--merge: {args.out} was measured on {earlier.get('card')!r} with channels_last="
                             f"{earlier.get('channels_last')}, repeats={earlier.get('repeats')}; measure all batch "
                             "sizes again or choose another --out")
        result["rows"] = {b: r for b, r in earlier["rows"].items() if int(b) not in args.batch_sizes}
        result["merged_from"] = {b: earlier.get("date") for b in result["rows"]}
        for key in ("syncs", "syncs_b"):
            if key in earlier:
                result[key] = earlier[key]
    result["flops_per_image"] = flops_per_image(fresh(), device)
    if cuda:
        result["bf16_matmul_tflops"] = measured_bf16_matmul_tflops()
    data = synthetic_images(60_000 if cuda else 512, device)
    names = [ROWS[r] for r in args.rows]

    for batch in args.batch_sizes:
        row = measure_batch(batch, names, fresh, data, args)
        if cuda and "b_lightning" in row:
            achieved = result["flops_per_image"] * row["b_lightning"]["images_per_s"] / 1e12
            row["achieved_tflops_b"] = achieved
            row["fraction_of_bf16_rate_b"] = achieved / result["bf16_matmul_tflops"]
        result["rows"][str(batch)] = row
        # The sync probes right after the first (smallest) batch size: (d) as the configs train, and (b).
        for key, speed_ema, row_key in (("syncs", True, "d"), ("syncs_b", False, "b")):
            if cuda and key not in result and row_key in args.rows:
                try:
                    result[key] = count_syncs(fresh(), args.root, batch, speed_ema)
                except Exception as err:
                    result[key] = {"error": repr(err)[:500]}
        _save(result, args, cuda)  # after every batch size, so a cut-off run keeps what it measured
    print(json.dumps(result, indent=1), flush=True)
    return result

if __name__ == "__main__":
    main()
