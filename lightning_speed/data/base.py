"""Shared machinery for datamodules whose whole dataset fits in memory as uint8 images.

Subclasses only say where the arrays come from (``_load_split``); this base pads them
once, keeps them as uint8 (4x smaller than float), and serves them two ways:

* ``on_device=False``: a ``DataLoader`` whose dataset returns a whole batch per fetch (one
  tensor gather instead of ``batch_size`` ``__getitem__`` calls) and whose collate converts
  to float in [-1, 1] and flips, vectorised. Lightning's DDP sampler swap still works.
* ``on_device=True``: the train set lives on the trainer's device and ``DeviceBatchLoader``
  permutes, slices, scales and flips there. No per-batch CPU work, no host-device copies.

Validation is the first ``val_images`` of the test split, so it is cheap and fixed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_speed.distributed import rank_seed
from lightning_speed.validation import check_bool, check_int

SPLITS = ("train", "test")


def to_unit_range(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (0 -> -1, 255 -> 1)."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def random_hflip(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image of a (B, C, H, W) batch left-right with probability 1/2, sync-free."""
    mask = torch.rand(images.shape[0], 1, 1, 1, device=images.device, generator=generator) < 0.5
    return torch.where(mask, images.flip(-1), images)


def pad_images(images: Tensor, size: int | None) -> Tensor:
    """Zero-pad (N, C, H, W) uint8 images to ``size`` x ``size`` (centred; odd extra goes right/bottom)."""
    if size is None:
        return images
    h, w = images.shape[-2:]
    if size < h or size < w:
        raise ValueError(f"pad_to={size} is smaller than the images ({h}x{w}); use pad_to >= {max(h, w)}.")
    if size == h and size == w:
        return images
    top, left = (size - h) // 2, (size - w) // 2
    out = images.new_zeros((*images.shape[:-2], size, size))
    out[..., top : top + h, left : left + w] = images
    return out


class BatchTensorDataset(TensorDataset):
    """A ``TensorDataset`` that also answers a whole batch of indices with one gather.

    ``DataLoader`` calls ``__getitems__`` when present, so a batch costs one indexing op.
    """

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[index] for t in self.tensors)


class UInt8Collate:
    """Collate for ``BatchTensorDataset``: uint8 batch -> (float images in [-1, 1], long labels)."""

    def __init__(self, random_flip: bool) -> None:
        self.random_flip = random_flip

    def __call__(self, batch: tuple[Tensor, Tensor] | list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        if isinstance(batch, list):  # per-sample fetch (e.g. a wrapped dataset without __getitems__)
            images = torch.stack([b[0] for b in batch])
            labels = torch.stack([torch.as_tensor(b[1]) for b in batch])
        else:
            images, labels = batch
        x = to_unit_range(images)
        if self.random_flip:
            x = random_hflip(x)
        return x, labels.long()


class DeviceBatchLoader:
    """Iterable over batches of a uint8 image tensor that already lives on the target device.

    Each epoch draws a permutation on the device (seeded by ``seed`` and the epoch, so every
    DDP rank draws the same one), takes this rank's contiguous shard, and yields
    ``(float images in [-1, 1], labels)`` batches; ``drop_last`` semantics. Lightning calls
    ``set_epoch`` (through ``.sampler``) before each epoch; without it the epoch counts up
    on every ``iter``. What a batch is (``_check_data``, ``_batch``) is for subclasses to change
    (``lightning_speed.data.latent.LatentBatchLoader`` draws latents from a cached posterior).

    Resuming: Lightning saves ``state_dict()`` (the epoch and how many of its batches were handed out)
    in every checkpoint and, on a resume in the middle of an epoch, passes it to ``load_state_dict``
    before that epoch's ``iter``, which then continues after those batches in the same order and with
    the same random flips (latent draws) as a run never interrupted: it draws the skipped batches
    again on the device, so every rank, which loads rank 0's state, advances its own generator. A state
    of another epoch (a checkpoint written at an epoch's end) is ignored. Resumed with another
    ``batch_size`` (or number of devices) the loader warns on rank 0 (unless the datamodule said so: ``resume_said``)
    and, as Lightning counts the batches already
    trained, continues at the same batch index of the epoch batched anew: that epoch's images between
    ``done * old`` and ``done * new`` in its order are seen twice (smaller batches) or not at all
    (larger ones); later epochs are as in a run with the new size.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        random_flip: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self._check_data(images)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}.")
        self.images, self.labels = images, labels.to(images.device)
        self.random_flip = random_flip
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.per_rank = images.shape[0] // self.world_size
        self.batch_size = batch_size
        self.epoch = 0
        self._epoch_set = False
        self._progress = {"epoch": 0, "batches": 0, "batch_size": self.batch_size, "world_size": self.world_size}
        self._resume: dict[str, int] | None = None  # a loaded state, for the next ``iter``
        self.resume_said = False  # the datamodule said what this resume changes: no warning of its own

    def _check_data(self, images: Tensor) -> None:
        if images.dtype != torch.uint8:
            raise ValueError(f"DeviceBatchLoader expects uint8 images, got {images.dtype}.")

    def _batch(self, index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The batch of the rows ``index``; ``generator`` (this rank's, seeded per epoch) draws its randomness."""
        x = to_unit_range(self.images[index])
        if self.random_flip:
            x = random_hflip(x, generator)
        return x, self.labels[index]

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, batch_size: int) -> None:
        """Settable between epochs: the same data on the device, batched anew (the next ``iter`` uses it)."""
        if not 1 <= int(batch_size) <= self.per_rank:
            raise ValueError(
                f"batch_size={batch_size} does not fit the {self.per_rank} training images per rank; "
                f"use 1 <= batch_size <= {self.per_rank} (batches are drop_last)."
            )
        self._batch_size = int(batch_size)

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def sampler(self) -> DeviceBatchLoader:
        """Lets Lightning's ``_set_sampler_epoch`` find ``set_epoch``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_set = int(epoch), True

    def __len__(self) -> int:
        return self.per_rank // self.batch_size

    def _generator(self, salt: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + self.epoch * 7_919 + salt) % (2**63 - 1))
        return g

    def state_dict(self) -> dict[str, int]:
        """The epoch being served and how many of its batches were handed out (Lightning saves it in checkpoints)."""
        return dict(self._progress)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue ``state``'s epoch after its batches on the next ``iter`` (if that ``iter`` serves this epoch); the
        empty state of a host loader (``HostTrainLoader``: the run trained from host memory before) restarts it."""
        if not state:
            return
        self._resume = {k: int(state[k]) for k in ("epoch", "batches", "batch_size", "world_size")}
        self.epoch, self._epoch_set = self._resume["epoch"], False

    def _batches_done(self, epoch: int) -> int:
        """Batches of ``epoch`` already trained on, from a loaded state (0 without one); warns if they were batched
        otherwise."""
        resume, self._resume = self._resume, None
        said, self.resume_said = self.resume_said, False
        if resume is None or resume["epoch"] != epoch or resume["batches"] == 0:
            return 0
        done = resume["batches"]
        if self.rank == 0 and not said and (resume["batch_size"], resume["world_size"]) != (self.batch_size, self.world_size):
            warnings.warn(
                f"Resuming epoch {epoch} after {done} batches of {resume['batch_size']} on {resume['world_size']} "
                f"device(s) with batches of {self.batch_size} on {self.world_size}: training continues at batch {done} "
                "of the epoch batched anew, so some of its images are seen twice or not at all (later epochs are "
                f"exact). Resume with batch_size={resume['batch_size']} on {resume['world_size']} device(s) to "
                "continue exactly.",
                UserWarning, stacklevel=3,
            )
        return done

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch
        perm = torch.randperm(self.images.shape[0], generator=self._generator(0), device=self.device)
        shard = perm[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        generator = self._generator(1 + self.rank)
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False
        bs, done = self.batch_size, self._batches_done(epoch)
        self._progress = {"epoch": epoch, "batches": 0, "batch_size": bs, "world_size": self.world_size}
        for i in range(len(self)):
            batch = self._batch(shard[i * bs : (i + 1) * bs], generator)  # skipped ones too: their draws advance it
            if i >= done:
                self._progress["batches"] = i + 1  # before the yield: a checkpoint written meanwhile counts this one
                yield batch


class HostTrainLoader(DataLoader):
    """The training ``DataLoader`` from host memory, which a run may resume into from an on-device run's checkpoint
    (``on_device`` changed, or ``auto`` chose otherwise): Lightning hands a saved loader state back on resume and
    stops if the loader cannot take it. This one takes it and starts the epoch afresh (its shuffle is not the
    on-device order), saying so; its own state is empty (its epochs restart on resume, as a DataLoader's do)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            warnings.warn(
                f"The checkpoint's epoch {state.get('epoch')} was trained from the on-device loader, {state.get('batches')} "
                "batches in; this run loads the images from host memory, whose shuffle is another order, so that "
                "epoch starts afresh. Resume with on_device as before to continue it exactly.",
                UserWarning, stacklevel=2,
            )


def run_shape(trainer: Any, batch_size: int) -> dict[str, int]:
    """What makes the images of one optimizer step: ``batch_size`` per process, processes, batches accumulated."""
    return {"batch_size": int(batch_size), "world_size": int(trainer.world_size),
            "accumulate_grad_batches": int(getattr(trainer, "accumulate_grad_batches", 1) or 1)}


def _images_per_step(shape: dict[str, int]) -> int:
    return shape["batch_size"] * shape["world_size"] * shape.get("accumulate_grad_batches", 1)


def batches_per_epoch(count: int, saved: dict[str, int]) -> int:
    """Batches per epoch of ``count`` images in ``saved``'s shape (each process its ``count // world`` share)."""
    return count // saved["world_size"] // saved["batch_size"]


def _processes(n: int) -> str:
    return f"{n} process" + ("" if n == 1 else "es")


def world_size_change(saved: dict[str, int], now: dict[str, int], epoch: int, continued: int) -> str:
    """What resuming a fit of ``saved``'s shape on another number of processes changes: the images per optimizer step
    (the batch size is per process) and, ``continued`` batches into ``epoch`` (0: none), that epoch."""
    before, after = _images_per_step(saved), _images_per_step(now)
    old, new = saved["world_size"], now["world_size"]
    per = after // now["batch_size"]
    keep = (f" To keep {before} images per step, set batch_size={before // per}."
            if before % per == 0 and before != after else "")
    if continued:
        epoch_note = (f"Epoch {epoch} continues at batch {continued} with its images shared out anew over "
                      f"{_processes(new)}, not exactly: some of its images are seen twice or not at all (later epochs "
                      f"are as in a run on {_processes(new)}). To continue it exactly, resume on {_processes(old)} with "
                      f"batch_size={saved['batch_size']}.")
    else:
        epoch_note = f"Epoch {epoch} starts at its first batch, shared out over {_processes(new)}."
    return (f"Resuming a fit trained on {_processes(old)} on {_processes(new)}: {before} images per optimizer step "
            f"before ({saved['batch_size']} per process), {after} now ({now['batch_size']} per process); the batch "
            f"size is per process.{keep} {epoch_note}")


class ResumeShapeMixin:
    """For a datamodule whose ``batch_size`` is per process: checkpoints record the run's shape (``run_shape``), and a
    fit resumed on another number of processes says once, on rank 0, what that changes (``world_size_change``)."""

    batch_size: int
    trainer: Any

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        state: dict[str, Any] = run_shape(trainer, self.batch_size)
        loader = trainer.train_dataloader
        if isinstance(loader, DeviceBatchLoader):  # the epoch in progress and its batches trained
            state["loader"] = loader.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        trainer = getattr(self, "trainer", None)
        self._resumed_shape = dict(state) if state and trainer is not None and trainer.state.fn == TrainerFn.FITTING else None

    def _say_world_size_change(self, loader: Any) -> None:
        """After ``train_dataloader`` built ``loader`` (Lightning has restored its loops, not yet the loader's state)."""
        saved, self._resumed_shape = getattr(self, "_resumed_shape", None), None
        trainer = getattr(self, "trainer", None)
        if not saved or trainer is None or int(saved.get("world_size", trainer.world_size)) == trainer.world_size:
            return
        progress = saved.get("loader") or {}
        continued, cut = 0, ""
        # Lightning hands the loader its saved state only when it restarts the epoch; a host loader restarts it anyway
        if isinstance(loader, DeviceBatchLoader) and trainer.fit_loop.restarting:
            epoch, done = progress.get("epoch"), int(progress.get("batches", 0))
            if epoch == trainer.current_epoch:
                continued = done
            elif epoch == trainer.current_epoch - 1 and 0 < done < batches_per_epoch(loader.images.shape[0], saved):
                cut = (f" The checkpoint was written {done} batches into epoch {epoch}, which Lightning counts as ended "
                       "(a checkpoint at the end of training): the rest of that epoch is not trained on.")
            loader.resume_said = True  # on every rank: said here, once
        if trainer.global_rank == 0:
            warnings.warn(world_size_change(saved, run_shape(trainer, self.batch_size), trainer.current_epoch,
                                            continued) + cut, UserWarning, stacklevel=3)


def check_batch_fits(name: str, count: int, world: int, batch_size: int, *, padded: bool) -> None:
    """Every process must get at least one full batch of the ``count`` training images (batches drop the last partial
    one): ``count // world`` each, or ``ceil(count / world)`` where a DistributedSampler pads the shares (``padded``)."""
    share = -(-count // world) if padded else count // world
    if share < batch_size:
        per = f" ({share} per process on {world} processes)" if world > 1 else ""
        raise ValueError(
            f"{name}: {count} training images{per} is fewer than batch_size={batch_size}: lower batch_size to at most "
            f"{max(1, share)} or add training images."
        )


def check_seed(seed: int) -> int:
    """A data module's ``seed``: numpy's generators (an image folder's hold-out split) refuse a negative one, and
    torch's would take -1 as 2**64 - 1; Lightning's ``seed_everything`` refuses it too."""
    return check_int(seed, "seed", minimum=0, hint="give 0 or a positive integer")


def check_attached_model(datamodule: L.LightningDataModule) -> None:
    """Before a data module's costly preparation (a download, an encoding): the model it trains checks the data
    first, if it can (``DiffusionModule.check_data``), so that a backbone of the wrong shape fails before that work,
    not at the model's setup, which Lightning runs after ``prepare_data``."""
    model = getattr(getattr(datamodule, "trainer", None), "lightning_module", None)
    if callable(getattr(model, "check_data", None)):
        model.check_data(datamodule)


class UInt8ImageDataModule(ResumeShapeMixin, L.LightningDataModule):
    """Base datamodule over in-memory uint8 image arrays; see the module docstring.

    Subclasses set ``name``, ``image_shape`` and ``num_classes`` and implement
    ``_load_split(split) -> (images (N, C, H, W) uint8, labels (N,))`` for split in
    ``("train", "test")``; those with files on disk also implement ``_locate`` (find, or with
    ``download`` fetch, them), which ``prepare_data`` and ``setup`` call.
    """

    name: str = "uint8_images"
    image_shape: tuple[int, int, int]
    num_classes: int
    download: bool = False

    def __init__(
        self,
        *,
        batch_size: int,
        num_workers: int,
        random_flip: bool,
        pad_to: int | None,
        val_images: int | None,
        on_device: bool,
        seed: int,
    ) -> None:
        super().__init__()
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        self.num_workers = check_int(num_workers, "num_workers", minimum=0)
        self.random_flip = check_bool(random_flip, "random_flip")
        self.pad_to = pad_to
        if val_images is not None:
            val_images = check_int(val_images, "val_images", minimum=0, hint="or None for the whole test split")
        self.val_images = val_images
        # a string such as "auto" or "false" would read as true: the on-device loader without a choice being made
        self.on_device = check_bool(on_device, "on_device", hint="the image modules take true or false")
        self.seed = check_seed(seed)
        self._data: dict[str, tuple[Tensor, Tensor]] = {}
        self._device_train: DeviceBatchLoader | None = None

    # ----------------------------------------------------------------- loading
    def _locate(self, download: bool) -> Any:
        """Find the dataset's files (fetching them when ``download``); a clear error when they are absent."""

    def _load_split(self, split: str) -> tuple[np.ndarray | Tensor, np.ndarray | Tensor]:
        raise NotImplementedError

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        """Padded uint8 (N, C, H, W) images and long labels of ``split``, loaded once."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        if split not in self._data:
            images, labels = self._load_split(split)
            images = torch.as_tensor(images)
            labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels).long()
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise ValueError(
                    f"{type(self).__name__}._load_split must return uint8 (N, C, H, W) images, "
                    f"got {images.dtype} {tuple(images.shape)}."
                )
            if images.shape[0] != labels.shape[0]:
                raise ValueError(f"{self.name} {split}: {images.shape[0]} images but {labels.shape[0]} labels.")
            images = pad_images(images, self.pad_to).contiguous()
            if tuple(images.shape[1:]) != tuple(self.image_shape):
                raise ValueError(
                    f"{self.name} {split}: images are {tuple(images.shape[1:])} after padding, "
                    f"expected image_shape {tuple(self.image_shape)}."
                )
            self._data[split] = (images, labels)
        return self._data[split]

    def iter_split(self, split: str, batch_size: int, max_images: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """The first ``max_images`` (all if None) images of ``split``, ``batch_size`` at a time, in the fixed
        order of ``_split``: ``(uint8 (b, C, H, W), long labels (b,))``. Data sets that can decode part of a
        split (``ImageFolderDataModule``) override it, so that one pass over a large split never holds all of it."""
        images, labels = self._split(split)
        n = images.shape[0] if max_images is None else min(max_images, images.shape[0])
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield images[start:stop], labels[start:stop]

    def _num_val(self) -> int:
        n_test = self._split("test")[0].shape[0]
        if self.val_images is None:
            return n_test
        if self.val_images > n_test:
            raise ValueError(
                f"val_images={self.val_images} but the {self.name} test split has only {n_test} images; "
                f"use val_images <= {n_test}."
            )
        return self.val_images

    def prepare_data(self) -> None:
        """Find (or, with ``download=True``, fetch) the files; errors surface here, before training (after the
        model's check of the data: ``check_attached_model``)."""
        check_attached_model(self)
        self._locate(download=self.download)

    def setup(self, stage: str | None = None) -> None:
        """Load (once) the splits this stage needs; raises here, before any training step."""
        # Outside a Trainer nobody called prepare_data, so the download may happen here.
        self._locate(download=self.download and self.trainer is None)
        if stage == "fit" and self.trainer is not None:  # a fit's: before the split is decoded (a folder: minutes)
            self._check_batch_size(self.split_size("train"))
        if stage in (None, "fit"):
            self._split("train")
        if stage in (None, "fit", "validate"):
            self._num_val()
        if stage in (None, "test", "predict"):
            self._split("test")

    def teardown(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._device_train = None  # frees the device copy of the train set

    def _check_batch_size(self, count: int) -> None:
        # the on-device loader shards count // world images per rank; the host loader's sampler pads each share
        check_batch_fits(self.name, count, self._rank_world()[1], self.batch_size, padded=not self.on_device)

    # ------------------------------------------------------------ dataloaders
    def _target_device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return torch.device("cpu")

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return 0, 1

    def _loader(self, images: Tensor, labels: Tensor, *, train: bool) -> DataLoader:
        # Per rank: DataLoader workers take their seeds from it, and under DDP the same seed on every rank would give
        # every rank's workers the same flips (the shuffle is the DistributedSampler's, seeded apart from this).
        generator = torch.Generator().manual_seed(rank_seed(self.seed, self._rank_world()[0])) if train else None
        return (HostTrainLoader if train else DataLoader)(
            BatchTensorDataset(images, labels),
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=UInt8Collate(random_flip=train and self.random_flip),
        )

    def train_dataloader(self) -> DataLoader | DeviceBatchLoader:
        images, labels = self._split("train")
        if not self.on_device:
            self._check_batch_size(images.shape[0])  # batch_size may have changed since setup (BatchSizeFinder)
            loader = self._loader(images, labels, train=True)
            self._say_world_size_change(loader)
            return loader
        device = self._target_device()
        rank, world = self._rank_world()
        cached = self._device_train
        if cached is None or cached.device != device or (cached.rank, cached.world_size) != (rank, world):
            self._device_train = DeviceBatchLoader(
                images.to(device),
                labels.to(device),
                batch_size=self.batch_size,
                random_flip=self.random_flip,
                seed=self.seed,
                rank=rank,
                world_size=world,
            )
        else:  # batch_size may have changed since (BatchSizeFinder sets it and asks again): the same copy, rebatched
            cached.batch_size = self.batch_size
        self._say_world_size_change(self._device_train)
        return self._device_train

    def val_dataloader(self) -> DataLoader | list:
        n = self._num_val()
        if n == 0:
            return []  # no validation loop
        images, labels = self._split("test")
        return self._loader(images[:n], labels[:n], train=False)

    def test_dataloader(self) -> DataLoader:
        images, labels = self._split("test")
        return self._loader(images, labels, train=False)

    # -------------------------------------------------------------- references
    def split_size(self, split: str) -> int:
        """Number of images in ``split`` (subclasses that can count without loading them override this)."""
        return int(self._split(split)[0].shape[0])

    def _num_reference(self, split: str, max_images: int | None) -> int:
        n = self.split_size(split)
        if max_images is not None:
            if max_images < 1:
                raise ValueError(f"max_images must be >= 1 or None, got {max_images}.")
            if max_images > n:
                warnings.warn(
                    f"{self.name}: {max_images} reference images were asked for, but the {split} split holds {n}: "
                    f"using all {n} (set num_reference to at most {n}, or null for all, to silence this).",
                    UserWarning, stacklevel=2,
                )
            n = min(n, max_images)
        if n == 0:
            raise ValueError(f"{self.name}: the {split} split is empty; use another split for reference images.")
        return n

    def reference_images(self, split: str = "test", max_images: int | None = None) -> Tensor:
        """The first ``max_images`` (all if None) images of ``split`` as uint8 (N, C, H, W) in
        [0, 255], padded exactly like training images; fixed order (for FID real statistics)."""
        n = self._num_reference(split, max_images)
        return self._split(split)[0][:n].clone()

    def reference_batches(self, split: str = "test", max_images: int | None = None,
                          batch_size: int = 500) -> Iterator[Tensor]:
        """``reference_images(split, max_images)`` in batches of ``batch_size``, never all at once (FID's
        real statistics stream these). A bad split or count fails here, before the first batch."""
        n = self._num_reference(split, max_images)
        return (images for images, _ in self.iter_split(split, batch_size, n))

    def _key_extra(self) -> str:
        """Subclass hook: anything else that changes the reference images (e.g. a folder fingerprint)."""
        return ""

    def reference_key(self, split: str = "test", max_images: int | None = None) -> str:
        """Stable id of ``reference_images(split, max_images)`` (dataset, split, count, preprocessing)."""
        n = self._num_reference(split, max_images)
        c, h, w = self.image_shape
        extra = self._key_extra()
        return f"{self.name}-{split}-n{n}-{c}x{h}x{w}" + (f"-{extra}" if extra else "")
