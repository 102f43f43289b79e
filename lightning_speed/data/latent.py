"""Latent diffusion data: an image data module encoded once by an autoencoder, cached on disk.

``LatentDataModule(images=<an image data module>, autoencoder=<folder or hub name>)`` encodes the
training images once (without gradients, on the GPU when there is one, with a progress bar) and
caches the autoencoder's posterior, mean and standard deviation, as a memory-mapped ``.npy`` (float16
by default). The images stream through the image module's ``iter_split``: an image folder is decoded
``encode_batch_size`` images at a time and never held whole in host memory.

Each training step draws ``z = (mean + std * eps - shift_factor) * scaling_factor`` with fresh ``eps``: the
same draw as the official SpeeD/DiT code's ``vae.encode(x).latent_dist.sample().mul_(0.18215)`` (whose
autoencoder has no shift), which encodes every batch again at every step.

Horizontal flips survive the cache: with ``random_flip`` each image is encoded twice, as it is and
flipped (twice the encoding time and twice the disk), and every draw picks one of the two at random.

The cache folder holds ``meta.json`` and the files it names. ``meta.json`` records what the latents
depend on: the autoencoder (its config and a hash of its weights), the data set (its name, image
shape, count and, for an image folder, a hash of its files' names and bytes and of the decoding rules,
so that an image replaced by another of the same name and size counts as a change), the flip, the
dtype and the encoding precision. Without ``cache_dir`` the folder is
``~/.cache/lightning_speed/latents/<data set>/<hash of the record>``: one per record, so that runs with
another autoencoder, flip or dtype keep their own caches. A cache whose record differs is rebuilt,
never mixed: the new files are written under new names and ``meta.json`` is replaced atomically
(``os.replace``) only after the encoding finished, so an encoding that fails midway leaves the
existing cache as it was. A second run with the same settings reads the cache and never calls the
encoder.

Training batches are ``(latents (B, C, h, w) float32, labels)``: on the GPU when the cache fits
(``LatentBatchLoader``, no per-batch host work), else a ``DataLoader`` over the memory map.
FID's real images come from the wrapped image module (``reference_batches`` / ``reference_key``),
and the ``autoencoder`` attribute is what ``DiffusionModule.decode`` turns samples into images with.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lightning_speed.autoencoders import Autoencoder
from lightning_speed.distributed import rank_seed
from lightning_speed.validation import check_bool, check_choice, check_folder, check_int

from .base import (
    DeviceBatchLoader, HostTrainLoader, ResumeShapeMixin, UInt8ImageDataModule, check_attached_model, check_batch_fits,
    check_seed, to_unit_range,
)

CACHE_FORMAT = 1
DEFAULT_CACHE_ROOT = Path("~/.cache/lightning_speed/latents")
CacheDtype = Literal["float16", "float32"]
EncodePrecision = Literal["fp32", "bf16"]
DEVICE_SHARE = 0.5  # "auto" keeps the cache on the GPU when it takes at most this share of the free memory


# ----------------------------------------------------------------------------- drawing latents
def draw_latents(posterior: Tensor, scaling_factor: float, generator: torch.Generator | None, flip: bool,
                 shift_factor: float = 0.0) -> Tensor:
    """``(B, F, 2, C, h, w)`` cached (mean, std) of F variants -> scaled latents (B, C, h, w) float32.

    With ``flip`` (and F = 2) each sample takes the flipped image's posterior with probability 1/2;
    then ``(mean + std * eps - shift_factor) * scaling_factor``: a ``latent_dist.sample()`` shifted and scaled
    as diffusers does. No host sync.
    """
    if flip and posterior.shape[1] > 1:
        pick = torch.randint(0, posterior.shape[1], (posterior.shape[0],), device=posterior.device, generator=generator)
        chosen = posterior[torch.arange(posterior.shape[0], device=posterior.device), pick]
    else:
        chosen = posterior[:, 0]
    mean, std = chosen.float().unbind(1)
    eps = torch.randn(mean.shape, device=mean.device, generator=generator)
    return (mean + std * eps).sub_(shift_factor).mul_(scaling_factor)


class LatentBatchLoader(DeviceBatchLoader):
    """``DeviceBatchLoader`` over the cached posterior on the device: each batch draws fresh latents."""

    def __init__(self, posterior: Tensor, labels: Tensor, batch_size: int, scaling_factor: float, random_flip: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shift_factor: float = 0.0) -> None:
        self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor)
        super().__init__(posterior, labels, batch_size, random_flip, seed, rank, world_size)

    def _check_data(self, images: Tensor) -> None:
        if not images.is_floating_point() or images.dim() != 6 or images.shape[2] != 2:
            raise ValueError(f"LatentBatchLoader expects a (N, F, 2, C, h, w) float posterior, got {images.dtype} "
                             f"{tuple(images.shape)}.")

    def _batch(self, index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        latents = draw_latents(self.images[index], self.scaling_factor, generator, self.random_flip, self.shift_factor)
        return latents, self.labels[index]


class _MemmapPosterior(Dataset):
    """Rows of the cached posterior read from the memory map; opened lazily, so workers open their own."""

    def __init__(self, path: Path, labels: np.ndarray) -> None:
        self.path, self.labels = path, labels
        self._array: np.ndarray | None = None

    def _rows(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        order = np.asarray(indices)
        return torch.from_numpy(np.ascontiguousarray(self._rows()[order])), torch.from_numpy(self.labels[order])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        posterior, labels = self.__getitems__([i])
        return posterior[0], labels[0]


class _DrawCollate:
    def __init__(self, scaling_factor: float, random_flip: bool, shift_factor: float = 0.0) -> None:
        self.scaling_factor, self.random_flip, self.shift_factor = scaling_factor, random_flip, shift_factor

    def __call__(self, batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, list):  # per-sample fetch
            posterior, labels = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        else:
            posterior, labels = batch
        return draw_latents(posterior, self.scaling_factor, None, self.random_flip, self.shift_factor), labels.long()


# ----------------------------------------------------------------------------- the cache on disk
def _raw_meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def npy_damage(path: Path) -> str | None:
    """Why the ``.npy`` file at ``path`` cannot be read whole (a cut-off copy or write, a broken header), or None."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                return None  # a newer format: left to numpy
            shape, _, dtype = readers[version](f)
            expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    except (OSError, ValueError) as err:
        return f"its header cannot be read ({err})"
    return None if size >= expected else f"it holds {size:,} of the {expected:,} bytes its header announces"


def read_meta(folder: Path, warn: bool = False) -> dict[str, Any] | None:
    """The cache's ``meta.json``, or None when absent, unreadable or naming files that are missing or cut off (then
    it is rebuilt; ``warn``: say which file is damaged)."""
    meta = _raw_meta(folder)
    files = (meta or {}).get("files", {})
    if meta is None or not all(isinstance(files.get(k), str) and (folder / files[k]).is_file() for k in ("posterior", "labels")):
        return None
    for key in ("posterior", "labels"):
        damage = npy_damage(folder / files[key])
        if damage is not None:
            if warn:
                rank_zero_warn(f"LatentDataModule: the cached {folder / files[key]} looks cut off or corrupt ({damage}): "
                               "encoding the images again.")
            return None
    return meta


# A build's temporary files end in ".<pid>@<host>.partial", so that a later build can tell a killed one's leftovers.
_PARTIAL_OWNER = re.compile(r"\.(\d+)@(.+)\.partial$")


def _partial_suffix() -> str:
    return f".{os.getpid()}@{socket.gethostname()}.partial"


def _remove_dead_builds(folder: Path) -> list[Path]:
    """Remove the temporary files of builds that were killed on this host (SIGKILL skips every cleanup).

    A file whose process is still alive, or that another host wrote (a shared filesystem), is left alone."""
    removed = []
    for path in folder.glob("*.partial"):
        owner = _PARTIAL_OWNER.search(path.name)
        if owner is None or owner[2] != socket.gethostname() or _alive(int(owner[1])):
            continue
        _unlink_quietly(path)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _unlink_quietly(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


class LatentDataModule(ResumeShapeMixin, L.LightningDataModule):
    """An image data module's training images as cached autoencoder latents; see the module docstring.

    Args:
        images: the image data module (e.g. ``ImageFolderDataModule``, ``CIFAR10DataModule``); its
            training split is encoded (its own ``random_flip`` and ``batch_size`` are not used) and its
            reference images serve FID.
        autoencoder: a folder holding ``config.json`` and ``diffusion_pytorch_model.safetensors``, a
            Hugging Face hub name (``stabilityai/sd-vae-ft-ema``), or an ``Autoencoder`` / ``AutoencoderKL``.
        subfolder: the autoencoder's subfolder inside the folder or hub repository (e.g. ``vae``).
        scaling_factor: latent scale (None: the autoencoder config's, 0.18215 for sd-vae-ft-ema).
        cache_dir: the cache folder (None: ``~/.cache/lightning_speed/latents/<data set>/<hash of the record>``, one per
            ``cache_record``).
        batch_size: latents per training batch (per device under DDP).
        random_flip: encode each image and its mirror image and train on either at random.
        cache_dtype: storage of the cached mean and std (float16 halves the disk and memory).
        encode_precision: ``fp32`` (as the official code encodes) or ``bf16`` autocast (faster).
        encode_batch_size: images per encoder call (and per decoding batch of an image folder).
        on_device: keep the cache on the training GPU (``auto``: when it takes at most half its free memory).
        num_workers: DataLoader workers when the cache stays on the host.
        seed: seeds the order of batches and the draws.
    """

    def __init__(
        self,
        images: UInt8ImageDataModule,
        autoencoder: str | Autoencoder,
        subfolder: str | None = None,
        scaling_factor: float | None = None,
        cache_dir: str | None = None,
        batch_size: int = 256,
        random_flip: bool = True,
        cache_dtype: CacheDtype = "float16",
        encode_precision: EncodePrecision = "fp32",
        encode_batch_size: int = 64,
        on_device: bool | Literal["auto"] = "auto",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(images, UInt8ImageDataModule):
            raise TypeError(
                f"LatentDataModule encodes a lightning_speed image data module (ImageFolderDataModule, CIFAR10DataModule, "
                f"...); got {type(images).__name__}."
            )
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        encode_batch_size = check_int(encode_batch_size, "encode_batch_size", minimum=1)
        num_workers = check_int(num_workers, "num_workers", minimum=0, hint="0 reads the cache in the main process")
        cache_dtype = check_choice(cache_dtype, "cache_dtype", get_args(CacheDtype))
        encode_precision = check_choice(encode_precision, "encode_precision", get_args(EncodePrecision))
        seed = check_seed(seed)
        if on_device not in (True, False, "auto"):
            raise ValueError(f"on_device must be true, false or 'auto', got {on_device!r}.")
        self.images = images
        # Loaded here, so that a missing folder or weights file fails when the configuration is read.
        self.autoencoder = Autoencoder.load(autoencoder, subfolder=subfolder, scaling_factor=scaling_factor)
        # Checked before any image is decoded or encoded: the autoencoder must take these images.
        self.image_shape = self.autoencoder.latent_shape(images.image_shape)
        self.decoded_shape = tuple(images.image_shape)
        self.name = f"{images.name}-latents"
        self.cache_dir = check_folder(cache_dir, "LatentDataModule.cache_dir")
        self.batch_size, self.random_flip, self.seed = batch_size, check_bool(random_flip, "random_flip"), seed
        self.cache_dtype, self.encode_precision = cache_dtype, encode_precision
        self.encode_batch_size, self.on_device, self.num_workers = encode_batch_size, on_device, num_workers
        self.encoder_calls = 0  # batches encoded by this object (a cache hit leaves it at 0)
        self._posterior: tuple[Path, np.ndarray] | None = None  # (posterior file, labels) once set up
        self._device_train: LatentBatchLoader | None = None

    @property
    def num_classes(self) -> int:
        return int(self.images.num_classes)

    # ------------------------------------------------------------------ what the cache depends on
    def _dataset_key(self) -> str:
        return str(self.images.reference_key("train"))

    def cache_folder(self) -> Path:
        """``cache_dir``, else a folder of the data set's with a subfolder per ``cache_record``: settings that need
        other latents get another folder, so that alternating runs reuse their caches instead of rebuilding them."""
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self._dataset_key())
        record = json.dumps(self.cache_record(), sort_keys=True, default=str)
        return DEFAULT_CACHE_ROOT.expanduser() / safe / hashlib.blake2b(record.encode(), digest_size=6).hexdigest()

    def cache_record(self) -> dict[str, Any]:
        """Everything the cached latents depend on; a cache with another record is rebuilt."""
        return {
            "format": CACHE_FORMAT,
            "autoencoder": {"fingerprint": self.autoencoder.fingerprint, "scaling_factor": self.autoencoder.scaling_factor,
                            "config": self.autoencoder.config},
            "dataset": {"key": self._dataset_key(), "count": self.images.split_size("train"),
                        "image_shape": list(self.images.image_shape)},
            "latent_shape": list(self.image_shape),
            "flip": self.random_flip,
            "dtype": self.cache_dtype,
            "encode_precision": self.encode_precision,
        }

    def cache_matches(self) -> bool:
        meta = read_meta(self.cache_folder(), warn=True)
        return meta is not None and json.loads(json.dumps(meta.get("record"))) == json.loads(json.dumps(self.cache_record()))

    # ------------------------------------------------------------------ building
    def _encode_device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def build_cache(self) -> Path:
        """Encode the training images into a new cache and make it the current one (atomic); returns the folder."""
        folder = self.cache_folder()
        folder.mkdir(parents=True, exist_ok=True)
        record = self.cache_record()
        self.images.prepare_data()  # finds (or, when allowed, downloads) the files; decodes nothing
        n, variants = self.images.split_size("train"), 2 if self.random_flip else 1
        build = uuid.uuid4().hex[:10]
        posterior_name, labels_name = f"posterior-{build}.npy", f"labels-{build}.npy"
        suffix = _partial_suffix()
        partial = [folder / f"{posterior_name}{suffix}", folder / f"{labels_name}{suffix}", folder / f"meta-{build}.json{suffix}"]
        if removed := _remove_dead_builds(folder):
            rank_zero_info(f"LatentDataModule: removed {len(removed)} file(s) of an encoding killed earlier in {folder}")
        device = self._encode_device()
        self.autoencoder.to(device)
        old = _raw_meta(folder)  # its files go once the new cache is in place, damaged or not
        rank_zero_info(
            f"LatentDataModule: encoding {n:,} images{' and their mirror images' if variants == 2 else ''} with "
            f"{self.autoencoder.name} on {device} into {folder}"
        )
        try:
            array = np.lib.format.open_memmap(
                partial[0], mode="w+", dtype=np.dtype(self.cache_dtype), shape=(n, variants, 2, *self.image_shape)
            )
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.encode_precision == "bf16")
            labels = np.empty(n, dtype=np.int64)
            bar = tqdm(total=n * variants, desc="encoding latents", unit="img", dynamic_ncols=True)
            start = 0  # streamed: the image module decodes (a folder: reads) one batch at a time
            for images, batch_labels in self.images.iter_split("train", self.encode_batch_size):
                x = to_unit_range(images.to(device))
                labels[start : start + x.shape[0]] = batch_labels.numpy()
                for variant in range(variants):
                    with autocast:
                        mean, std = self.autoencoder.encode(x.flip(-1) if variant else x)
                    self.encoder_calls += 1
                    part = torch.stack([mean, std], dim=1)
                    if not bool(torch.isfinite(part).all()):
                        raise FloatingPointError(
                            f"The autoencoder returned NaN or inf for images {start}..{start + x.shape[0] - 1}: check its "
                            "weights (and use encode_precision: fp32)."
                        )
                    array[start : start + x.shape[0], variant] = part.cpu().numpy().astype(array.dtype)
                    bar.update(x.shape[0])
                start += x.shape[0]
            bar.close()
            if start != n:  # the rows past `start` would be saved as whatever the new file held
                raise RuntimeError(
                    f"{type(self.images).__name__}.iter_split('train') yielded {start} images but its "
                    f"split_size('train') is {n}: make the two agree; no cache was written."
                )
            array.flush()
            del array
            with open(partial[1], "wb") as f:
                np.save(f, labels)
            os.replace(partial[0], folder / posterior_name)
            os.replace(partial[1], folder / labels_name)
            partial[2].write_text(json.dumps({"record": record, "files": {"posterior": posterior_name, "labels": labels_name}},
                                             indent=2, default=str))
            os.replace(partial[2], folder / "meta.json")  # the commit point: readers see the old cache or the new
        except BaseException:
            _unlink_quietly(*partial, folder / posterior_name, folder / labels_name)
            raise
        replaced = (old or {}).get("files", {})
        _unlink_quietly(*(folder / Path(name).name for k in ("posterior", "labels")  # the replaced cache's files
                          if isinstance(name := replaced.get(k), str) and name not in (posterior_name, labels_name)))
        return folder

    def prepare_data(self) -> None:
        """Build the cache unless a matching one exists (on one process per node; the others wait), once the model
        has checked the data (``check_attached_model``): a wrong backbone fails before the encoding."""
        check_attached_model(self)
        self.images.prepare_data()  # the files first (downloaded if allowed): the cache's record counts the images
        self._check_batch_size(self.images.split_size("train"))
        if not self.cache_matches():
            self.build_cache()

    def setup(self, stage: str | None = None) -> None:
        if stage not in (None, "fit"):
            return
        if self.trainer is None:  # outside a Trainer nobody called prepare_data
            self.images.prepare_data()
        self._check_batch_size(self.images.split_size("train"))
        self._clear_dead_builds()  # here, not in prepare_data: setup runs after it, and alone outside a Trainer
        if not self.cache_matches():
            self.build_cache()
        folder = self.cache_folder()
        meta = read_meta(folder)
        assert meta is not None
        labels = np.load(folder / meta["files"]["labels"])
        self._posterior = (folder / meta["files"]["posterior"], labels)

    def _clear_dead_builds(self) -> None:
        """The files a killed build left in the cache folder (a posterior file as large as the cache), also when the
        cache in place matches and no new build would remove them."""
        folder = self.cache_folder()
        if folder.is_dir() and (removed := _remove_dead_builds(folder)):
            rank_zero_info(f"LatentDataModule: removed {len(removed)} file(s) of an encoding killed earlier in {folder}")

    def _check_batch_size(self, count: int) -> None:
        """Before any encoding: every process must get at least one full batch of its ``count // world`` share."""
        world = int(getattr(self.trainer, "world_size", 1)) if self.trainer is not None else 1
        check_batch_fits(self.name, count, world, self.batch_size, padded=False)

    def teardown(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._device_train = None

    # ------------------------------------------------------------------ loaders
    def _keep_on_device(self, device: torch.device, nbytes: int) -> bool:
        if self.on_device != "auto":
            return bool(self.on_device)
        if device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(device)
        keep = nbytes <= DEVICE_SHARE * free
        # One decision for all ranks: a rank on the device loader and another on a DataLoader would shard differently.
        return keep if self.trainer is None else self.trainer.strategy.reduce_boolean_decision(keep, all=True)

    def train_dataloader(self) -> DataLoader | LatentBatchLoader:
        if self._posterior is None:
            self.setup("fit")
        assert self._posterior is not None
        path, labels = self._posterior
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        rank, world = (int(trainer.global_rank), int(trainer.world_size)) if trainer is not None else (0, 1)
        if self._keep_on_device(device, path.stat().st_size):
            cached = self._device_train
            if cached is None or cached.device != device or (cached.rank, cached.world_size) != (rank, world):
                self._device_train = LatentBatchLoader(
                    self._to_device(path, device), torch.from_numpy(labels).to(device), self.batch_size, self.autoencoder.scaling_factor,
                    self.random_flip, self.seed, rank, world, self.autoencoder.shift_factor,
                )
            else:  # batch_size may have changed since (BatchSizeFinder sets it and asks again): the same copy, rebatched
                cached.batch_size = self.batch_size
            self._say_world_size_change(self._device_train)
            return self._device_train
        # Per rank, as the image modules' host loaders: workers seeded alike would draw the same latent noise on every rank
        generator = torch.Generator().manual_seed(rank_seed(self.seed, rank))
        loader = HostTrainLoader(
            _MemmapPosterior(path, labels), batch_size=self.batch_size, shuffle=True, drop_last=True, generator=generator,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0, pin_memory=device.type == "cuda",
            collate_fn=_DrawCollate(self.autoencoder.scaling_factor, self.random_flip, self.autoencoder.shift_factor),
        )
        self._say_world_size_change(loader)
        return loader

    @staticmethod
    def _to_device(path: Path, device: torch.device, chunk: int = 8192) -> Tensor:
        """The memory-mapped posterior copied to ``device`` in chunks (no whole copy in host memory)."""
        array = np.load(path, mmap_mode="r")
        out = torch.empty(array.shape, dtype=getattr(torch, str(array.dtype)), device=device)
        for start in range(0, array.shape[0], chunk):
            out[start : start + chunk] = torch.from_numpy(np.ascontiguousarray(array[start : start + chunk])).to(device)
        return out

    # ------------------------------------------------------------------ FID's real images
    def reference_images(self, split: str = "test", max_images: int | None = None) -> Tensor:
        """The wrapped image module's reference images (uint8, what decoded samples are compared with)."""
        return self.images.reference_images(split, max_images)

    def reference_batches(self, split: str = "test", max_images: int | None = None,
                          batch_size: int = 500) -> Iterator[Tensor]:
        """The same images in batches, never all at once (what FIDCallback reads)."""
        return self.images.reference_batches(split, max_images, batch_size)

    def reference_key(self, split: str = "test", max_images: int | None = None) -> str:
        return self.images.reference_key(split, max_images)
