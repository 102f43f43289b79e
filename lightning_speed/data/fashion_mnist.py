"""Fashion-MNIST from its four IDX files (60k train / 10k test, 28x28 grey, 10 classes).

Where the files come from, in order: an explicit ``root``; the Debian/Ubuntu package folder
``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``); a
torchvision download when ``download=True``. Both ``.gz`` and uncompressed names work, in
the folder itself or torchvision's ``<folder>/FashionMNIST/raw`` layout. Images are padded
28 -> 32 with black (so they suit UNets that halve the size several times) and scaled to
[-1, 1]; training images are flipped left-right at random.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lightning_speed.validation import check_int
from .base import UInt8ImageDataModule
from .idx import read_idx

SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")
SUBSET_SEED = 0
"""Seeds the choice of ``train_subset`` images: the same subset for every run and run seed."""
DEFAULT_DOWNLOAD_ROOT = Path(os.path.expanduser("~/.cache/lightning_speed/fashion-mnist"))

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# split -> (images stem, labels stem); each may end in .gz or not.
FILE_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_ALL_STEMS = [stem for pair in FILE_STEMS.values() for stem in pair]

_FIXES = (
    "Fixes: `apt-get install -y dataset-fashion-mnist` (installs them in "
    f"{SYSTEM_ROOT}), or set download: true (FashionMNISTDataModule(download=True), "
    "--data.download true) to fetch them with torchvision, or point root at the folder "
    "holding the four IDX files."
)


def find_idx_files(folder: str | os.PathLike[str]) -> tuple[dict[str, Path], list[str]]:
    """Locate the four Fashion-MNIST IDX files in ``folder`` or ``folder/FashionMNIST/raw``.

    Returns ``(found stem -> path, missing stems)``; uncompressed files win over ``.gz``.
    """
    folder = Path(folder)
    found: dict[str, Path] = {}
    for base in (folder, folder / "FashionMNIST" / "raw"):
        for stem in _ALL_STEMS:
            if stem in found:
                continue
            for name in (stem, stem + ".gz"):
                if (base / name).is_file():
                    found[stem] = base / name
                    break
    return found, [s for s in _ALL_STEMS if s not in found]


def validate_pair(images: np.ndarray, labels: np.ndarray, sources: tuple[Path, Path], num_classes: int) -> None:
    """Check that IDX images (N, H, W) and labels (N,) belong together; ValueError naming the files."""
    img_path, lab_path = sources
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"{img_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}.")
    if labels.ndim != 1:
        raise ValueError(f"{lab_path}: expected labels (N,), got shape {labels.shape}.")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} labels: "
            "the files do not belong together. Re-download them."
        )
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{lab_path}: labels outside [0, {num_classes}). Re-download the file.")


class FashionMNISTBase(UInt8ImageDataModule):
    """What every Fashion-MNIST source shares: 1 channel, 10 classes, padding to ``pad_to``."""

    num_classes = 10
    class_names = CLASS_NAMES

    def __init__(self, *, pad_to: int, **loader_options: Any) -> None:
        """``loader_options``: the other keyword arguments of ``UInt8ImageDataModule``."""
        if pad_to < 28:
            raise ValueError(f"pad_to={pad_to} is smaller than Fashion-MNIST's 28x28; use pad_to >= 28.")
        super().__init__(pad_to=pad_to, **loader_options)
        self.image_shape = (1, pad_to, pad_to)


class FashionMNISTDataModule(FashionMNISTBase):
    """The full Fashion-MNIST (60k train; val = first ``val_images`` of the 10k test set).

    Args:
        root: folder holding the IDX files; None searches the apt package folder, then the
            download cache (``download=True`` fills it).
        batch_size: images per batch (per device under DDP).
        num_workers: DataLoader workers (``on_device=False`` only).
        random_flip: random left-right flips of training images.
        pad_to: side length after zero (black) padding; 28 means no padding.
        val_images: validation images, taken from the start of the test set.
        on_device: keep the train set on the GPU and batch there (fastest; ~60 MB).
        download: fetch the files with torchvision when they are not found.
        seed: seeds the shuffling order (and the on-device flips).
        train_subset: train on this many training images only, a fixed random subset (``SUBSET_SEED``,
            numpy's legacy RandomState, whose stream never changes); e.g. 1336, MetFaces' size, the SpeeD
            paper's small-data regime. Validation and FID references still come from the test split.
    """

    name = "fashion_mnist"

    # Arguments spelled out and forwarded one by one (not **kwargs): jsonargparse reads this signature.
    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        random_flip: bool = True,
        pad_to: int = 32,
        val_images: int = 1000,
        on_device: bool = False,
        download: bool = False,
        seed: int = 0,
        train_subset: int | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            random_flip=random_flip,
            pad_to=pad_to,
            val_images=val_images,
            on_device=on_device,
            seed=seed,
        )
        self.save_hyperparameters()
        self.root = root
        self.download = download
        self.train_subset = None if train_subset is None else check_int(
            train_subset, "train_subset", minimum=1, hint="the number of training images to keep, or null for all"
        )
        self._files: dict[str, Path] | None = None

    # ---------------------------------------------------------------- locating
    def _download_into(self, folder: Path) -> None:
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(root=str(folder), train=train, download=True)
        except Exception as err:  # network, disk, checksum: all end the same way for the user
            raise RuntimeError(
                f"Downloading Fashion-MNIST into {folder} failed: {err}. "
                "Check the network, or install the files instead: `apt-get install -y dataset-fashion-mnist`."
            ) from err

    def _locate(self, download: bool) -> dict[str, Path]:
        """Resolve the IDX files (downloading if allowed); FileNotFoundError with the fixes if absent."""
        if self._files is not None:
            return self._files
        if self.root is not None:
            folder = Path(self.root).expanduser()
            found, missing = find_idx_files(folder)
            if missing and download:
                self._download_into(folder)
                found, missing = find_idx_files(folder)
            if missing:
                raise FileNotFoundError(
                    f"Fashion-MNIST files missing in root={str(folder)!r} (searched {folder} and "
                    f"{folder / 'FashionMNIST' / 'raw'}): {', '.join(m + '[.gz]' for m in missing)}. {_FIXES}"
                )
        else:
            searched = []
            for folder in (SYSTEM_ROOT, DEFAULT_DOWNLOAD_ROOT):
                found, missing = find_idx_files(folder)
                searched.append(str(folder))
                if not missing:
                    break
            else:
                if not download:
                    raise FileNotFoundError(
                        "Fashion-MNIST not found: no root given and the four IDX files "
                        f"({', '.join(s + '[.gz]' for s in _ALL_STEMS)}) are not in {' or '.join(searched)}. "
                        f"{_FIXES}"
                    )
                self._download_into(DEFAULT_DOWNLOAD_ROOT)
                found, missing = find_idx_files(DEFAULT_DOWNLOAD_ROOT)
                if missing:
                    raise FileNotFoundError(
                        f"Fashion-MNIST download into {DEFAULT_DOWNLOAD_ROOT} left files missing: {missing}. {_FIXES}"
                    )
        self._files = found
        return found

    def reference_key(self, split: str = "test", max_images: int | None = None) -> str:
        """The base's key; a training subset's also names its size and seed: it holds other images than the first
        ones, and the first ``max_images`` of two subsets of other sizes are other images too."""
        key = super().reference_key(split, max_images)
        if split != "train" or self.train_subset is None:
            return key
        return f"{key}-subset{self.train_subset}-seed{SUBSET_SEED}"

    @property
    def files(self) -> dict[str, Path]:
        """The IDX files in use (stem -> path); resolves them without downloading."""
        return self._locate(download=False)

    def _load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        img_stem, lab_stem = FILE_STEMS[split]
        files = self.files
        images, labels = read_idx(files[img_stem]), read_idx(files[lab_stem])
        validate_pair(images, labels, (files[img_stem], files[lab_stem]), self.num_classes)
        if split == "train" and self.train_subset is not None:
            if self.train_subset > len(images):
                raise ValueError(
                    f"train_subset={self.train_subset} but {files[img_stem]} holds {len(images)} training images: "
                    f"use train_subset <= {len(images)}, or null for all."
                )
            keep = np.sort(np.random.RandomState(SUBSET_SEED).permutation(len(images))[: self.train_subset])
            images, labels = images[keep], labels[keep]
        return images[:, None], labels.astype(np.int64)
