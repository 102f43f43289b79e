"""Test helpers shared by several test files (imported as ``from _fixtures import ...``)."""

from __future__ import annotations

import pickle
from pathlib import Path

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
