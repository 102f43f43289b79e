"""Latent diffusion on the CPU with a tiny random diffusers ``AutoencoderKL`` (the real class): encode ->
cache -> SpeeD steps with learned sigma -> sample -> decode -> a sample grid and an FID point; the cache
read back without the encoder, rebuilt (never mixed, never damaged) when its autoencoder or resolution
differs; and the bad inputs that must fail before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from _fixtures import cpu_trainer, tiny_autoencoder, write_image_folder, write_tiny_autoencoder  # noqa: E402
from lightning_speed import DiffusionModule  # noqa: E402
from lightning_speed.autoencoders import Autoencoder, AutoencoderUnavailable  # noqa: E402
from lightning_speed.backbones import DiT  # noqa: E402
from lightning_speed.callbacks import EMAWeightAveraging, FIDCallback, SampleGridCallback, SpeeD  # noqa: E402
from lightning_speed.data import ImageFolderDataModule, LatentDataModule  # noqa: E402
from lightning_speed.data.latent import draw_latents  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("latent")
    return {"vae": write_tiny_autoencoder(root / "vae"), "other_vae": write_tiny_autoencoder(root / "other_vae", seed=1),
            "images": write_image_folder(root / "images")}


def latent_data(files: dict[str, Path], cache: Path, vae: str = "vae", image_size: int = 32, **kwargs) -> LatentDataModule:
    images = ImageFolderDataModule(str(files["images"]), image_size=image_size, num_workers=0, val_fraction=0.0)
    return LatentDataModule(images, str(files[vae]), cache_dir=str(cache), batch_size=4, **kwargs)


def cache_state(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.iterdir())}


def forbid_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def encode(self, images):
        raise AssertionError("the encoder was called")

    monkeypatch.setattr(Autoencoder, "encode", encode)


def forbid_whole_split(self, split):
    raise AssertionError(f"the whole {split} split was decoded")


def two_class_folder(root: Path) -> Path:
    """9 images in two classes (5 + 4), so that the order of the labels shows."""
    write_image_folder(root / "a", n=5, size=16)
    write_image_folder(root / "b", n=4, size=16)
    return root


# ------------------------------------------------------------------------------------ the pipeline
def test_encode_cache_train_speed_sample_decode_grid_and_fid(files: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    data = latent_data(files, tmp_path / "cache", on_device=True)
    assert data.image_shape == (4, 16, 16) and data.autoencoder.scaling_factor == 0.18215
    backbone = DiT(in_channels=4, image_size=16, learn_sigma=True, depth=1, hidden_size=32, num_heads=2, patch_size=4)
    model = DiffusionModule(backbone, learn_sigma=True, image_shape=data.image_shape)
    fid = FIDCallback(num_samples=6, batch_size=6, solver="ddpm", solver_steps=4, feature_extractor="fashion_mnist",
                      cache_dir=str(tmp_path / "fid"), reference_split="train")
    grid = SampleGridCallback(every_n_steps=100, num_samples=4, solver="ddpm", solver_steps=4, save_dir=str(tmp_path / "grid"))
    speed = SpeeD()
    trainer = cpu_trainer(max_steps=3, callbacks=[speed, EMAWeightAveraging(decay=0.9999), fid, grid])
    with monkeypatch.context() as patch:  # encoding and FID's real statistics stream the folder, never load it whole
        patch.setattr(ImageFolderDataModule, "_load_split", forbid_whole_split)
        trainer.fit(model, datamodule=data)

    assert trainer.global_step == 3 and model.timesteps.sampler is speed.sampling
    assert data.encoder_calls == 2  # one batch of 20 images (encode_batch_size 64), as it is and mirrored
    (step, value), = fid.history
    assert step == 3 and np.isfinite(value)
    assert fid.reference_key.startswith("image_folder-train-n20-3x32x32")  # real images, not latents
    # decoded: 4 images of 32x32 in a 2x2 grid with 2-pixel padding
    assert grid.last_grid.shape == (3, 2 + 2 * 34, 2 + 2 * 34) and grid.saved_paths[0].is_file()
    assert model.output_shape == (3, 32, 32)
    latents = model.sample(2, solver="ddim", solver_steps=3)
    images = model.decode(latents)
    assert latents.shape == (2, 4, 16, 16) and images.shape == (2, 3, 32, 32) and images.abs().max() <= 1

    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    record = meta["record"]
    assert record["flip"] and record["dtype"] == "float16" and record["latent_shape"] == [4, 16, 16]
    assert record["dataset"]["count"] == 20 and record["autoencoder"]["fingerprint"] == data.autoencoder.fingerprint
    posterior = np.load(tmp_path / "cache" / meta["files"]["posterior"], mmap_mode="r")
    assert posterior.shape == (20, 2, 2, 4, 16, 16) and posterior.dtype == np.float16
    # the cached posterior is the autoencoder's: the mirror variant is the flipped image's, the std positive
    image = data.images._split("train")[0][:1].float() / 127.5 - 1
    mean, std = data.autoencoder.encode(image.flip(-1))
    torch.testing.assert_close(torch.from_numpy(posterior[0, 1, 0].astype(np.float32)), mean[0], atol=2e-3, rtol=1e-2)
    assert (posterior[:, :, 1] > 0).all()

    # a second run reads the cache: the encoder is never called, the latents are the same file
    forbid_encoding(monkeypatch)
    before = cache_state(tmp_path / "cache")
    again = latent_data(files, tmp_path / "cache", on_device=False)
    again.setup("fit")
    batch, labels = next(iter(again.train_dataloader()))  # the memory-mapped DataLoader path
    assert batch.shape == (4, 4, 16, 16) and batch.dtype == torch.float32 and labels.dtype == torch.long
    assert again.encoder_calls == 0 and cache_state(tmp_path / "cache") == before


def test_the_host_loaders_workers_are_seeded_per_rank(files: dict[str, Path], tmp_path: Path) -> None:
    """Workers draw each batch's latent noise and flips from seeds the loader's generator gives them: under DDP the
    same generator seed on every rank drew the same noise on every rank. One device keeps its seed."""
    from types import SimpleNamespace

    data = latent_data(files, tmp_path / "cache", on_device=False)
    data.setup("fit")

    def base_seed(rank: int, world: int) -> int:
        strategy = SimpleNamespace(root_device=torch.device("cpu"))
        data.trainer = SimpleNamespace(global_rank=rank, world_size=world, strategy=strategy)
        return iter(data.train_dataloader())._base_seed  # what DataLoader seeds its workers with

    seed = torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(data.seed)).item()
    assert base_seed(0, 1) == base_seed(0, 2) == seed
    assert base_seed(1, 2) != seed


def test_the_on_device_loader_follows_a_changed_batch_size_without_a_new_copy(files: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    data = latent_data(files, tmp_path / "cache", on_device=True)
    data.setup("fit")
    loader = data.train_dataloader()
    posterior = loader.images
    data.batch_size = 8  # as BatchSizeFinder sets it before it asks for the loader again
    again = data.train_dataloader()
    assert again is loader and again.images is posterior
    assert [x.shape[0] for x, _ in again] == [8, 8]  # 20 latents, drop_last


def test_a_fit_resumed_mid_epoch_draws_the_latents_of_an_uninterrupted_one(files: dict[str, Path], tmp_path: Path) -> None:
    """20 latents in batches of 4: 5 steps an epoch, 2 epochs. Resumed after steps 3 (epoch 0) and 7 (epoch 1), the
    loader continues in the epoch's order with the same mirror picks and noise as the uninterrupted run."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            self.seen.append((batch[0].clone(), batch[1].clone()))
            return (self.scale * batch[0]).pow(2).mean()

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def fit(folder: Path, ckpt_path: Path | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        checkpoints = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=1, save_top_k=-1)
        model = Recorder()
        cpu_trainer(max_steps=-1, max_epochs=2, enable_checkpointing=True, callbacks=[checkpoints],
                    default_root_dir=folder).fit(model, latent_data(files, tmp_path / "cache", on_device=True),
                                                 ckpt_path=ckpt_path)
        return model.seen

    reference = fit(tmp_path / "straight")
    assert len(reference) == 10
    for step in (3, 7):
        resumed = fit(tmp_path / f"from-{step}", tmp_path / "straight" / f"step={step}.ckpt")
        assert len(resumed) == 10 - step
        for (z, y), (z_ref, y_ref) in zip(resumed, reference[step:]):
            assert torch.equal(y, y_ref) and torch.equal(z, z_ref)


def test_draws_are_mean_plus_std_noise_times_the_scale_and_pick_a_mirror_half_the_time() -> None:
    posterior = torch.zeros(4000, 2, 2, 1, 1, 1)
    posterior[:, 0, 0], posterior[:, 1, 0] = 1.0, -1.0  # means of the image and of its mirror
    posterior[:, :, 1] = 0.1  # std: the noise (0.1 * 0.2) is 10 standard deviations from 0, so the sign tells the variant
    z = draw_latents(posterior, 0.2, torch.Generator().manual_seed(0), flip=True).flatten()
    mirror = z < 0
    assert abs(mirror.float().mean().item() - 0.5) < 0.05
    assert abs(z[~mirror].mean().item() - 0.2) < 0.002 and abs(z[~mirror].std().item() - 0.02) < 0.002
    unflipped = draw_latents(posterior, 0.2, torch.Generator().manual_seed(0), flip=False)
    assert (unflipped > 0).all()


def test_the_encoding_streams_the_folder_a_batch_at_a_time_into_the_same_cache(
        files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_speed.data.image_folder as image_folder

    folder = two_class_folder(tmp_path / "images")
    decoded, calls = [], []  # files decoded so far; (batch size, files decoded by then) at each encoder call
    load_image, encode = image_folder.load_image, Autoencoder.encode
    monkeypatch.setattr(image_folder, "load_image", lambda *args: decoded.append(1) or load_image(*args))

    def spy(self, images):
        calls.append((images.shape[0], len(decoded)))
        return encode(self, images)

    monkeypatch.setattr(Autoencoder, "encode", spy)

    def build(cache: str, in_memory: bool) -> tuple[dict, np.ndarray, np.ndarray]:
        images = ImageFolderDataModule(str(folder), image_size=16, num_workers=0, val_fraction=0.0)
        if in_memory:
            images.setup("fit")  # the whole split decoded first: what an in-memory data set gives
        data = LatentDataModule(images, str(files["vae"]), cache_dir=str(tmp_path / cache), batch_size=2,
                                encode_batch_size=4)
        with monkeypatch.context() as patch:
            if not in_memory:
                patch.setattr(ImageFolderDataModule, "_load_split", forbid_whole_split)
            data.setup("fit")
        meta = json.loads((tmp_path / cache / "meta.json").read_text())
        return (meta["record"], (tmp_path / cache / meta["files"]["posterior"]).read_bytes(),
                np.load(tmp_path / cache / meta["files"]["labels"]))

    streamed = build("streamed", in_memory=False)
    # batches of 4, 4 and 1 images, each encoded as it is and mirrored, and decoded only when the encoder needs it
    assert calls == [(4, 4), (4, 4), (4, 8), (4, 8), (1, 9), (1, 9)]
    in_memory = build("in_memory", in_memory=True)
    assert streamed[2].tolist() == [0] * 5 + [1] * 4 and np.array_equal(streamed[2], in_memory[2])
    assert streamed[0] == in_memory[0] and streamed[1] == in_memory[1]  # the same record and the same bytes


def test_fid_real_statistics_stream_the_folder_in_batches_with_the_same_result(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_speed.metrics import compute_reference_stats

    class Features(torch.nn.Module):
        def forward(self, images):
            return images.float().flatten(1)[:, :16] / 255

    images = ImageFolderDataModule(str(two_class_folder(tmp_path)), image_size=16, num_workers=0, val_fraction=0.0)
    with monkeypatch.context() as patch:
        patch.setattr(ImageFolderDataModule, "_load_split", forbid_whole_split)
        batches = list(images.reference_batches("train", 7, batch_size=3))
        streamed = compute_reference_stats(iter(batches), Features())
    assert [len(b) for b in batches] == [3, 3, 1]
    whole = images.reference_images("train", 7)  # decodes the folder
    assert torch.equal(torch.cat(batches), whole)
    assert torch.equal(torch.cat(list(images.reference_batches("train", 7, batch_size=3))), whole)  # in memory now
    expected = compute_reference_stats(whole, Features(), batch_size=3)
    assert streamed.num_samples == 7 and torch.equal(streamed.feature_sum, expected.feature_sum)
    assert torch.equal(streamed.feature_cov_sum, expected.feature_cov_sum)
    with pytest.raises(ValueError, match="at least 2 reference images"):
        compute_reference_stats(images.reference_batches("train", 1), Features())


# ------------------------------------------------------------------------------------ rebuilds
def test_cache_is_rebuilt_when_the_autoencoder_or_the_resolution_differs(files: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = latent_data(files, cache, image_size=16)
    first.setup("fit")
    meta = json.loads((cache / "meta.json").read_text())
    other = latent_data(files, cache, vae="other_vae", image_size=16)  # another autoencoder's weights
    assert not other.cache_matches()
    other.setup("fit")
    assert other.encoder_calls > 0
    rebuilt = json.loads((cache / "meta.json").read_text())
    assert rebuilt["record"]["autoencoder"]["fingerprint"] != meta["record"]["autoencoder"]["fingerprint"]
    assert sorted(p.name for p in cache.iterdir()) == sorted(["meta.json", *rebuilt["files"].values()])  # old files gone
    larger = latent_data(files, cache, vae="other_vae", image_size=32)
    assert not larger.cache_matches()
    larger.setup("fit")
    assert larger.encoder_calls > 0
    assert json.loads((cache / "meta.json").read_text())["record"]["latent_shape"] == [4, 16, 16]
    assert latent_data(files, cache, vae="other_vae", image_size=32).cache_matches()


def test_cache_is_rebuilt_when_an_image_changes_at_the_same_name_and_size(files: dict[str, Path], tmp_path: Path) -> None:
    """The key hashes the files' bytes: a name and size (or time stamp) would not show other pixels."""
    from PIL import Image

    folder = {"vae": files["vae"], "images": write_image_folder(tmp_path / "images", n=8, size=16)}
    changed = folder["images"] / "00.png"
    pixels = np.asarray(Image.open(changed))
    Image.fromarray(pixels).save(changed, compress_level=0)  # stored: the file size depends on the image size only
    cache = tmp_path / "cache"
    latent_data(folder, cache, image_size=16).setup("fit")
    before = np.load(cache / json.loads((cache / "meta.json").read_text())["files"]["posterior"])
    stat = changed.stat()
    Image.fromarray(255 - pixels).save(changed, compress_level=0)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even a copy that keeps the time stamps
    assert changed.stat().st_size == stat.st_size and changed.stat().st_mtime_ns == stat.st_mtime_ns
    swapped = latent_data(folder, cache, image_size=16)
    assert not swapped.cache_matches()
    swapped.setup("fit")
    assert swapped.encoder_calls > 0
    after = np.load(cache / json.loads((cache / "meta.json").read_text())["files"]["posterior"])
    assert not np.array_equal(after[0], before[0]) and np.array_equal(after[1:], before[1:])  # the new pixels' latents


def test_a_cache_of_images_decoded_by_other_rules_is_rebuilt(files: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The same files decoded otherwise (e.g. with or without their EXIF orientation) are other images."""
    from lightning_speed.data import image_folder

    cache = tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setattr(image_folder, "DECODING", image_folder.DECODING - 1)
        latent_data(files, cache, image_size=16).setup("fit")
    again = latent_data(files, cache, image_size=16)
    assert not again.cache_matches()
    again.setup("fit")
    assert again.encoder_calls > 0 and latent_data(files, cache, image_size=16).cache_matches()


def test_the_default_cache_folder_is_one_per_record_so_alternating_runs_keep_their_caches(
        files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_speed.data import latent

    monkeypatch.setattr(latent, "DEFAULT_CACHE_ROOT", tmp_path / "latents")

    def default_cache(vae: str, **kwargs) -> LatentDataModule:
        images = ImageFolderDataModule(str(files["images"]), image_size=16, num_workers=0, val_fraction=0.0)
        return LatentDataModule(images, str(files[vae]), batch_size=4, **kwargs)

    first, other = default_cache("vae"), default_cache("other_vae")
    for data in (first, other):
        data.setup("fit")
        assert data.encoder_calls > 0
    folders = {first.cache_folder(), other.cache_folder(), default_cache("vae", random_flip=False).cache_folder(),
               default_cache("vae", cache_dtype="float32").cache_folder()}
    assert len(folders) == 4 and {f.parent for f in folders} == {tmp_path / "latents" / first._dataset_key()}
    forbid_encoding(monkeypatch)
    for vae in ("vae", "other_vae", "vae"):  # each run finds its own cache, whichever ran last
        data = default_cache(vae)
        data.setup("fit")
        assert data.encoder_calls == 0


def test_a_failed_rebuild_leaves_the_existing_cache_intact(files: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    latent_data(files, cache, image_size=16).setup("fit")
    before = cache_state(cache)
    calls = []
    real_encode = Autoencoder.encode

    def fails_midway(self, images):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # an interrupted encoding (Ctrl+C) as much as a failing one
        return real_encode(self, images)

    monkeypatch.setattr(Autoencoder, "encode", fails_midway)
    with pytest.raises(KeyboardInterrupt):
        latent_data(files, cache, vae="other_vae", image_size=16).setup("fit")
    assert cache_state(cache) == before  # no partial file left, the old cache untouched
    monkeypatch.setattr(Autoencoder, "encode", real_encode)
    assert latent_data(files, cache, image_size=16).cache_matches()


def test_an_image_module_that_yields_fewer_images_than_it_counts_leaves_no_cache(files: dict[str, Path], tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The posterior file is allocated for split_size images: rows never written would be cached as latents."""
    cache = tmp_path / "cache"
    data = latent_data(files, cache, image_size=16)
    real_iter = ImageFolderDataModule.iter_split

    def one_short(self, split, batch_size):
        yield from list(real_iter(self, split, batch_size))[:-1]  # the last batch goes missing

    monkeypatch.setattr(ImageFolderDataModule, "iter_split", one_short)
    with pytest.raises(RuntimeError, match=r"iter_split\('train'\) yielded \d+ images but its split_size\('train'\) is "
                                           r"20: make the two agree; no cache was written"):
        data.setup("fit")
    assert not cache.exists() or not [p for p in cache.rglob("meta.json")]


def test_a_new_build_removes_the_files_of_a_build_killed_on_this_host_and_only_those(files: dict[str, Path],
                                                                                    tmp_path: Path) -> None:
    """SIGKILL skips the cleanup of a build; the next build on the same host removes what the dead process left.
    Files of a live process or of another host (a shared filesystem) stay."""
    import socket
    import subprocess
    import sys

    cache = tmp_path / "cache"
    latent_data(files, cache, image_size=16).setup("fit")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    killed = [cache / f"posterior-aaaa.npy.{dead.pid}@{host}.partial", cache / f"meta-aaaa.json.{dead.pid}@{host}.partial"]
    kept = [cache / f"posterior-bbbb.npy.{os.getpid()}@{host}.partial", cache / f"posterior-cccc.npy.{dead.pid}@other-{host}.partial"]
    for path in killed + kept:
        path.write_bytes(b"x" * 10)
    latent_data(files, cache, vae="other_vae", image_size=16).setup("fit")  # another autoencoder: a new build
    assert [p.exists() for p in killed + kept] == [False, False, True, True]
    assert not [p for p in cache.glob("*.partial") if p not in kept]  # the new build's own files are gone too


def test_a_killed_builds_files_are_removed_also_when_the_cache_in_place_is_read(files: dict[str, Path], tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild killed midway leaves a posterior file as large as the cache; a run that goes back to the settings of
    the cache in place reads that cache (no new build) and still removes the dead build's files."""
    import socket
    import subprocess
    import sys

    cache = tmp_path / "cache"
    latent_data(files, cache, image_size=16).setup("fit")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = cache / f"posterior-dddd.npy.{dead.pid}@{socket.gethostname()}.partial"
    leftover.write_bytes(b"x" * 10)
    forbid_encoding(monkeypatch)
    latent_data(files, cache, image_size=16).setup("fit")
    assert not leftover.exists()


@pytest.mark.parametrize("damaged", ["posterior", "labels"])
def test_a_cut_off_cache_file_is_named_and_the_cache_rebuilt(files: dict[str, Path], tmp_path: Path,
                                                            damaged: str) -> None:
    """A cache file shorter than its .npy header announces (a copy or disk that did not finish) is not read: a warning
    names it, the images are encoded again, and the damaged files are gone."""
    cache = tmp_path / "cache"
    latent_data(files, cache, image_size=16).setup("fit")
    name = json.loads((cache / "meta.json").read_text())["files"][damaged]
    whole = (cache / name).read_bytes()
    (cache / name).write_bytes(whole[: len(whole) - 40])
    again = latent_data(files, cache, image_size=16)
    with pytest.warns(UserWarning, match=rf"the cached {cache / name} looks cut off or corrupt \(it holds [\d,]+ of the "
                                         rf"[\d,]+ bytes its header announces\): encoding the images again"):
        again.setup("fit")
    assert again.encoder_calls > 0 and not (cache / name).exists()
    rebuilt = json.loads((cache / "meta.json").read_text())["files"]
    assert sorted(p.name for p in cache.iterdir()) == sorted(["meta.json", *rebuilt.values()])
    assert latent_data(files, cache, image_size=16).cache_matches()


def test_a_cut_off_autoencoder_weights_file_is_named(files: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "vae"
    shutil.copytree(files["vae"], copy)
    weights = copy / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AutoencoderUnavailable, match=rf"{weights} looks cut off or corrupt \(it holds .* bytes its "
                                                     r"header announces\): download or copy it again"):
        Autoencoder.load(str(copy))
    weights.write_bytes(b"\x10\x00")  # not even the header's length
    with pytest.raises(AutoencoderUnavailable, match=r"looks cut off or corrupt \(2 bytes, shorter than its header\)"):
        Autoencoder.load(str(copy))


def test_images_to_download_are_downloaded_before_the_cache_counts_them(files: dict[str, Path], tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    from _fixtures import write_fake_cifar
    from lightning_speed.data import CIFAR10DataModule

    class FakeCIFAR10:  # stands in for the network: writes the files where torchvision would
        def __init__(self, root: str, train: bool, download: bool) -> None:
            write_fake_cifar(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    for step in ("prepare_data", "setup"):  # under a Trainer, and outside one
        images = CIFAR10DataModule(root=str(tmp_path / step), download=True, num_workers=0)
        data = LatentDataModule(images, str(files["vae"]), cache_dir=str(tmp_path / f"cache_{step}"), batch_size=4)
        getattr(data, step)()
        assert data.encoder_calls > 0 and data.cache_matches()


def test_on_device_auto_is_one_decision_for_every_rank(files: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Free memory differs between GPUs; a rank that alone chose the device loader would draw other shards."""
    from types import SimpleNamespace

    class Strategy:
        def __init__(self, others: bool) -> None:
            self.others = others

        def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
            return decision and self.others if all else decision or self.others

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**9, 10**9))  # room on this GPU
    data = latent_data(files, tmp_path / "cache", image_size=16)
    for others, expected in ((True, True), (False, False)):
        data.trainer = SimpleNamespace(strategy=Strategy(others))
        assert data._keep_on_device(torch.device("cuda", 0), 10**6) is expected


def test_a_cache_dir_that_is_a_file_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    taken = tmp_path / "notes.txt"
    taken.write_text("not a folder")
    with pytest.raises(ValueError, match=rf"LatentDataModule.cache_dir is {taken}, which is a file, not a folder"):
        latent_data(files, taken, image_size=16)
    with pytest.raises(ValueError, match=rf"FIDCallback.cache_dir is {taken}, which is a file, not a folder"):
        FIDCallback(cache_dir=str(taken))


# ------------------------------------------------------------------------------------ bad input
def test_an_autoencoder_folder_that_does_not_exist_or_lacks_weights(tmp_path: Path) -> None:
    with pytest.raises(AutoencoderUnavailable, match="does not exist") as err:
        Autoencoder.load(str(tmp_path / "no_such_vae"))
    assert "config.json and diffusion_pytorch_model.safetensors" in str(err.value)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text("{}")
    with pytest.raises(AutoencoderUnavailable, match=r"lacks diffusion_pytorch_model\.safetensors"):
        Autoencoder.load(str(only_config))
    with pytest.raises(AutoencoderUnavailable, match="does not exist"):  # a subfolder that is not there
        Autoencoder.load(str(only_config), subfolder="vae")


def test_a_hub_name_offline_without_a_cached_copy_says_which_files_to_place_where(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AutoencoderUnavailable) as err:
        Autoencoder.load("lightning-speed-tests/no-such-vae", subfolder="vae")
    message = str(err.value)
    assert "HF_HUB_OFFLINE" in message and "vae/config.json and vae/diffusion_pytorch_model.safetensors" in message


def test_images_the_autoencoder_cannot_take_fail_before_any_encoding(files: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_encoding(monkeypatch)
    with pytest.raises(ValueError, match="multiples of 2; these are 31x31"):
        latent_data(files, tmp_path / "cache", image_size=31)
    grey = ImageFolderDataModule(str(files["images"]), image_size=32, channels=1, num_workers=0)
    with pytest.raises(ValueError, match="takes 3-channel images, but the images have 1"):
        LatentDataModule(grey, str(files["vae"]), cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_trainer_fit_refuses_a_backbone_that_cannot_take_the_latents_before_encoding(
        files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the CLI too: LatentDataModule.prepare_data asks the model to check its data before the encoding."""
    forbid_encoding(monkeypatch)
    data = latent_data(files, tmp_path / "cache")  # 4x16x16 latents
    pixels = DiT(in_channels=3, image_size=32, depth=1, hidden_size=32, num_heads=2, patch_size=4)
    with pytest.raises(ValueError, match="(?i)channel"):
        cpu_trainer(max_steps=1).fit(DiffusionModule(pixels), datamodule=data)
    assert not list((tmp_path / "cache").rglob("*.npy*"))  # nothing encoded, no partial file


def test_an_autoencoder_instance_and_a_pixel_model_decode() -> None:
    vae = tiny_autoencoder()
    autoencoder = Autoencoder.load(vae)
    assert autoencoder.vae is vae and autoencoder.latent_shape((3, 32, 32)) == (4, 16, 16)
    assert Autoencoder.load(autoencoder, scaling_factor=0.5).scaling_factor == 0.5
    pixels = DiffusionModule(DiT(in_channels=1, image_size=8, depth=1, hidden_size=32, num_heads=2, patch_size=4),
                             image_shape=(1, 8, 8))
    x = torch.randn(2, 1, 8, 8)
    assert pixels.decode(x) is x and pixels.output_shape == (1, 8, 8)
    latent = DiffusionModule(DiT(in_channels=4, image_size=16, depth=1, hidden_size=32, num_heads=2, patch_size=4),
                             image_shape=(4, 16, 16))
    latent.autoencoder = autoencoder  # as after loading a checkpoint
    assert "autoencoder" not in dict(latent.named_children()) and latent.output_shape == (3, 32, 32)
    assert not any(k.startswith("autoencoder") for k in latent.state_dict())
    assert latent.decode(torch.randn(3, 4, 16, 16), batch_size=2).shape == (3, 3, 32, 32)


def configured_autoencoder(**config: object) -> torch.nn.Module:
    """The tiny autoencoder's weights under a config with ``config``'s entries as well."""
    from diffusers import AutoencoderKL

    vae = tiny_autoencoder()
    keys = ("block_out_channels", "down_block_types", "up_block_types", "norm_num_groups", "latent_channels",
            "sample_size", "layers_per_block")
    other = AutoencoderKL(**{k: vae.config[k] for k in keys}, **config)
    other.load_state_dict(vae.state_dict())
    return other.eval()


def shifted_autoencoder() -> torch.nn.Module:
    """An SD3-style config: latents are (z - shift_factor) * scaling_factor."""
    return configured_autoencoder(scaling_factor=1.5, shift_factor=0.5)


def test_a_shift_factor_is_subtracted_before_the_scale_and_added_back_when_decoding() -> None:
    """As diffusers' pipelines use such an autoencoder: latents (z - shift) * scale, decoded from
    latents / scale + shift."""
    vae = shifted_autoencoder()
    autoencoder = Autoencoder(vae)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = autoencoder.encode(x)
    posterior = torch.stack([mean, std], dim=1)[:, None]  # one variant: (B, 1, 2, C, h, w)
    ours = draw_latents(posterior, autoencoder.scaling_factor, torch.Generator().manual_seed(0), False,
                        autoencoder.shift_factor)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0))  # the same eps
        expected = (z - 0.5) * 1.5
        decoded = vae.decode(expected / 1.5 + 0.5).sample.clamp(-1, 1)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(autoencoder.decode(expected), decoded)


@pytest.mark.parametrize("on_device", [True, False])
def test_both_training_loaders_shift_the_latents(tmp_path: Path, on_device: bool) -> None:
    """Four copies of one image, so every row of the cache is the same posterior N(mean, std^2) whatever the order:
    (latent / scale + shift - mean) / std is then standard normal. Its average over the 4 * 4 * 16 * 16 = 4096
    values of a batch has standard deviation 1 / 64; 5 of those (0.078) is far below the 0.5 / std a missing shift
    would add to every value (std < 2 here)."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for i in range(4):
        Image.fromarray(image).save(tmp_path / "images" / f"{i}.png")
    images = ImageFolderDataModule(str(tmp_path / "images"), image_size=32, num_workers=0, val_fraction=0.0)
    data = LatentDataModule(images, shifted_autoencoder(), cache_dir=str(tmp_path / "cache"), batch_size=4,
                            random_flip=False, on_device=on_device)
    data.setup("fit")
    latents, _ = next(iter(data.train_dataloader()))
    mean, std = data.autoencoder.encode(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1)
    assert std.max() < 2
    scores = (latents / 1.5 + 0.5 - mean) / std
    assert abs(scores.mean().item()) < 5 / 64 and abs(scores.std().item() - 1) < 0.1


def test_per_channel_latent_statistics_are_refused() -> None:
    vae = configured_autoencoder(latents_mean=(0.1,) * 4, latents_std=(2.0,) * 4)
    with pytest.raises(ValueError, match="sets latents_mean and latents_std .* use an autoencoder without them"):
        Autoencoder(vae)


def test_a_hub_download_without_network_is_named_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub client reports a missing network as a missing config.json raised from the connection error: the
    message names the connection, not the file."""
    import diffusers

    def offline(name, **kwargs):
        if kwargs.get("local_files_only"):
            raise OSError("not in the local cache")
        try:
            raise ConnectionError("Failed to resolve 'huggingface.co'")
        except ConnectionError as err:
            raise OSError(f"{name} does not appear to have a file named config.json.") from err

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(AutoencoderUnavailable, match=r"not from the Hugging Face hub either \(no connection to the hub: "
                                                     r"ConnectionError\)\. Put config.json and diffusion_pytorch_model.safetensors"):
        Autoencoder.load("lightning-speed-tests/no-such-vae")
    from lightning_speed.autoencoders import download_failure

    assert download_failure(OSError("Repository Not Found\nmore")) == "download failed: Repository Not Found"
