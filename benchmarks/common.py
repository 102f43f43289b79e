"""Helpers shared by the benchmark scripts: configs, device facts, JSON results.

torch is imported inside the functions that use it: the convergence launcher and report, and the
DDP orchestrator, import this module and need no torch (seconds of start-up per process).
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def import_path(path: str) -> Any:
    """The object a dotted path names (``package.module.Name``), as a YAML config names classes and functions."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def instantiate(spec: Any) -> Any:
    """Build ``{"class_path": ..., "init_args": {...}}`` (nested) the way the CLI would."""
    if isinstance(spec, dict) and "class_path" in spec:
        cls = import_path(spec["class_path"])
        kwargs = {k: instantiate(v) for k, v in (spec.get("init_args") or {}).items()}
        return cls(**kwargs)
    if isinstance(spec, list):
        return [instantiate(v) for v in spec]
    return spec


def load_config(name: str) -> dict[str, Any]:
    with open(REPO / "configs" / name) as f:
        return yaml.safe_load(f)


def default_backbone(config: str = "fashion_mnist.yaml", **overrides: Any) -> torch.nn.Module:
    """The backbone of a shipped config (the project's default Fashion-MNIST UNet)."""
    spec = load_config(config)["model"]["backbone"]
    spec = {"class_path": spec["class_path"], "init_args": {**spec.get("init_args", {}), **overrides}}
    return instantiate(spec)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def measured_bf16_matmul_tflops(n: int = 8192, iters: int = 20) -> float:
    """The card's bf16 matrix-product rate, measured (not the datasheet)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def update_summary(path: Path, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge keys into summary.json (other benchmarks own other keys)."""
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.update(updates)
    write_json(path, summary)
    return summary


def today() -> str:
    return time.strftime("%Y-%m-%d")


# Tiny backbones for CPU smoke runs of the shipped configs, by backbone class name.
SMOKE_BACKBONES: dict[str, dict[str, Any]] = {
    # [1, 2, 2]: the middle block's attention runs at 8x8, several times faster on a CPU than at 16x16
    "UNet": {"base_channels": 16, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "attention_resolutions": []},
    "DiT": {"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 8},
}


def smoke_args(backbone_class_path: str) -> list[str]:
    """CLI overrides that make a shipped config's model take CPU-sized steps: a tiny backbone of the
    same class, fp32 on the CPU, eager (no compilation)."""
    name = backbone_class_path.rsplit(".", 1)[-1]
    if name not in SMOKE_BACKBONES:
        raise KeyError(f"no smoke-sized {name} in benchmarks.common.SMOKE_BACKBONES: add one")
    args = [item for key, value in SMOKE_BACKBONES[name].items()
            for item in (f"--model.backbone.init_args.{key}", json.dumps(value))]
    return [*args, "--model.compile_mode", "null", "--model.compile_sampling", "false",
            "--trainer.precision", "32-true", "--trainer.accelerator", "cpu"]


def set_overrides(items: list[str]) -> list[str]:
    """``--set KEY=VALUE ...`` (the convergence tools' config overrides) as the CLI's ``--KEY VALUE`` arguments."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: write KEY=VALUE, e.g. ema.init_args.decay=0.999")
        out += [f"--{key}", value]
    return out
