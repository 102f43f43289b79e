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
