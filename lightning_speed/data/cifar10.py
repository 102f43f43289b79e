"""CIFAR-10 (50k train / 10k test, 32x32 RGB, 10 classes) from its python pickle batches.

Downloading goes through ``torchvision.datasets.CIFAR10``; reading is done here (a few
pickle loads), so setup skips torchvision's full-archive checksum on every run and a bad
or missing file gets an error that names it and says how to fix it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .base import UInt8ImageDataModule

BATCH_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_BY_HAND = ("point root at the folder holding cifar-10-batches-py/ (extracted from "
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz)")
_FIXES = f"Fixes: set download: true (CIFAR10DataModule(download=True), --data.download true), or {_BY_HAND}."


def _get(d: dict[Any, Any], key: str) -> Any:
    return d[key] if key in d else d[key.encode()]


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR batch -> (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(_get(batch, "data"), dtype=np.uint8)
        labels = np.asarray(_get(batch, "labels"), dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path}: not a readable CIFAR-10 batch ({type(err).__name__}: {err}). "
            "Delete the folder and re-download (download: true)."
        ) from err
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: expected data (N, 3072) with N labels, got data {data.shape} and {labels.shape[0]} labels. "
            "Re-download the dataset."
        )
    return data.reshape(-1, 3, 32, 32), labels


class CIFAR10DataModule(UInt8ImageDataModule):
    """CIFAR-10 at 32x32, scaled to [-1, 1], random flips for training; val = first test images.

    Args:
        root: folder holding ``cifar-10-batches-py/`` (or the batch files themselves).
        batch_size: images per batch (per device under DDP).
        num_workers: DataLoader workers (``on_device=False`` only).
        random_flip: random left-right flips of training images.
        download: fetch the dataset with torchvision into ``root`` when it is missing.
        val_images: validation images, taken from the start of the test set.
        on_device: keep the train set (150 MB uint8) on the GPU and batch there.
        seed: seeds the shuffling order (and the on-device flips).
    """

    name = "cifar10"
    num_classes = 10
    class_names = CLASS_NAMES

    # Arguments spelled out and forwarded one by one (not **kwargs): jsonargparse reads this signature.
    def __init__(
        self,
        root: str = "data/cifar10",
        batch_size: int = 128,
        num_workers: int = 4,
        random_flip: bool = True,
        download: bool = False,
        val_images: int = 1000,
        on_device: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            random_flip=random_flip,
            pad_to=None,
            val_images=val_images,
            on_device=on_device,
            seed=seed,
        )
        self.save_hyperparameters()
        self.root = root
        self.download = download
        self.image_shape = (3, 32, 32)

    def _batch_folder(self) -> tuple[Path, list[str]]:
        """The folder with the batches (root/cifar-10-batches-py or root) and the files it lacks."""
        root = Path(self.root).expanduser()
        wanted = [*TRAIN_FILES, *TEST_FILES]
        best: tuple[Path, list[str]] | None = None
        for folder in (root / BATCH_DIR, root):
            missing = [f for f in wanted if not (folder / f).is_file()]
            if best is None or len(missing) < len(best[1]):
                best = (folder, missing)
        assert best is not None
        return best

    def _locate(self, download: bool) -> Path:
        folder, missing = self._batch_folder()
        if missing and download:
            try:
                from torchvision.datasets import CIFAR10

                CIFAR10(root=str(Path(self.root).expanduser()), train=True, download=True)
            except Exception as err:
                # download is already on: the fix is the network, or the files placed by hand
                raise RuntimeError(f"Downloading CIFAR-10 into {self.root} failed: {err}. Check the network, or "
                                   f"{_BY_HAND}.") from err
            folder, missing = self._batch_folder()
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 not found under root={self.root!r} (searched {Path(self.root) / BATCH_DIR} and "
                f"{self.root}): missing {', '.join(missing)}. {_FIXES}"
            )
        return folder

    def _load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        folder = self._locate(download=False)
        parts = [read_cifar_batch(folder / f) for f in (TRAIN_FILES if split == "train" else TEST_FILES)]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"CIFAR-10 {split} labels in {folder} fall outside [0, 10). Re-download the dataset.")
        return images, labels
