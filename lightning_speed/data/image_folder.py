"""Your own images: any folder of png/jpg/... files (searched recursively, through linked
folders too), as a datamodule.

Images are turned upright by their EXIF orientation (phone photos taken in portrait), converted to
``channels`` (1 = grey, 3 = RGB), resized so the short side is ``image_size`` and centre-cropped to a
square. If every image sits in a top-level subfolder, those subfolders are the classes (sorted by
name); otherwise every label is 0. A seeded ``val_fraction`` of the images is held out as the "test"
split, which is also validation.

Training on pixels keeps a split in memory as uint8 (decoded once at setup, in parallel with
``num_workers``). A single pass over a split (``iter_split``, ``reference_batches``: latent encoding,
FID's real statistics) decodes a batch at a time and never holds the whole folder.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_speed.validation import check_int
from .base import SPLITS, UInt8ImageDataModule

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DECODE_BATCH = 64  # files per decoding batch when a whole split is loaded
FINGERPRINT_BATCH = 64  # files hashed per thread-pool task
# The version of the decoding rules (2: EXIF orientation applied), part of the folder fingerprint: FID statistics and
# latent caches of images decoded by other rules get other keys and are rebuilt.
DECODING = 2


def _file_digests(paths: list[Path]) -> list[str]:
    return [hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest() for path in paths]


def _walk_files(folder: Path) -> Iterator[Path]:
    """Every file under ``folder``, hidden files and folders (names starting with ".") left out. Linked folders are
    followed (class folders are often links to where the images live), except a link back to a folder above it."""
    chains = {str(folder): (os.path.realpath(folder),)}  # the real paths from folder down to each folder walked
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        chain = chains.pop(dirpath)
        kept = []
        for name in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, name))
            if not name.startswith(".") and real not in chain:
                chains[os.path.join(dirpath, name)] = (*chain, real)
                kept.append(name)
        dirnames[:] = kept
        yield from (Path(dirpath, name) for name in filenames if not name.startswith("."))


def scan_image_folder(root: str | os.PathLike[str]) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """All image files under ``root`` (sorted) with labels and class names; errors if none."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Image folder {str(folder)!r} does not exist (or is not a folder). Point root at a folder of "
            f"images ({', '.join(IMAGE_EXTENSIONS)}); put them in subfolders to give them class labels."
        )
    paths = sorted(p for p in _walk_files(folder) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise FileNotFoundError(
            f"No images found under {str(folder)!r} (looked recursively for {', '.join(IMAGE_EXTENSIONS)}). "
            "Point root at the folder that holds your images."
        )
    rel = [p.relative_to(folder) for p in paths]
    if all(len(r.parts) > 1 for r in rel):
        class_names = tuple(sorted({r.parts[0] for r in rel}))
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index[r.parts[0]] for r in rel], dtype=np.int64)
    else:
        class_names = ("images",)
        labels = np.zeros(len(paths), dtype=np.int64)
        loose = [r for r in rel if len(r.parts) == 1]
        if len(loose) < len(rel):  # subfolders that would be classes, but for the loose files beside them
            warnings.warn(
                f"{folder}: {len(loose)} image(s) sit directly in it (e.g. {loose[0]}) beside {len(rel) - len(loose)} "
                "in subfolders, so the subfolders are not classes and every label is 0. To label the images by "
                "subfolder, move the loose ones into a subfolder (or out of the folder).",
                UserWarning, stacklevel=2,
            )
    return paths, labels, class_names


def grey_to_8_bits(img: Image.Image, path: Path) -> Image.Image:
    """A grey image of more than 8 bits (Pillow modes "I;16*", "I", "F") scaled from its sample range to 8-bit "L",
    where Pillow's ``convert`` would clip every value above 255; other modes pass through. The ranges:

    * "I;16*": 16-bit unsigned, [0, 65535];
    * "I" (Pillow's int32): what the file declares: a TIFF's bits per sample and sign, [0, 2**bits - 1] unsigned or
      [0, 2**(bits - 1) - 1] signed; another file's "I" is a 16-bit grey PNG (as older Pillow opens those), [0, 65535];
    * "F": floats in [0, 1].

    Values outside the range (negative ones included) have no defined grey level and are refused."""
    from PIL import Image

    if img.mode != "F" and not img.mode.startswith("I"):
        return img
    values = np.asarray(img)
    if img.mode == "F":
        top = 1.0
    else:
        bits, signed, tags = 16, False, getattr(img, "tag_v2", None)
        if img.mode == "I" and tags is not None:
            bits, signed = int(tags.get(258, (32,))[0]), tags.get(339, (1,))[0] == 2  # BitsPerSample, SampleFormat
            if bits == 32 and not signed:
                values = values.view(np.uint32)  # Pillow keeps unsigned 32-bit samples in int32
        top = 2 ** (bits - signed) - 1
    low, high = values.min(), values.max()
    if not (low >= 0 and high <= top):  # also refuses NaN
        raise ValueError(
            f"{path}: a mode {img.mode} image with values in [{low}, {high}], outside its range [0, {top}]. Save it "
            "as 8- or 16-bit unsigned integers, or as floats in [0, 1]."
        )
    return Image.fromarray(np.round(values.astype(np.float64) * (255 / top)).astype(np.uint8))


def load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """Decode, turn upright by the EXIF orientation, convert (more than 8 bits of grey scaled to 8:
    ``grey_to_8_bits``), resize the short side to ``image_size`` and centre-crop: uint8 (C, S, S)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            ImageOps.exif_transpose(img, in_place=True)  # in place: keeps the TIFF tags grey_to_8_bits reads
            img = grey_to_8_bits(img, path)
            img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA", "RGBA") else img
            img = img.convert("RGB") if img.mode == "LAB" and channels == 1 else img  # Pillow has no Lab -> grey
            img = img.convert("L" if channels == 1 else "RGB")
            w, h = img.size
            scale = image_size / min(w, h)
            nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - image_size) // 2, (nh - image_size) // 2
            img = img.crop((left, top, left + image_size, top + image_size))
            array = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays
    except Image.DecompressionBombError as err:  # not an OSError: its message would not name the file
        raise ValueError(f"{path}: {err} Resize the image, or raise PIL.Image.MAX_IMAGE_PIXELS if the file is "
                         "trusted.") from err
    except OSError as err:
        raise ValueError(f"{path}: cannot decode image ({err}). Fix or delete the file.") from err
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


class _DecodeDataset(Dataset):
    """Decodes one file per index, so that DataLoader workers can share the decoding. A file that does not decode
    gives its error message instead of an image: ``iter_split`` raises it in the main process, where it reads as
    itself and not wrapped in a worker's traceback."""

    def __init__(self, paths: list[Path], image_size: int, channels: int) -> None:
        self.paths, self.image_size, self.channels = paths, image_size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor | str:
        try:
            return torch.from_numpy(load_image(self.paths[i], self.image_size, self.channels))
        except ValueError as err:
            return str(err)


def _stack_decoded(items: list[torch.Tensor | str]) -> torch.Tensor | str:
    """A batch of decoded images, or the first file's error message."""
    errors = [item for item in items if isinstance(item, str)]
    return errors[0] if errors else torch.stack(items)  # type: ignore[arg-type]


class ImageFolderDataModule(UInt8ImageDataModule):
    """A folder of images as ``(images in [-1, 1], labels)`` batches.

    Args:
        root: folder searched recursively for images; top-level subfolders become classes.
        image_size: side length after resize + centre-crop.
        channels: 1 (greyscale) or 3 (RGB).
        batch_size: images per batch (per device under DDP).
        num_workers: workers for decoding at setup and for the train DataLoader.
        random_flip: random left-right flips of training images.
        val_fraction: share of images held out (seeded) as the test / validation split.
        on_device: keep the train set on the GPU and batch there.
        seed: seeds the shuffling order, and the hold-out choice unless ``split_seed`` is set.
        split_seed: seeds the hold-out choice alone, so that runs with other ``seed`` values hold out (and measure
            FID on) the same images; None uses ``seed``.
    """

    name = "image_folder"

    # Arguments spelled out and forwarded one by one (not **kwargs): jsonargparse reads this signature.
    def __init__(
        self,
        root: str,
        image_size: int,
        channels: int = 3,
        batch_size: int = 64,
        num_workers: int = 4,
        random_flip: bool = True,
        val_fraction: float = 0.05,
        on_device: bool = False,
        seed: int = 0,
        split_seed: int | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}.")
        image_size = check_int(image_size, "image_size", minimum=1)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if split_seed is not None:
            split_seed = check_int(split_seed, "split_seed", minimum=0, hint="or null to use seed")
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            random_flip=random_flip,
            pad_to=None,
            val_images=None,
            on_device=on_device,
            seed=seed,
        )
        self.save_hyperparameters()
        self.root = root
        self.channels = channels
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.image_shape = (channels, image_size, image_size)
        self._scan: tuple[list[Path], np.ndarray, tuple[str, ...]] | None = None
        self._fingerprint: str | None = None

    def _scanned(self) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
        if self._scan is None:
            self._scan = scan_image_folder(self.root)
        return self._scan

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """Number of top-level subfolders holding images (1 when the images are not grouped)."""
        return len(self._scanned()[2])

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._scanned()[2]

    def _hold_out_seed(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed

    def split_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted (train, held-out) indices into the scanned file list, fixed by ``split_seed`` (or ``seed``)."""
        n = len(self._scanned()[0])
        n_val = int(round(n * self.val_fraction))
        if self.val_fraction > 0:
            n_val = min(max(n_val, 1), n - 1)
        perm = np.random.default_rng(self._hold_out_seed()).permutation(n)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])

    def split_size(self, split: str) -> int:
        """Counted from the file list, without decoding a single image."""
        if split not in ("train", "test"):
            return super().split_size(split)  # the base's error for an unknown split
        train, test = self.split_indices()
        return len(train if split == "train" else test)

    def _locate(self, download: bool) -> list[Path]:
        """The image files; checks the folder exists and holds images (errors before training)."""
        return self._scanned()[0]

    @override
    def iter_split(self, split: str, batch_size: int, max_images: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Decodes only ``batch_size`` files at a time (``num_workers`` processes, one batch in flight per
        worker) unless the split is already in memory: a pass over a large folder never holds it all."""
        if split in self._data or split not in SPLITS:  # decoded for pixel training, or the base's error
            yield from super().iter_split(split, batch_size, max_images)
            return
        paths, labels, _ = self._scanned()
        train, test = self.split_indices()
        index = (train if split == "train" else test)[:max_images]
        workers = min(self.num_workers, os.cpu_count() or 1)
        loader = DataLoader(
            _DecodeDataset([paths[i] for i in index], self.image_size, self.channels),
            batch_size=batch_size,
            num_workers=workers,
            prefetch_factor=1 if workers else None,
            collate_fn=_stack_decoded,
        )
        for start, images in zip(range(0, len(index), batch_size), loader):
            if isinstance(images, str):
                raise ValueError(images)
            yield images, torch.from_numpy(labels[index[start : start + batch_size]])

    def _load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole split, decoded in batches straight into one array (for training on pixels)."""
        n = self.split_size(split)
        images, labels = np.empty((n, *self.image_shape), dtype=np.uint8), np.empty(n, dtype=np.int64)
        start = 0
        for chunk, chunk_labels in self.iter_split(split, DECODE_BATCH):
            images[start : start + len(chunk)], labels[start : start + len(chunk)] = chunk.numpy(), chunk_labels.numpy()
            start += len(chunk)
        return images, labels

    def _key_extra(self) -> str:
        """Fingerprint of the folder's contents (file names and bytes), split and decoding rules (``DECODING``), so
        that a changed folder gets new FID and latent cache keys, also where an image changed at the same file size.
        Read once per data module, as the file list is scanned once."""
        if self._fingerprint is None:
            paths, _, _ = self._scanned()
            root = Path(self.root).expanduser()
            settings = f"{self.val_fraction}|{self._hold_out_seed()}|decoding {DECODING}"
            h = hashlib.blake2b(settings.encode(), digest_size=16)
            batches = [paths[i : i + FINGERPRINT_BATCH] for i in range(0, len(paths), FINGERPRINT_BATCH)]
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # reads overlap; hashlib releases the GIL
                for batch, digests in zip(batches, pool.map(_file_digests, batches)):
                    for p, digest in zip(batch, digests):  # relative names: moving the folder keeps the key
                        h.update(f"|{p.relative_to(root).as_posix()}:{digest}".encode())
            self._fingerprint = h.hexdigest()[:12]
        return self._fingerprint
