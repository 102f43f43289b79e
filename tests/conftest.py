"""Fixtures shared by the test files; pytest loads this module itself.

Plain helper functions that tests import by name (fake data sets, float64 tolerances) are in
``_fixtures.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

# The test models are tiny: one thread per process is as fast as two, and it keeps the suite's
# subprocesses (CLI runs, DDP ranks, benchmark smokes) from oversubscribing the CI machine's two
# cores, where OpenMP's spinning threads make a step of a tiny model many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def have_fashion_mnist() -> bool:
    """The four Fashion-MNIST files are installed (apt-get install dataset-fashion-mnist), gzipped or not."""
    return all((FASHION_ROOT / f).is_file() or (FASHION_ROOT / (f + ".gz")).is_file() for f in FASHION_FILES)


@pytest.fixture
def cpu_trainer() -> Callable[..., pl.Trainer]:
    """A factory of quiet CPU Trainers for unit tests: no logger, checkpoints, progress bar or model
    summary, 60 steps; keyword arguments override or add Trainer arguments (``max_steps``, ``callbacks``)."""

    def make(**overrides: Any) -> pl.Trainer:
        options: dict[str, Any] = {
            "accelerator": "cpu", "devices": 1, "max_steps": 60, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False,
        }  # fmt: skip
        return pl.Trainer(**{**options, **overrides})

    return make


@pytest.fixture
def blob_loader() -> Callable[..., DataLoader]:
    """A factory of DataLoaders of ``(image, label)`` pairs: a smooth blob per image plus a little noise
    (structured data that a small net learns to denoise) and labels in {0, 1, 2}; seeded, so repeatable."""

    def make(n: int = 512, shape: tuple[int, ...] = (1, 8, 8), batch_size: int = 64, shuffle: bool = True) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        base = torch.linspace(-1, 1, shape[-1])
        blob = (base[None, :] ** 2 + base[:, None] ** 2).neg().exp() * 2 - 1
        x = blob.expand(n, *shape).clone() + 0.05 * torch.randn(n, *shape, generator=g)
        y = torch.randint(0, 3, (n,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)

    return make


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the CLI inside tmp_path: no network, FID statistics cached in tmp_path, no stray argv."""
    from lightning_speed.metrics import features as features_module
    from lightning_speed.metrics import reference as reference_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-speed"])  # main(args=...) must not see pytest's arguments
    monkeypatch.setattr(reference_module, "DEFAULT_CACHE_DIR", tmp_path / "fid-cache")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no Inception file from a real cache

    def offline(url: str, dst: Path, timeout: float) -> None:
        raise OSError("network disabled in the test suite")

    monkeypatch.setattr(features_module, "_download", offline)
    return tmp_path
