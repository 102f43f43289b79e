"""Multi-GPU scaling: training images/s on N GPUs (DDP) over 1 GPU, for several DDP and compile settings.

Two models, each as its shipped config trains it (DiffusionModule + the SpeeD callback + our EMA, bf16,
data on the GPU), with a fixed batch per GPU:
  unet  the Fashion-MNIST UNet (configs/fashion_mnist.yaml; row d of throughput.py), EMA 0.999
  dit   DiT-B/2 (--dit-preset) on random 4x32x32 latents, learned sigma, EMA 0.9999, as dit_throughput.py
        builds its Trainer row

A variant is a compile mode and DDP settings, written MODE[:static][:view][:nobuffers][:bucket=MB][:hook=H][:lag=N][:stream=S]:
  MODE        DiffusionModule's compile_mode: default, reduce-overhead, max-autotune,
              max-autotune-no-cudagraphs or none (eager)
  static      DDPStrategy(static_graph=True)
  view        DDPStrategy(gradient_as_bucket_view=True)
  nobuffers   DDPStrategy(broadcast_buffers=False): no broadcast of the module's buffers before each forward
              (ours are constant tables)
  bucket=MB   DDPStrategy(bucket_cap_mb=MB)
  hook=H      DDPStrategy(ddp_comm_hook=...): H is bf16 or fp16, PyTorch's bf16_compress_hook / fp16_compress_hook
              (gradients all-reduced in half precision, half the bytes; CUDA only)
  lag=N       lightning_speed.distributed.SyncFreeDDPStrategy(sigterm_check_lag=N): the ranks' SIGTERM flags are read
              N steps after they are combined instead of at once (0: Lightning's per-step wait for the GPU)
  stream=S    SyncFreeDDPStrategy(init_stream=S): DDP built on the "current" stream or on a "side" one (Lightning's)
              Without lag= and stream= the run uses Lightning's DDPStrategy, which behaves as lag=0:stream=side.
  shipped     the settings of configs/multi_gpu/ddp.yaml (what users compose) with the compile mode of the
              model's own config (ddp.yaml sets none)
  fsdp[:MODE] Lightning's FSDPStrategy as configs/multi_gpu/fsdp_dit_xl.yaml sets it (FULL_SHARD, one unit per DiT
              block), with its compile mode or MODE; the EMA averages each rank's shard
Each device count of each variant runs in its own process (Lightning's DDP launcher starts the other
ranks by running this module again). One GPU runs once per compile mode (DDP settings do not apply there),
and also with the single-GPU config's own compile mode (the baseline a user has before adding GPUs).
Speed-up = images/s on N GPUs (all GPUs together) over the best one-GPU figure of the same model and batch.

Timing: after --warmup steps (compilation, CUDA-graph recording) --windows windows of --window-steps steps
each, synchronised at both ends; the result is their mean with min and max. Every process records
torch.compile's counters (graph breaks, CUDA-graph skips, recompilations) and the log lines and warnings
that mention them. --profile adds, on rank 0, a torch.profiler window after the timed ones: GPU kernel time
split into compute and NCCL (and how much NCCL time overlaps compute), and the GPU's idle time, per step;
--trace-dir also writes its Chrome trace.

    # on 2 H200s, about 10 minutes: six processes of 40-160 s, mostly compilation (UNet at 128 and 512 per GPU,
    # DiT-B/2 at 256; 1 and 2 GPUs; shipped settings)
    python -m benchmarks.ddp_scaling --root .data --out ddp_scaling.json
    # compare settings in one run
    python -m benchmarks.ddp_scaling --models unet --unet-batches 128 --variants reduce-overhead \\
        default:static:view max-autotune-no-cudagraphs:static:view --profile --root .data
    # 1 and 2 GPUs in one run, 4 in another: one table, speed-ups over the best one-GPU figure of both
    python -m benchmarks.ddp_scaling --merge ddp_1_2.json ddp_4.json --out ddp_scaling.json
    python -m benchmarks.ddp_scaling --smoke --out /tmp/ddp.json   # CPU, 1 and 2 processes, tiny models (tests)
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch._dynamo.utils import counters
from typing_extensions import override

from benchmarks.common import REPO, RESULTS, device_name, import_path, load_config, today, update_summary, write_json
from benchmarks.dit_throughput import SMOKE_DIT, EndlessLatents
from benchmarks.profiling import TrainerProfile
from benchmarks.throughput import seeded_backbone
from benchmarks.windows import sync
from lightning_speed import DiffusionModule
from lightning_speed.backbones import DIT_PRESETS, DiT
from lightning_speed.callbacks import EMAWeightAveraging, SpeeD
from lightning_speed.data import FashionMNISTDataModule
from lightning_speed.distributed import SyncFreeDDPStrategy

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "none")
SINGLE_GPU_CONFIG = {"unet": "fashion_mnist.yaml", "dit": "fashion_mnist_dit.yaml"}
EMA_DECAY = {"unet": 0.999, "dit": 0.9999}
# hook=H -> DDPStrategy's ddp_comm_hook, as the dotted path a YAML config gives it (jsonargparse imports it)
COMM_HOOKS = {name: f"torch.distributed.algorithms.ddp_comm_hooks.default_hooks.{name}_compress_hook"
              for name in ("bf16", "fp16")}
# what a compile log line or warning must mention to be kept in the results
WATCHED = ("cudagraph", "cuda graph", "graph break", "recompil", "skipping", "ddp")


# ------------------------------------------------------------------------------------- variants
def parse_variant(spec: str) -> dict[str, Any]:
    """``MODE[:static][:view][:nobuffers][:bucket=MB][:hook=H][:lag=N][:stream=S]``, ``shipped`` or ``fsdp`` -> {"name",
    "compile_mode", "ddp": {...}} (and "fsdp": FSDPStrategy's arguments)."""
    if spec.split(":")[0] == "fsdp":
        config = load_config("multi_gpu/fsdp_dit_xl.yaml")
        strategy = config["trainer"]["strategy"]
        fsdp = {**(strategy.get("init_args") or {}), **(strategy.get("dict_kwargs") or {})}
        mode = spec.split(":", 1)[1] if ":" in spec else config["model"].get("compile_mode") or "none"
        if mode not in COMPILE_MODES:
            raise SystemExit(f"--variants {spec!r}: fsdp[:MODE] takes a compile mode, one of {', '.join(COMPILE_MODES)}.")
        return {"name": spec, "compile_mode": mode, "ddp": {}, "fsdp": fsdp}
    if spec == "shipped":  # ddp.yaml composes on top of a base config, whose compile mode it keeps unless it sets one
        config = load_config("multi_gpu/ddp.yaml")
        strategy = config["trainer"]["strategy"]
        ddp = dict(strategy.get("init_args") or {})
        if strategy["class_path"].endswith("SyncFreeDDPStrategy"):  # its own defaults, spelled out
            ddp = {**SYNC_FREE_DEFAULTS, **ddp}
        return {"name": "shipped", "compile_mode": (config.get("model") or {}).get("compile_mode"), "ddp": ddp}
    mode, *options = spec.split(":")
    if mode not in COMPILE_MODES:
        raise SystemExit(f"--variants {spec!r}: the compile mode must be one of {', '.join(COMPILE_MODES)} (or the "
                         "variant 'shipped' or 'fsdp'), e.g. default:static:view:bucket=50.")
    ddp: dict[str, Any] = {}
    for option in options:
        if option == "static":
            ddp["static_graph"] = True
        elif option == "view":
            ddp["gradient_as_bucket_view"] = True
        elif option == "nobuffers":
            ddp["broadcast_buffers"] = False
        elif option.startswith("bucket=") and option[7:].replace(".", "", 1).isdigit():
            ddp["bucket_cap_mb"] = float(option[7:])
        elif option.startswith("hook=") and option[5:] in COMM_HOOKS:
            ddp["ddp_comm_hook"] = COMM_HOOKS[option[5:]]
        elif option.startswith("lag=") and option[4:].isdigit():
            ddp["sigterm_check_lag"] = int(option[4:])
        elif option in ("stream=current", "stream=side"):
            ddp["init_stream"] = option[7:]
        else:
            raise SystemExit(f"--variants {spec!r}: unknown option {option!r}; use static, view, nobuffers, bucket=MB, "
                             f"hook={'|'.join(COMM_HOOKS)}, lag=N or stream=current|side.")
    return {"name": spec, "compile_mode": mode, "ddp": ddp}


def single_gpu_mode(model: str) -> str:
    """The compile mode of the model's single-GPU config (the one-GPU baseline)."""
    return load_config(SINGLE_GPU_CONFIG[model])["model"].get("compile_mode") or "none"


def resolved(variant: dict[str, Any], model: str) -> dict[str, Any]:
    """The variant for one model: "shipped" without a compile mode of its own takes the model's config's."""
    return {**variant, "compile_mode": variant["compile_mode"] or single_gpu_mode(model)}


# DistributedDataParallel's, and Lightning's DDPStrategy in SyncFreeDDPStrategy's terms (what a run without lag= or
# stream= used)
DDP_DEFAULTS = {"static_graph": False, "gradient_as_bucket_view": False, "broadcast_buffers": True,
                "bucket_cap_mb": 25.0, "ddp_comm_hook": None, "sigterm_check_lag": 0, "init_stream": "side"}
SYNC_FREE_OPTIONS = ("sigterm_check_lag", "init_stream")  # SyncFreeDDPStrategy's own arguments
SYNC_FREE_DEFAULTS = {name: p.default for name, p in inspect.signature(SyncFreeDDPStrategy).parameters.items()
                      if name in SYNC_FREE_OPTIONS}


def same_settings(a: dict[str, Any], b: dict[str, Any], gradient_mb: float | None = None) -> bool:
    """Two variants train alike: one compile mode and the same DDP settings once DDP's defaults are filled in.

    With the model's gradient size (``gradient_mb``), two bucket caps that both hold every gradient count as one:
    DDP then puts all gradients in a single bucket under either cap, so the two runs communicate identically.
    """
    if a.get("fsdp") or b.get("fsdp"):
        return a.get("fsdp") == b.get("fsdp") and a["compile_mode"] == b["compile_mode"]
    a_ddp, b_ddp = {**DDP_DEFAULTS, **a["ddp"]}, {**DDP_DEFAULTS, **b["ddp"]}
    if gradient_mb is not None and min(a_ddp["bucket_cap_mb"], b_ddp["bucket_cap_mb"]) >= gradient_mb:
        a_ddp["bucket_cap_mb"] = b_ddp["bucket_cap_mb"]
    return a["compile_mode"] == b["compile_mode"] and a_ddp == b_ddp


def gradient_mb(model: str, dit_preset: str) -> float:
    """MiB of fp32 gradients of the measured model (built on the meta device: no memory, no initialisation cost; the
    global random state is left as it was)."""
    meta = torch.device("meta")
    with torch.random.fork_rng(devices=[]), meta:
        backbone = measured_backbone(model, dit_preset, smoke=False, device=meta)
    return sum(p.numel() for p in backbone.parameters()) * 4 / 2**20


def latent_size(smoke: bool) -> int:
    """Height and width of DiT's random latents (4 channels)."""
    return 8 if smoke else 32


def measured_backbone(model: str, dit_preset: str, smoke: bool, device: torch.device) -> torch.nn.Module:
    """The backbone a measurement trains (or its tiny smoke version), from seed 0."""
    if model == "unet":
        return seeded_backbone(smoke, device)
    torch.manual_seed(0)
    return DiT(preset=dit_preset, in_channels=4, image_size=latent_size(smoke), learn_sigma=True,
               **(SMOKE_DIT if smoke else {})).to(device)


# --------------------------------------------------------------------------- one measurement (a process)
class WindowTimer(pl.Callback):
    """Timed windows after the warm-up (``boundaries``: the steps at which they start and end)."""

    def __init__(self, warmup: int, windows: int, steps: int) -> None:
        self.boundaries = [warmup + k * steps for k in range(windows + 1)]
        self.times: list[float] = []
        self.steps = steps

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step in self.boundaries:
            sync(pl_module.device)
            self.times.append(time.perf_counter())

    def images_per_s(self, images_per_step: int) -> list[float]:
        return [images_per_step * self.steps / (b - a) for a, b in zip(self.times, self.times[1:])]


class _Watch(logging.Handler):
    """Keeps the log lines of torch.compile that mention graph breaks, CUDA graphs or recompilation."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if any(w in text.lower() for w in WATCHED) and len(self.lines) < 50:
            self.lines.append(text[:300])


def lazy_latents(batch: int, size: int, smoke: bool) -> Any:
    """Endless device-resident latent batches, created on the rank's device when Lightning iterates."""
    class RankLatents:
        def __iter__(self) -> Any:
            cuda = torch.cuda.is_available() and not smoke
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
            pool = torch.randn(4 * batch if smoke else 10_000, 4, size, size, device=device)
            return iter(EndlessLatents(lambda: pool[torch.randint(0, pool.shape[0], (batch,), device=device)]))

    return RankLatents()


def measure(run: dict[str, Any]) -> None:
    """One model, batch, variant and device count; rank 0 writes the part file."""
    smoke, devices, model = run["smoke"], run["devices"], run["model"]
    cuda = torch.cuda.is_available() and not smoke
    if smoke:
        torch.set_num_threads(1)
    else:
        torch.set_float32_matmul_precision("high")
    mode = None if smoke or run["compile_mode"] == "none" else run["compile_mode"]
    watch = _Watch()
    logging.getLogger("torch").addHandler(watch)
    if cuda:
        torch._logging.set_logs(perf_hints=True, graph_breaks=True, recompiles=True)
    # on the CPU: Lightning moves it to each rank's device
    backbone = measured_backbone(model, run["dit_preset"], smoke, torch.device("cpu"))
    if model == "unet":
        module = DiffusionModule(backbone, compile_mode=mode, channels_last=cuda)
        data: dict[str, Any] = {"datamodule": FashionMNISTDataModule(root=run["root"], batch_size=run["batch"],
                                                                     on_device=cuda, val_images=0)}
    else:
        size = latent_size(smoke)
        module = DiffusionModule(backbone, learn_sigma=True, compile_mode=mode, image_shape=(4, size, size))
        data = {"train_dataloaders": lazy_latents(run["batch"], size, smoke)}
    timer = WindowTimer(run["warmup"], run["windows"], run["window_steps"])
    profiler = TrainerProfile(timer.boundaries[-1], run["profile_steps"], run["trace"])  # after the timed windows
    strategy_class = SyncFreeDDPStrategy if set(SYNC_FREE_OPTIONS) & run["ddp"].keys() else DDPStrategy
    ddp = {**run["ddp"]}
    if ddp.get("ddp_comm_hook"):  # a dotted path (JSON, YAML) -> the function
        ddp["ddp_comm_hook"] = import_path(ddp["ddp_comm_hook"])
    strategy: Any = strategy_class(**ddp) if devices > 1 else "auto"
    if run.get("fsdp") and devices > 1:
        strategy = fsdp_strategy(run["fsdp"])
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=devices, strategy=strategy,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=timer.boundaries[-1] + run["profile_steps"] + 1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[SpeeD(tau=700, k=5, dual=True, lam=0.6), EMAWeightAveraging(decay=EMA_DECAY[model]), timer,
                   *([profiler] if run["profile_steps"] else [])],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, **data)
    if trainer.global_rank != 0:
        return
    ips = timer.images_per_s(run["batch"] * devices)
    messages = watch.lines + [str(w.message)[:300] for w in caught if any(k in str(w.message).lower() for k in WATCHED)]
    result = {
        **{k: run[k] for k in ("model", "batch", "devices", "variant", "compile_mode", "ddp")},
        **({"fsdp": run["fsdp"]} if run.get("fsdp") else {}),
        "images_per_s": statistics.mean(ips), "min": min(ips), "max": max(ips), "windows": ips,
        "compile_counters": {k: dict(v) for k, v in counters.items()
                             if k in ("graph_break", "inductor", "stats", "recompiles") and v},
        "messages": list(dict.fromkeys(messages))[:30],
        "profile": profiler.result,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    write_json(Path(run["part"]), result)


def fsdp_strategy(settings: dict[str, Any]) -> Any:
    """Lightning's FSDPStrategy from the YAML's arguments (``auto_wrap_policy`` as dotted class paths)."""
    from lightning.pytorch.strategies import FSDPStrategy

    settings = dict(settings)
    for key in ("auto_wrap_policy", "activation_checkpointing_policy"):
        if settings.get(key) is not None:
            settings[key] = {import_path(path) for path in settings[key]}
    return FSDPStrategy(**settings)


# ------------------------------------------------------------------------------------ orchestration
def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every process to run, in an order that lets a variant's 1- and N-GPU runs share compiled code."""
    variants = [parse_variant(v) for v in args.variants]
    if len({v["name"] for v in variants}) != len(variants):
        raise SystemExit("--variants: each variant once.")
    batches = {"unet": args.unet_batches, "dit": args.dit_batches}
    runs = []
    for model in args.models:
        ours = [resolved(v, model) for v in variants]
        for batch in batches[model]:
            base = {"model": model, "batch": batch}
            if 1 in args.devices:
                modes = dict.fromkeys([single_gpu_mode(model), *(v["compile_mode"] for v in ours)])
                if args.smoke:  # eager on the CPU whatever the mode: one run stands for all
                    modes = dict.fromkeys(v["compile_mode"] for v in ours[:1])
                runs += [{**base, "devices": 1, "variant": f"1gpu:{mode}", "compile_mode": mode, "ddp": {}} for mode in modes]
            runs += [{**base, "devices": n, "variant": v["name"], "compile_mode": v["compile_mode"], "ddp": v["ddp"],
                      **({"fsdp": v["fsdp"]} if v.get("fsdp") else {})}
                     for v in ours for n in args.devices if n > 1]
    return runs


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    parts = Path(tempfile.mkdtemp(prefix="ddp_scaling_"))
    command = " ".join(["python -m benchmarks.ddp_scaling", *sys.argv[1:]])
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i, run in enumerate(plan(args)):
        run = {**run, "part": str(parts / f"run{i}.json"), "smoke": args.smoke, "root": args.root,
               "dit_preset": args.dit_preset, "warmup": args.warmup, "windows": args.windows,
               "window_steps": args.window_steps, "profile_steps": args.profile_steps if args.profile else 0,
               "trace": str(Path(args.trace_dir) / f"trace_run{i}.json") if args.profile and args.trace_dir else None}
        t0 = time.perf_counter()
        label = f"{run['model']}@{run['batch']} {run['variant']} x{run['devices']}"
        returncode = run_process(run, args.process_timeout)
        if returncode != 0 or not Path(run["part"]).is_file():
            error = "timed out" if returncode is None else f"exit status {returncode}"
            print(f"{label}: FAILED ({error})", flush=True)
            results.append({**{k: run[k] for k in ("model", "batch", "devices", "variant", "compile_mode", "ddp")},
                            "error": error})
            continue
        result = json.loads(Path(run["part"]).read_text())
        result["process_s"] = time.perf_counter() - t0
        profile = result.get("profile") or {}
        if profile.get("table"):
            print(f"--- profile of rank 0, {label}\n{profile.pop('table')}", flush=True)
        print(f"{label}: {result['images_per_s']:.0f} images/s (min {result['min']:.0f}, max {result['max']:.0f}), "
              f"{result['process_s']:.0f} s; {json.dumps({k: v for k, v in profile.items() if k != 'table'})}", flush=True)
        results.append(result)
        # after every process, so a run stopped early keeps what it measured
        write_json(Path(args.out), collect(args, command, results, time.perf_counter() - started, complete=False))
    return publish(collect(args, command, results, time.perf_counter() - started, complete=True), args.out, args.smoke)


def run_process(run: dict[str, Any], timeout: float) -> int | None:
    """One measurement in its own process group; after ``timeout`` seconds the group (every rank Lightning started)
    is killed, so a hung rank cannot hold the GPUs the next measurement needs. None: it timed out."""
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.ddp_scaling", "--run", json.dumps(run)], cwd=REPO,
                            start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def spec_of(run: dict[str, Any]) -> str:
    """The MODE[:static][:view][:nobuffers][:bucket=MB][:hook=H][:lag=N][:stream=S] name of a run's settings (the inverse of
    parse_variant)."""
    ddp = run["ddp"]
    options = [name for name, key in (("static", "static_graph"), ("view", "gradient_as_bucket_view")) if ddp.get(key)]
    if ddp.get("broadcast_buffers") is False:
        options.append("nobuffers")
    if "bucket_cap_mb" in ddp:
        options.append(f"bucket={float(ddp['bucket_cap_mb']):g}")
    if ddp.get("ddp_comm_hook"):
        options.append("hook=" + next(k for k, v in COMM_HOOKS.items() if v == ddp["ddp_comm_hook"]))
    if "sigterm_check_lag" in ddp:
        options.append(f"lag={int(ddp['sigterm_check_lag'])}")
    if "init_stream" in ddp:
        options.append(f"stream={ddp['init_stream']}")
    return ":".join([run["compile_mode"], *options])


def collect(args: argparse.Namespace, command: str, results: list[dict[str, Any]], seconds: float,
            complete: bool) -> dict[str, Any]:
    return {"card": "cpu" if args.smoke else device_name(), "date": today(), "command": command, "smoke": args.smoke,
            "complete": complete, "seconds": seconds, "windows": args.windows, "window_steps": args.window_steps,
            "warmup": args.warmup, "dit_preset": args.dit_preset, "scaling": summarise(results), "runs": results}


def merge(files: list[str], out_path: str, smoke: bool) -> dict[str, Any]:
    """One table from several runs' results (e.g. 1 and 2 GPUs in one run, 4 GPUs in the next) on one kind of card:
    each run keeps the command that measured it; the speed-ups use the best one-GPU figure of all of them."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    cards = {p["card"] for p in parts}
    presets = {p["dit_preset"] for p in parts}
    if len(cards) > 1 or len(presets) > 1:
        raise SystemExit(f"--merge: the files come from different cards {sorted(cards)} or DiT presets "
                         f"{sorted(presets)}; merge only measurements of one setting.")
    # a run measured as "shipped" is named by its settings: ddp.yaml may have changed since
    runs = [{**r, "command": p["command"], "variant": spec_of(r) if r["variant"] == "shipped" else r["variant"]}
            for p in parts for r in p["runs"]]
    out = {"card": parts[0]["card"], "date": max(p["date"] for p in parts),
           "command": " && ".join(dict.fromkeys(p["command"] for p in parts)), "smoke": parts[0]["smoke"],
           "complete": all(p.get("complete", True) for p in parts), "merged": [str(f) for f in files],
           "dit_preset": parts[0]["dit_preset"], "scaling": summarise(runs), "runs": runs}
    return publish(out, out_path, smoke or out["smoke"])


def publish(out: dict[str, Any], path: str, smoke: bool) -> dict[str, Any]:
    """Write the results file, update summary.json's keys (GPU results only) and print the table."""
    write_json(Path(path), out)
    if not smoke:
        update_summary(RESULTS / "summary.json", summary_keys(out))
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    return out


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model@batch: the best one-GPU figure and, per variant, images/s and speed-up per device count."""
    table: dict[str, Any] = {}
    for r in (r for r in results if "images_per_s" in r):
        key = f"{r['model']}@{r['batch']}"
        entry = table.setdefault(key, {"one_gpu": {}, "variants": {}})
        if r["devices"] == 1:
            entry["one_gpu"][r["compile_mode"]] = r["images_per_s"]
        else:
            variant = entry["variants"].setdefault(r["variant"], {"compile_mode": r["compile_mode"], "ddp": r["ddp"],
                                                                  **({"fsdp": r["fsdp"]} if r.get("fsdp") else {}),
                                                                  "images_per_s": {}, "peak_memory_gib": {}})
            variant["images_per_s"][str(r["devices"])] = r["images_per_s"]
            variant["peak_memory_gib"][str(r["devices"])] = r.get("peak_memory_gib")
    for entry in table.values():
        best = max(entry["one_gpu"].values(), default=None)
        entry["best_one_gpu"] = best
        for v in entry["variants"].values():
            same = entry["one_gpu"].get(v["compile_mode"])
            v["speedup"] = {n: x / best for n, x in v["images_per_s"].items()} if best else {}
            v["speedup_same_compile_mode"] = {n: x / same for n, x in v["images_per_s"].items()} if same else {}
    return table


def shipped_variants(model: str, entry: dict[str, Any], gradients: float | None = None) -> list[dict[str, Any]]:
    """The measured variants that train as configs/multi_gpu/ddp.yaml does on the model's base config (whatever
    their names were when they ran; ``gradients``: the model's gradient MiB, see ``same_settings``)."""
    shipped = resolved(parse_variant("shipped"), model)
    return [v for v in entry["variants"].values() if same_settings(v, shipped, gradients)]


def summary_keys(out: dict[str, Any]) -> dict[str, Any]:
    """summary.json: the shipped multi-GPU settings' figures ("ddp_scaling_2gpu": UNet, "ddp_scaling_dit": DiT-B/2,
    another preset under its own key) and the FSDP variants' ("fsdp_dit"). Where several measured variants train as
    the shipped settings (repeats under other names), images/s and speed-up are their mean and ``runs_Ngpu`` lists
    each."""
    keys: dict[str, Any] = {}
    # the headline DiT figure is DiT-B/2's; another preset gets its own key (DiT-XL/2: "ddp_scaling_dit_xl_2")
    preset = out["dit_preset"]
    dit_key = "ddp_scaling_dit" if preset == "DiT-B/2" else "ddp_scaling_" + preset.lower().replace("-", "_").replace("/", "_")
    for key, model in (("ddp_scaling_2gpu", "unet"), (dit_key, "dit")):
        per_batch = {}
        entries = {name: entry for name, entry in out["scaling"].items()
                   if name.startswith(f"{model}@") and entry["best_one_gpu"]}
        gradients = gradient_mb(model, out["dit_preset"]) if entries else None
        for name, entry in entries.items():
            shipped = [v for v in shipped_variants(model, entry, gradients) if v["images_per_s"]]
            if not shipped:
                continue
            counts = sorted({n for v in shipped for n in v["images_per_s"]}, key=int)
            runs = {n: [v["images_per_s"][n] for v in shipped if n in v["images_per_s"]] for n in counts}
            per_batch[name.split("@")[1]] = {
                "images_per_s_1gpu": entry["best_one_gpu"],
                **{f"images_per_s_{n}gpu": statistics.mean(runs[n]) for n in counts},
                **{f"speedup_{n}gpu": statistics.mean(runs[n]) / entry["best_one_gpu"] for n in counts},
                **{f"runs_{n}gpu": runs[n] for n in counts if len(runs[n]) > 1},
                "compile_mode": shipped[0]["compile_mode"], "ddp": shipped[0]["ddp"]}
        if per_batch:
            keys[key] = {"card": out["card"], "date": out["date"], "command": out["command"],
                         "model": model if model == "unet" else out["dit_preset"], "batch_per_gpu": per_batch}
    fsdp = {name.split("@")[1]: {"images_per_s_1gpu": entry["best_one_gpu"],
                                 **{f"images_per_s_{n}gpu": x for n, x in v["images_per_s"].items()},
                                 **{f"speedup_{n}gpu": x for n, x in v["speedup"].items()},
                                 **{f"peak_memory_gib_{n}gpu": m for n, m in v.get("peak_memory_gib", {}).items()},
                                 "compile_mode": v["compile_mode"], "fsdp": v["fsdp"]}
            for name, entry in out["scaling"].items() if name.startswith("dit@")
            for v in entry["variants"].values() if v.get("fsdp") and v["images_per_s"]}
    if fsdp:
        keys["fsdp_dit"] = {"card": out["card"], "date": out["date"], "command": out["command"],
                            "model": out["dit_preset"], "batch_per_gpu": fsdp}
    return keys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=["unet", "dit"], default=["unet", "dit"])
    p.add_argument("--unet-batches", type=int, nargs="+", default=None, help="per GPU (default 128 512; smoke 8)")
    p.add_argument("--dit-batches", type=int, nargs="+", default=None, help="per GPU (default 256; smoke 4)")
    p.add_argument("--dit-preset", default="DiT-B/2", choices=list(DIT_PRESETS))
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="device counts to compare")
    p.add_argument("--variants", nargs="+", default=["shipped"], help="MODE[:static][:view][:nobuffers][:bucket=MB][:hook=H][:lag=N][:stream=S] or shipped")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 15; smoke 1)")
    p.add_argument("--windows", type=int, default=None, help="timed windows (default 3; smoke 2)")
    p.add_argument("--window-steps", type=int, default=None, help="steps per window (default 60; smoke 2)")
    p.add_argument("--profile", action="store_true", help="profile rank 0 after the windows (printed, in the JSON)")
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--trace-dir", default=None, help="with --profile: write each run's Chrome trace here")
    p.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--out", default=str(RESULTS / "ddp_scaling.json"))
    p.add_argument("--smoke", action="store_true", help="CPU processes, tiny models, a few steps (tests)")
    p.add_argument("--process-timeout", type=float, default=300, help="seconds before a measurement is killed")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="no measurement: combine these results files into --out (and summary.json)")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = p.parse_args()
    if args.run:
        measure(json.loads(args.run))
        return
    if args.merge:
        merge(args.merge, args.out, args.smoke)
        return
    smoke = args.smoke
    args.unet_batches = args.unet_batches or ([8] if smoke else [128, 512])
    args.dit_batches = args.dit_batches or ([4] if smoke else [256])
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 15)
    args.windows = args.windows or (2 if smoke else 3)
    args.window_steps = args.window_steps or (2 if smoke else 60)
    if args.windows < 1 or args.window_steps < 1:
        raise SystemExit("--windows and --window-steps must be at least 1.")
    batches = [*args.unet_batches, *args.dit_batches]
    if args.warmup < 1 or min(batches) < 1 or min(args.devices) < 1 or (args.profile and args.profile_steps < 1):
        raise SystemExit("--warmup, --unet-batches, --dit-batches, --devices and --profile-steps must be at least 1.")
    os.environ.setdefault("PYTHONPATH", str(REPO))
    orchestrate(args)


if __name__ == "__main__":
    main()
