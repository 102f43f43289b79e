"""Tests for lightning_speed.data: IDX reading, Fashion-MNIST (full + embedded), CIFAR-10, image folders."""

from __future__ import annotations

import gzip
import os
import pickle
import signal
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lightning_speed.data import (
    CIFAR10DataModule,
    DeviceBatchLoader,
    EmbeddedFashionMNISTDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    LatentDataModule,
    UInt8ImageDataModule,
    read_idx,
)
from lightning_speed.data import fashion_mnist as fm_module
from lightning_speed.data.base import to_unit_range
from lightning_speed.data.embedded import load_embedded_subset

from _fixtures import write_fake_cifar  # pytest puts tests/ on sys.path (no __init__.py there)

REAL_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_real = pytest.mark.skipif(
    not (REAL_ROOT / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed"
)


# ----------------------------------------------------------------------------- helpers
def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fake_fashion(folder: Path, n_train: int = 12, n_test: int = 6, gz: bool = False) -> None:
    """A tiny dataset in the Fashion-MNIST file layout (random 28x28 images)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, arr in (
            ("images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
            ("labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8)),
        ):
            data = idx_bytes(arr)
            name = f"{prefix}-{kind}"
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)


class ToyDataModule(UInt8ImageDataModule):
    """Images whose left half is white: a flip moves the white to the right. Labels = index."""

    name = "toy"
    num_classes = 1

    def __init__(self, n: int = 512, on_device: bool = False, batch_size: int = 64, random_flip: bool = True):
        super().__init__(
            batch_size=batch_size, num_workers=0, random_flip=random_flip, pad_to=8,
            val_images=None, on_device=on_device, seed=0,
        )  # fmt: skip
        self.n = n
        self.image_shape = (1, 8, 8)

    def _load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        images = np.zeros((self.n, 1, 6, 6), dtype=np.uint8)
        images[..., :3] = 255
        return images, np.arange(self.n)


def flipped_mask(x: torch.Tensor) -> torch.Tensor:
    """For ToyDataModule batches: True where the image was flipped (white on the right)."""
    left, right = x[:, 0, 4, 1], x[:, 0, 4, 6]
    assert torch.all((left == 1) ^ (right == 1)), "each toy image must be white on exactly one side"
    return right == 1


@pytest.fixture(scope="module")
def real_dm() -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(root=str(REAL_ROOT), batch_size=256)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# --------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    path.write_bytes(gzip.compress(idx_bytes(array)) if gz else idx_bytes(array))
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
    "name, payload, message",
    [
        ("empty-idx3-ubyte", b"", "empty"),
        ("trunc-idx3-ubyte", idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-100], "truncated"),
        ("trunc-header-idx3-ubyte", bytes([0, 0, 8, 3, 0, 0]), "truncated header"),
        ("magic-idx3-ubyte", b"\x1f\x8b\x08\x03" + bytes(100), "magic"),
        ("extra-idx1-ubyte", idx_bytes(np.zeros(5, np.uint8)) + b"\x00", "trailing"),
        ("bad-idx3-ubyte.gz", gzip.compress(idx_bytes(np.zeros((4, 28, 28), np.uint8)))[:-20], "gzip"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path: Path, name: str, payload: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(ValueError) as err:
        read_idx(path)
    text = str(err.value)
    assert str(path) in text and message in text and "download" in text.lower()


def test_corrupt_file_in_root_fails_in_setup(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    dm = FashionMNISTDataModule(root=str(tmp_path), batch_size=4, val_images=2)
    dm.prepare_data()  # the files exist
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*empty"):
        dm.setup("fit")


# ----------------------------------------------------------------- Fashion-MNIST: locating
def test_missing_root_error_names_files_and_fixes(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"x")  # one of four present
    dm = FashionMNISTDataModule(root=str(tmp_path))
    for call in (dm.prepare_data, lambda: dm.setup("fit")):
        with pytest.raises(FileNotFoundError) as err:
            call()
        text = str(err.value)
        assert str(tmp_path) in text and "apt-get install" in text and "download" in text
        assert "t10k-labels-idx1-ubyte" in text and "train-images-idx3-ubyte[" not in text


def test_no_root_searches_system_then_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm_module, "SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.setattr(fm_module, "DEFAULT_DOWNLOAD_ROOT", tmp_path / "cache")
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTDataModule().prepare_data()
    text = str(err.value)
    assert "system" in text and "cache" in text and "apt-get" in text and "download" in text
    write_fake_fashion(tmp_path / "cache", gz=True)
    dm = FashionMNISTDataModule(batch_size=4, val_images=2)
    dm.setup("fit")
    assert dm.files["train-images-idx3-ubyte"] == tmp_path / "cache" / "train-images-idx3-ubyte.gz"


def test_download_uses_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    calls = []

    class FakeFashionMNIST:  # stands in for the network: writes files where torchvision would
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            write_fake_fashion(Path(root) / "FashionMNIST" / "raw", gz=True)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    dm = FashionMNISTDataModule(root=str(tmp_path), download=True, batch_size=4, val_images=3)
    dm.prepare_data()
    assert calls and all(c[0] == str(tmp_path) and c[2] for c in calls)
    dm.setup("fit")
    assert dm.reference_images("train").shape == (12, 1, 32, 32)


def test_uncompressed_files_work(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path, gz=False)
    dm = FashionMNISTDataModule(root=str(tmp_path), batch_size=4, val_images=6)
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    raw = read_idx(tmp_path / "t10k-images-idx3-ubyte")
    np.testing.assert_allclose(x[:, 0, 2:30, 2:30].numpy(), raw[:4] / 127.5 - 1.0, atol=1e-6)
    assert y.tolist() == [0, 1, 2, 3]


def test_a_training_subset_has_its_own_reference_key(tmp_path: Path) -> None:
    """FID's real statistics are cached by key: the subset's images are not the first images of the full split."""
    write_fake_fashion(tmp_path, n_train=40, n_test=6)
    full = FashionMNISTDataModule(root=str(tmp_path), val_images=6)
    subset = FashionMNISTDataModule(root=str(tmp_path), val_images=6, train_subset=7)
    assert not torch.equal(full.reference_images("train", 7), subset.reference_images("train"))
    assert full.reference_key("train", 7) != subset.reference_key("train")
    assert full.reference_key("test") == subset.reference_key("test")  # the same test images, the same statistics


def test_bad_arguments_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pad_to"):
        FashionMNISTDataModule(pad_to=20)
    write_fake_fashion(tmp_path)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_images=50)
    with pytest.raises(ValueError, match="val_images=50"):
        dm.setup("fit")


@pytest.mark.parametrize("make", [
    lambda root: FashionMNISTDataModule(root=str(root), seed=-1),
    lambda root: CIFAR10DataModule(root=str(root), seed=-1),
    lambda root: EmbeddedFashionMNISTDataModule(seed=-1),
    lambda root: ImageFolderDataModule(str(root), image_size=8, seed=-1),  # numpy's split refused it only at setup
    lambda root: LatentDataModule(FashionMNISTDataModule(root=str(root)), str(root / "no-vae"), seed=-1),
], ids=["fashion_mnist", "cifar10", "embedded", "image_folder", "latent"])  # fmt: skip
def test_a_negative_seed_is_refused_when_the_module_is_built(tmp_path: Path, make: Callable[[Path], object]) -> None:
    """Before anything is read or loaded (the latent module's autoencoder file does not exist)."""
    with pytest.raises(ValueError, match=r"^seed must be an integer of at least 0, got -1; give 0 or a positive integer"):
        make(tmp_path)


# -------------------------------------------------------------- Fashion-MNIST: real data
@needs_real
def test_real_batches_shapes_ranges_and_black_padding(real_dm: FashionMNISTDataModule) -> None:
    assert real_dm.image_shape == (1, 32, 32) and real_dm.num_classes == 10 and real_dm.name == "fashion_mnist"
    train = real_dm.train_dataloader()
    assert len(train) == 60000 // 256  # drop_last
    for loader in (train, real_dm.val_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (256, 1, 32, 32) and x.dtype == torch.float32
        assert y.shape == (256,) and y.dtype == torch.long and 0 <= y.min() and y.max() <= 9
        assert x.min() >= -1 and x.max() <= 1 and x.max() > 0.9  # some near-white pixels
        border = torch.cat([x[..., :2, :].flatten(), x[..., -2:, :].flatten(), x[..., :2].flatten(), x[..., -2:].flatten()])
        assert torch.all(border == -1.0)
    assert sum(len(b[1]) for b in real_dm.val_dataloader()) == 1000


@needs_real
def test_real_val_is_first_test_images_unflipped(real_dm: FashionMNISTDataModule) -> None:
    raw = torch.from_numpy(read_idx(REAL_ROOT / "t10k-images-idx3-ubyte.gz")[:1000])
    val = torch.cat([b[0] for b in real_dm.val_dataloader()])
    assert torch.equal(val[:, 0, 2:30, 2:30], to_unit_range(raw))


@needs_real
def test_reference_images_deterministic_and_match_training_preprocessing(real_dm: FashionMNISTDataModule) -> None:
    a = real_dm.reference_images("test", max_images=500)
    b = FashionMNISTDataModule(root=str(REAL_ROOT)).reference_images("test", max_images=500)
    assert a.dtype == torch.uint8 and a.shape == (500, 1, 32, 32) and torch.equal(a, b)
    assert torch.all(a[..., :2, :] == 0) and torch.all(a[..., :, -2:] == 0)
    val = torch.cat([x for x, _ in real_dm.val_dataloader()])[:500]
    assert torch.equal(to_unit_range(a), val)
    assert real_dm.reference_images().shape[0] == 10000
    assert real_dm.reference_images("train", 7).shape == (7, 1, 32, 32)
    key = real_dm.reference_key("test", 500)
    assert key == real_dm.reference_key("test", 500) == "fashion_mnist-test-n500-1x32x32"
    assert len({key, real_dm.reference_key("test"), real_dm.reference_key("train", 500)}) == 3
    assert real_dm.reference_key("test", 10**9) == real_dm.reference_key("test")  # count is the real count


# ------------------------------------------------------------------------------- flips
@pytest.mark.parametrize("on_device", [False, True])
def test_flip_happens_half_the_time_in_training_only(on_device: bool) -> None:
    torch.manual_seed(0)
    dm = ToyDataModule(n=2048, on_device=on_device)
    dm.setup("fit")
    flips = torch.cat([flipped_mask(x) for x, _ in dm.train_dataloader()])
    assert flips.numel() == 2048
    assert 0.45 < flips.float().mean().item() < 0.55
    assert not torch.cat([flipped_mask(x) for x, _ in dm.val_dataloader()]).any()
    assert not torch.cat([flipped_mask(x) for x, _ in dm.test_dataloader()]).any()


@pytest.mark.parametrize("on_device", [False, True])
def test_random_flip_false_never_flips(on_device: bool) -> None:
    dm = ToyDataModule(n=256, on_device=on_device, random_flip=False)
    dm.setup("fit")
    assert not torch.cat([flipped_mask(x) for x, _ in dm.train_dataloader()]).any()


# ------------------------------------------------------------------------ on-device loader
@pytest.mark.parametrize("n, batch_size", [(1000, 100), (1000, 64)])
def test_device_loader_every_image_once_per_epoch(n: int, batch_size: int) -> None:
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    loader = DeviceBatchLoader(images, torch.arange(n), batch_size=batch_size, seed=3)
    assert len(loader) == n // batch_size
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(x.shape == (batch_size, 1, 4, 4) and x.dtype == torch.float32 for x, _ in batches)
        ids = torch.cat([y for _, y in batches])
        assert ids.unique().numel() == ids.numel() == len(loader) * batch_size  # each at most once, drop_last
        epochs.append(ids)
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch
    loader.set_epoch(0)
    assert torch.equal(torch.cat([y for _, y in loader]), epochs[0])  # epoch-seeded, reproducible


def test_device_loader_ddp_shards_are_disjoint() -> None:
    n, world = 999, 3
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    shards = []
    for rank in range(world):
        loader = DeviceBatchLoader(images, torch.arange(n), batch_size=111, seed=1, rank=rank, world_size=world)
        loader.set_epoch(5)
        assert len(loader) == 3
        shards.append(torch.cat([y for _, y in loader]))
    ids = torch.cat(shards)
    assert ids.numel() == n and ids.unique().numel() == n


def test_on_device_datamodule_without_trainer_uses_cpu_and_covers_the_epoch() -> None:
    dm = ToyDataModule(n=640, on_device=True, batch_size=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceBatchLoader) and loader.device == torch.device("cpu")
    assert dm.train_dataloader() is loader  # the device copy is made once
    ids = torch.cat([y for _, y in loader])
    assert sorted(ids.tolist()) == list(range(640))
    with pytest.raises(ValueError, match="batch_size"):
        DeviceBatchLoader(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10), batch_size=20)


def test_on_device_loader_follows_a_changed_batch_size_without_a_new_copy() -> None:
    dm = ToyDataModule(n=640, on_device=True, batch_size=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    images = loader.images
    dm.batch_size = 128
    again = dm.train_dataloader()
    assert again is loader and again.images is images and len(again) == 5
    batches = list(again)
    assert all(x.shape[0] == 128 for x, _ in batches)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(640))
    dm.batch_size = 641
    with pytest.raises(ValueError, match="batch_size=641 does not fit the 640 training images"):
        dm.train_dataloader()


def test_batch_size_finder_batches_the_on_device_loader_at_the_size_it_found(tmp_path: Path) -> None:
    """BatchSizeFinder sets the data module's batch_size and asks for the train loader again, trial by trial and
    for the fit after them: every step sees the batch size in force (4 and 8 tried, 8 found). The first trial
    runs on the loader made before ``init_val`` is set, so ``init_val`` is the data module's batch size here."""
    import lightning as L
    from lightning.pytorch.callbacks import BatchSizeFinder

    from _fixtures import cpu_trainer

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(64, 1)
            self.sizes: list[int] = []

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, _ = batch
            self.sizes.append(x.shape[0])
            return self.layer(x.flatten(1)).pow(2).mean()

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm, model = ToyDataModule(n=256, on_device=True, batch_size=4), Recorder()
    finder = BatchSizeFinder(mode="power", init_val=4, max_trials=2, steps_per_trial=1)
    cpu_trainer(max_steps=3, callbacks=[finder], default_root_dir=tmp_path).fit(model, dm)
    assert finder.optimal_batch_size == dm.batch_size == 8
    assert model.sizes == [4, 8, 8, 8, 8]


def test_host_loader_every_image_once_per_epoch() -> None:
    dm = ToyDataModule(n=640, on_device=False, batch_size=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = torch.cat([y for _, y in loader])
    assert sorted(first.tolist()) == list(range(640))
    second = torch.cat([y for _, y in loader])
    assert not torch.equal(first, second)


def worker_base_seed(loader: torch.utils.data.DataLoader) -> int:
    """The seed a DataLoader hands its workers (each worker's torch seed is it plus the worker's index)."""
    return iter(loader)._base_seed


def test_host_loader_workers_are_seeded_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP each rank's workers draw their own flips: the same seed on every rank gave them the same ones. One
    device keeps the seed it had."""
    def base_seed(rank: int) -> int:
        dm = ToyDataModule(n=640, on_device=False, batch_size=64)
        monkeypatch.setattr(dm, "_rank_world", lambda: (rank, 2))
        dm.setup("fit")
        return worker_base_seed(dm.train_dataloader())

    single = ToyDataModule(n=640, on_device=False, batch_size=64)
    single.setup("fit")
    expected = torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(0)).item()
    assert worker_base_seed(single.train_dataloader()) == expected == base_seed(0)
    assert base_seed(1) != base_seed(0)


def test_on_device_loader_in_a_lightning_fit() -> None:
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1024, 10)
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            self.seen.append(y)
            return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = EmbeddedFashionMNISTDataModule(batch_size=500, on_device=True, val_images=0)
    model = Tiny()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, dm)
    assert trainer.global_step == 16
    per_epoch = [torch.cat(model.seen[:8]), torch.cat(model.seen[8:])]
    for labels in per_epoch:
        assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 400))
    assert not torch.equal(per_epoch[0], per_epoch[1])


# ------------------------------------------------------------------ resuming the on-device loader
class BatchRecorder(L.LightningModule):
    """Keeps every training batch; sends this process SIGTERM in step ``stop_at`` (CheckpointOnSignal stops then)."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 1)
        self.stop_at = stop_at
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.global_step + 1 == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        x, y = batch
        self.seen.append((x.clone(), y.clone()))
        return self.layer(x.flatten(1)).pow(2).mean()

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_recording(folder: Path, ckpt_path: Path | None = None, batch_size: int = 8, stop_at: int | None = None,
                  every_n_train_steps: int | None = None, on_device: bool = True,
                  **trainer_options) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of a fit of ``ToyDataModule(n=60)`` on the device (7 batches of 8 an epoch, 3 epochs), stopped
    by SIGTERM in step ``stop_at`` (``interrupted.ckpt`` in ``folder``) and/or checkpointed every
    ``every_n_train_steps`` steps (``step=<k>.ckpt``), from ``ckpt_path`` if given."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from _fixtures import cpu_trainer
    from lightning_speed.callbacks import CheckpointOnSignal

    callbacks: list = [CheckpointOnSignal(dirpath=str(folder))]
    if every_n_train_steps:
        callbacks.append(ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=every_n_train_steps,
                                         save_top_k=-1))
    options = {"max_steps": -1, "max_epochs": 3, **trainer_options}
    trainer = cpu_trainer(default_root_dir=folder, callbacks=callbacks, enable_checkpointing=True, **options)
    model = BatchRecorder(stop_at)
    try:
        trainer.fit(model, ToyDataModule(n=60, on_device=on_device, batch_size=batch_size), ckpt_path=ckpt_path)
    except SystemExit as stop:  # CheckpointOnSignal's exit
        assert stop.code == 143
    return model.seen


def assert_same_batches(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for i, ((x, y), (x_ref, y_ref)) in enumerate(zip(got, expected)):
        assert torch.equal(y, y_ref) and torch.equal(x, x_ref), f"batch {i} differs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """A fit never interrupted, with its batches and a checkpoint after every step."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    return folder, fit_recording(folder, every_n_train_steps=1)


@pytest.mark.parametrize("limit", ["max_epochs", "max_steps"])
@pytest.mark.parametrize("step", [4, 10, 7, 14])  # in epoch 0, in epoch 1, and at the ends of epochs 0 and 1
def test_a_fit_resumed_from_a_step_checkpoint_trains_on_the_batches_of_an_uninterrupted_one(
        uninterrupted: tuple[Path, list], tmp_path: Path, step: int, limit: str) -> None:
    """With ``max_steps`` Lightning hands the loader its state even at an epoch's end, to be ignored there."""
    folder, reference = uninterrupted
    assert len(reference) == 21
    options = {"max_steps": 21, "max_epochs": -1} if limit == "max_steps" else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(not resumable|Resuming epoch)")
        resumed = fit_recording(tmp_path, ckpt_path=folder / f"step={step}.ckpt", **options)
    assert_same_batches(resumed, reference[step:])


def test_a_fit_stopped_by_sigterm_mid_epoch_and_resumed_trains_on_the_batches_of_an_uninterrupted_one(
        uninterrupted: tuple[Path, list], tmp_path: Path) -> None:
    stopped = fit_recording(tmp_path, stop_at=10)
    assert len(stopped) == 10
    resumed = fit_recording(tmp_path / "resumed", ckpt_path=tmp_path / "interrupted.ckpt")
    assert_same_batches(stopped + resumed, uninterrupted[1])


def test_a_fit_resumed_mid_epoch_with_another_batch_size_warns_and_continues_at_the_same_batch(
        uninterrupted: tuple[Path, list], tmp_path: Path) -> None:
    """4 of epoch 0's batches of 8 were trained (its images 0..31 in the epoch's order); batched by 4 it continues at
    batch 4 (images 16..59): 16 images twice, none left out. Later epochs are those of a run with batches of 4."""
    folder, reference = uninterrupted
    with pytest.warns(UserWarning, match=r"after 4 batches of 8 on 1 device\(s\) with batches of 4 on 1: training "
                                         r"continues at batch 4.*Resume with batch_size=8"):
        resumed = fit_recording(tmp_path / "resumed", ckpt_path=folder / "step=4.ckpt", batch_size=4)
    assert_same_batches(resumed, fit_recording(tmp_path / "straight", batch_size=4)[4:])
    epoch_0 = torch.cat([y for _, y in reference[:4] + resumed[:11]])
    assert sorted(epoch_0.unique().tolist()) == list(range(60)) and epoch_0.numel() == 60 + 16


def test_a_fit_resumes_across_a_change_of_on_device_in_either_direction(
        uninterrupted: tuple[Path, list], tmp_path: Path) -> None:
    """An on-device run's mid-epoch checkpoint resumed from host memory (on_device changed; a latent module's ``auto``
    may choose otherwise) trains on, starting that epoch afresh with a warning, instead of stopping in Lightning's
    restore; a host run's checkpoint resumes on the device (the host state is empty: the epoch restarts)."""
    folder, _ = uninterrupted
    with pytest.warns(UserWarning, match=r"epoch 0 was trained from the on-device loader, 4 batches in.*starts afresh"):
        on_host = fit_recording(tmp_path / "host", ckpt_path=folder / "step=4.ckpt", on_device=False)
    assert len(on_host) == 21 - 4  # the run's 21 steps: Lightning counts the 4 already trained
    host_run = tmp_path / "host_run"
    fit_recording(host_run, every_n_train_steps=4, on_device=False, max_epochs=1)
    on_device = fit_recording(tmp_path / "device", ckpt_path=host_run / "step=4.ckpt")
    assert len(on_device) == 21 - 4


def test_the_device_loader_resumes_from_its_state_outside_lightning() -> None:
    """Without ``set_epoch`` (the epoch counts up on every ``iter``) a loaded state continues its epoch too."""
    def loader() -> DeviceBatchLoader:
        return DeviceBatchLoader(torch.zeros(50, 1, 2, 2, dtype=torch.uint8), torch.arange(50), batch_size=10, seed=2)

    straight, first = loader(), loader()
    reference = [b for _ in range(2) for b in straight]
    batches = iter(first)
    seen = [next(batches) for _ in range(2)]
    state = first.state_dict()
    assert state == {"epoch": 0, "batches": 2, "batch_size": 10, "world_size": 1}
    again = loader()
    again.load_state_dict(state)
    seen += list(again) + list(again)
    assert_same_batches(seen, reference)


# ------------------------------------------------------------------------------ embedded
def test_embedded_subset_counts_and_balance() -> None:
    dm = EmbeddedFashionMNISTDataModule(batch_size=100)
    dm.setup("fit")
    assert dm.name == "fashion_mnist_embedded" and dm.image_shape == (1, 32, 32) and dm.num_classes == 10
    train = dm.reference_images("train")
    test = dm.reference_images("test")
    assert train.shape == (4000, 1, 32, 32) and test.shape == (1000, 1, 32, 32)
    arrays = load_embedded_subset()
    assert torch.equal(torch.bincount(torch.from_numpy(arrays["train_labels"]).long()), torch.full((10,), 400))
    assert torch.equal(torch.bincount(torch.from_numpy(arrays["test_labels"]).long()), torch.full((10,), 100))
    assert len(dm.train_dataloader()) == 40 and sum(len(y) for _, y in dm.val_dataloader()) == 1000
    assert dm.reference_key("test") == "fashion_mnist_embedded-test-n1000-1x32x32"


@needs_real
def test_embedded_subset_is_real_fashion_mnist() -> None:
    arrays = load_embedded_subset()
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(REAL_ROOT / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(REAL_ROOT / f"{prefix}-labels-idx1-ubyte.gz")
        idx = arrays[f"{split}_indices"]
        assert np.all(np.diff(idx) > 0)
        np.testing.assert_array_equal(arrays[f"{split}_images"], images[idx])
        np.testing.assert_array_equal(arrays[f"{split}_labels"], labels[idx])


def test_embedded_asset_is_small() -> None:
    from importlib import resources

    asset = resources.files("lightning_speed.data").joinpath("assets/fashion_mnist_subset.npz")
    assert asset.is_file() and len(asset.read_bytes()) < 4_000_000


def test_rebuilding_the_subset_from_a_folder_without_the_files_is_a_short_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_speed.data.make_embedded_subset import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--root", str(tmp_path), "--output", str(tmp_path / "subset.npz")])
    assert exit_info.value.code == 2 and not (tmp_path / "subset.npz").exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "apt-get install -y dataset-fashion-mnist" in err.splitlines()[-1]


# -------------------------------------------------------------------------------- CIFAR-10
def test_cifar10_reads_pickle_batches(tmp_path: Path) -> None:
    folder = write_fake_cifar(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4, num_workers=0, val_images=3)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.image_shape == (3, 32, 32) and dm.num_classes == 10 and dm.name == "cifar10"
    assert dm.reference_images("train").shape == (20, 3, 32, 32) and len(dm.train_dataloader()) == 5
    x, y = next(iter(dm.val_dataloader()))
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f)[b"data"][:3].reshape(3, 3, 32, 32)
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 1, 2]
    np.testing.assert_allclose(x.numpy(), raw / 127.5 - 1.0, atol=1e-6)
    xt, _ = next(iter(dm.train_dataloader()))
    assert xt.shape == (4, 3, 32, 32) and xt.min() >= -1 and xt.max() <= 1


def test_cifar10_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download"):
        CIFAR10DataModule(root=str(tmp_path / "nowhere")).prepare_data()
    folder = write_fake_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=2, num_workers=0, val_images=2)
    with pytest.raises(ValueError, match="data_batch_3"):
        dm.setup("fit")


# ---------------------------------------------------------------------------- image folder
def write_pngs(root: Path, layout: dict[str, list[tuple[int, int, tuple[int, int, int]]]]) -> None:
    from PIL import Image

    for sub, specs in layout.items():
        folder = root / sub if sub else root
        folder.mkdir(parents=True, exist_ok=True)
        for i, (w, h, colour) in enumerate(specs):
            Image.new("RGB", (w, h), colour).save(folder / f"img{i}.png")


def test_image_folder_with_classes(tmp_path: Path) -> None:
    red, blue = (255, 0, 0), (0, 0, 255)
    write_pngs(tmp_path, {"cats": [(40, 20, red)] * 4, "dogs/nested": [(20, 30, blue)] * 4})
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=2, num_workers=0, val_fraction=0.25)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.class_names == ("cats", "dogs") and dm.image_shape == (3, 16, 16)
    train = dm.reference_images("train")
    test = dm.reference_images("test")
    assert train.shape == (6, 3, 16, 16) and test.shape == (2, 3, 16, 16) and train.dtype == torch.uint8
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16) and y.dtype == torch.long
    for img, label in zip(x, y):  # solid colours survive resize + crop
        expected = torch.tensor([1.0, -1.0, -1.0]) if label == 0 else torch.tensor([-1.0, -1.0, 1.0])
        assert torch.allclose(img.mean(dim=(1, 2)), expected, atol=1e-3)
    key = dm.reference_key("test")
    write_pngs(tmp_path, {"dogs": [(16, 16, blue)] * 5})
    assert ImageFolderDataModule(str(tmp_path), image_size=16, num_workers=0, val_fraction=0.25).reference_key("test") != key


def test_image_folder_unlabelled_grey(tmp_path: Path) -> None:
    write_pngs(tmp_path, {"": [(10, 10, (255, 255, 255))] * 3, "sub": [(10, 10, (0, 0, 0))]})
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, channels=1, batch_size=2, num_workers=0, val_fraction=0.0)
    dm.setup("fit")
    assert dm.num_classes == 1 and dm.image_shape == (1, 8, 8)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 1, 8, 8) and torch.all(y == 0)
    assert dm.val_dataloader() == []


def write_turned_jpeg(path: Path, orientation: int) -> None:
    """A 32x16 JPEG, dark left half and bright right half, whose EXIF orientation says how to turn it for display."""
    from PIL import Image

    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, 16:] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def test_image_folder_turns_photos_upright_by_their_exif_orientation(tmp_path: Path) -> None:
    """Orientation 6 (a phone held upright) shows the stored left half on top, 8 at the bottom, 3 on the right: the
    displayed image is 16 wide and 32 tall for 6 and 8, and its centre crop is half dark and half bright."""
    from lightning_speed.data.image_folder import load_image

    dark_half = {1: (slice(None), slice(0, 8)), 3: (slice(None), slice(8, 16)),
                 6: (slice(0, 8), slice(None)), 8: (slice(8, 16), slice(None))}  # (rows, columns) of the 16x16 crop
    for orientation in dark_half:
        write_turned_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, num_workers=0, val_fraction=0.0)
    images = torch.cat([x for x, _ in dm.iter_split("train", 3)])  # the streamed decoding (latent encoding, FID)
    assert torch.equal(images, dm.reference_images("train"))  # the same as the in-memory split
    for image, (orientation, (rows, cols)) in zip(images.numpy(), dark_half.items()):
        dark = np.zeros((16, 16), dtype=bool)
        dark[rows, cols] = True
        assert image.shape == (3, 16, 16)
        assert image[:, dark].max() < 32 and image[:, ~dark].min() > 223, orientation
    grey = load_image(tmp_path / "o6.jpg", 16, channels=1)[0]
    assert grey[:8].max() < 32 and grey[8:].min() > 223


def test_image_folder_keys_follow_the_decoding_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FID statistics and latent caches are keyed by ``reference_key``: images decoded by other rules get another key
    (pinned here: a folder's key under decoding rules 1, which ignored the EXIF orientation)."""
    from lightning_speed.data import image_folder

    (tmp_path / "a.png").write_bytes(b"not decoded")  # the key hashes names and bytes only

    def key() -> str:
        return ImageFolderDataModule(str(tmp_path), image_size=8, val_fraction=0.0).reference_key("train")

    assert key() != "image_folder-train-n1-3x8x8-f134d633efb8"  # that folder's key under decoding rules 1
    current = key()
    monkeypatch.setattr(image_folder, "DECODING", image_folder.DECODING + 1)
    assert key() != current


def test_image_folder_scales_16_bit_grey_images_to_8_bits(tmp_path: Path) -> None:
    from PIL import Image

    from lightning_speed.data.image_folder import load_image

    Image.fromarray(np.array([[0, 257 * 100, 65535, 257 * 3]] * 4, dtype=np.uint16)).save(tmp_path / "grey16.png")
    for channels in (1, 3):
        image = load_image(tmp_path / "grey16.png", 4, channels)
        assert image.shape == (channels, 4, 4) and (image == np.array([0, 100, 255, 3], dtype=np.uint8)).all()


def k_of_255(top: float, dtype: type) -> np.ndarray:
    """Grey levels 0, 100, 255, 3 of 255 at the scale ``top`` (rounded for integers), as a 4x4 image."""
    levels = [k * top / 255 for k in (0, 100, 255, 3)]
    return np.array([levels if np.issubdtype(dtype, np.floating) else [round(v) for v in levels]] * 4, dtype=dtype)


def assert_loads_as_0_100_255_3(path: Path) -> None:
    from lightning_speed.data.image_folder import load_image

    for channels in (1, 3):
        image = load_image(path, 4, channels)
        assert image.shape == (channels, 4, 4) and (image == np.array([0, 100, 255, 3], dtype=np.uint8)).all()


def test_image_folder_scales_32_bit_integer_tiffs_by_the_range_they_declare(tmp_path: Path) -> None:
    from PIL import Image

    signed = tmp_path / "signed32.tif"  # Pillow writes mode "I" as signed 32-bit samples: [0, 2**31 - 1]
    Image.fromarray(k_of_255(2**31 - 1, np.int32)).save(signed)
    assert Image.open(signed).mode == "I"
    assert_loads_as_0_100_255_3(signed)
    # The same file with its SampleFormat tag (339, SHORT, 1 value) set to unsigned: [0, 2**32 - 1], where
    # Pillow's int32 holds the values above 2**31 - 1 as negative numbers.
    unsigned = tmp_path / "unsigned32.tif"
    Image.fromarray(k_of_255(2**32 - 1, np.uint32).view(np.int32)).save(unsigned)
    tag = struct.pack("<HHI", 339, 3, 1)
    data = unsigned.read_bytes()
    assert data.count(tag + struct.pack("<H", 2)) == 1
    unsigned.write_bytes(data.replace(tag + struct.pack("<H", 2), tag + struct.pack("<H", 1)))
    assert Image.open(unsigned).mode == "I" and Image.open(unsigned).tag_v2[339] == (1,)
    assert_loads_as_0_100_255_3(unsigned)
    negative = tmp_path / "negative.tif"
    Image.fromarray(np.array([[-5, 0], [1, 2]], dtype=np.int32)).save(negative)
    with pytest.raises(ValueError, match=r"negative.tif: a mode I image with values in \[-5, 2\], outside its range"):
        assert_loads_as_0_100_255_3(negative)


def test_image_folder_scales_a_16_bit_png_opened_as_mode_i(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Older Pillow opens 16-bit grey PNGs as mode "I" (not "I;16"): still [0, 65535]."""
    from PIL import Image, PngImagePlugin

    Image.fromarray(k_of_255(65535, np.uint16)).save(tmp_path / "grey16.png")
    monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), ("I", "I;16B"))
    assert Image.open(tmp_path / "grey16.png").mode == "I"
    assert_loads_as_0_100_255_3(tmp_path / "grey16.png")


def test_image_folder_takes_float_images_in_0_1_and_refuses_others(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(k_of_255(1.0, np.float32)).save(tmp_path / "unit.tif")
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    assert_loads_as_0_100_255_3(tmp_path / "unit.tif")
    for name, bad in (("above.tif", 1.5), ("nan.tif", np.nan)):
        Image.fromarray(np.array([[0.0, bad]], dtype=np.float32)).save(tmp_path / name)
        with pytest.raises(ValueError, match=rf"{name}: a mode F image .* outside its range \[0, 1.0\]. Save it"):
            assert_loads_as_0_100_255_3(tmp_path / name)


def test_image_folder_split_seed_fixes_the_hold_out_apart_from_the_shuffle(tmp_path: Path) -> None:
    write_pngs(tmp_path, {"": [(8, 8, (i * 12, 0, 0)) for i in range(20)]})

    def folder(**kwargs: int | None) -> ImageFolderDataModule:
        return ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=5, num_workers=0, val_fraction=0.25,
                                     **kwargs)  # 15 training images: 3 whole batches

    def splits(dm: ImageFolderDataModule) -> list[list[int]]:
        return [index.tolist() for index in dm.split_indices()]

    def keys(dm: ImageFolderDataModule) -> list[str]:
        return [dm.reference_key("test"), dm.reference_key("train")]

    by_seed, same = folder(seed=3), folder(seed=3, split_seed=3)
    assert splits(by_seed) == splits(same) and keys(by_seed) == keys(same)  # null: the seed's split and keys
    a, b = folder(seed=3, split_seed=7), folder(seed=4, split_seed=7)
    assert splits(a) == splits(b) and keys(a) == keys(b)
    assert splits(a) != splits(by_seed) and set(keys(a)).isdisjoint(keys(by_seed))
    for dm in (a, b):
        dm.setup("fit")
    reds = [torch.cat([x[:, 0, 0, 0] for x, _ in dm.train_dataloader()]) for dm in (a, b)]  # red = image number
    assert not torch.equal(*reds) and torch.equal(reds[0].sort().values, reds[1].sort().values)  # shuffled by seed
    with pytest.raises(ValueError, match="split_seed"):
        folder(split_seed=-1)


def test_image_folder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "nope"), image_size=8).prepare_data()
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="No images"):
        ImageFolderDataModule(str(tmp_path), image_size=8).setup("fit")


def test_more_reference_images_than_the_split_holds_warns_and_uses_them_all(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path)  # 6 test images
    dm = FashionMNISTDataModule(root=str(tmp_path))
    with pytest.warns(UserWarning, match="10 reference images were asked for, but the test split holds 6: using all 6"):
        images = dm.reference_images("test", max_images=10)
    assert images.shape[0] == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dm.reference_images("test", max_images=6).shape[0] == 6  # as many as there are: nothing to say


def test_a_model_that_cannot_take_the_images_fails_before_the_files_are_looked_for(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare_data (which may download) asks the attached model to check the data first, under a plain Trainer.fit."""
    from lightning_speed import DiffusionModule
    from lightning_speed.backbones import DiT

    from _fixtures import cpu_trainer, write_image_folder

    def locate(self, download):
        raise AssertionError("the files were looked for before the model checked the data")

    data = ImageFolderDataModule(str(write_image_folder(tmp_path / "images")), image_size=32, num_workers=0)
    monkeypatch.setattr(ImageFolderDataModule, "_locate", locate)
    grey = DiT(in_channels=1, image_size=32, depth=1, hidden_size=32, num_heads=2, patch_size=4)
    with pytest.raises(ValueError, match="(?i)channel"):
        cpu_trainer(max_steps=1).fit(DiffusionModule(grey), datamodule=data)
