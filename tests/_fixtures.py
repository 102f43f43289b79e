"""Test helpers shared by several test files (imported as ``from _fixtures import ...``)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np


def write_fake_cifar(root: Path, per_batch: int = 4, n_test: int = 6) -> Path:
    """A tiny CIFAR-10 in the real python-pickle layout: ``root/cifar-10-batches-py/`` with five
    ``data_batch_i`` of ``per_batch`` random images, a ``test_batch`` of ``n_test`` and ``batches.meta``.

    Labels count up from 0 in every batch. Returns the batch folder.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10}, f)
    return folder


# -- tolerances derived from float64 arithmetic ---------------------------------------------------
EPS64 = float(np.finfo(np.float64).eps)


def cancellation(operands: np.ndarray, result: np.ndarray) -> float:
    """Worst-case amplification of rounding error when ``result`` is a difference of terms of size
    ``operands``: |operands| / |result|, at least 1. Two libraries that round each term to the nearest
    double may disagree by about ``EPS64 * cancellation`` relative to the result.
    """
    operands, result = np.abs(np.asarray(operands)), np.abs(np.asarray(result))
    return float(max(1.0, np.max(operands / np.maximum(result, np.finfo(np.float64).tiny))))


def float64_rtol(operations: int, amplification: float = 1.0, safety: float = 4.0) -> float:
    """Relative tolerance for comparing two float64 evaluations of the same formula.

    Each of ``operations`` roundings contributes at most one unit in the last place (EPS64 / 2, and
    two implementations both round: EPS64), amplified by any cancellation; ``safety`` covers fused
    or reordered operations (e.g. a vectorised cumprod or sqrt that is correctly rounded in one
    library and faithfully rounded in the other).
    """
    return safety * operations * amplification * EPS64


# -- tiny CPU training ----------------------------------------------------------------------------
def cpu_trainer(**overrides: Any) -> Any:
    """A quiet CPU Trainer for unit tests: no logger, checkpoints, progress bar or model summary,
    60 steps; keyword arguments override or add Trainer arguments (``max_steps``, ``callbacks``)."""
    import lightning.pytorch as pl

    options: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "max_steps": 60, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False,
    }  # fmt: skip
    return pl.Trainer(**{**options, **overrides})


def blob_loader(n: int = 512, shape: tuple[int, ...] = (1, 8, 8), batch_size: int = 64, shuffle: bool = True) -> Any:
    """A DataLoader of ``(image, label)`` pairs: a smooth blob per image plus a little noise (structured
    data that a small net learns to denoise) and labels in {0, 1, 2}; seeded, so repeatable."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    base = torch.linspace(-1, 1, shape[-1])
    blob = (base[None, :] ** 2 + base[:, None] ** 2).neg().exp() * 2 - 1
    x = blob.expand(n, *shape).clone() + 0.05 * torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


# -- latent diffusion -----------------------------------------------------------------------------
def tiny_autoencoder(seed: int = 0) -> Any:
    """A random diffusers ``AutoencoderKL`` of the real class, small enough for CPU tests: 3 -> 4 channels,
    downsampling by 2 (block_out_channels (8, 16)), scaling factor 0.18215 (the class's default)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, latent_channels=4, sample_size=32, layers_per_block=1,
    )  # fmt: skip


def write_tiny_autoencoder(folder: Path, seed: int = 0) -> Path:
    """What a user puts on disk: config.json + diffusion_pytorch_model.safetensors (``save_pretrained``)."""
    tiny_autoencoder(seed).save_pretrained(folder)
    return folder


def write_image_folder(folder: Path, n: int = 20, size: int = 32) -> Path:
    """``n`` random RGB PNGs of ``size`` x ``size`` pixels in ``folder`` (one class)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def one_conv() -> Any:
    """The smallest backbone of 1-channel images: one 3x3 convolution that ignores t and labels."""
    from torch import nn

    class OneConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x: Any, t: Any, y: Any = None) -> Any:
            return self.conv(x)

    return OneConv()
