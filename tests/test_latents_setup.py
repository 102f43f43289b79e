"""Setting up the paper's latent recipe by hand: where the autoencoder's files must go when they are missing (a
folder named like a hub repository, as docs/latents.md's ``vae/sd-vae-ft-ema``, or the weights file given for its
folder), and settings that would fail only after the encoding, refused before it."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from _fixtures import write_image_folder, write_tiny_autoencoder  # noqa: E402
from lightning_speed.autoencoders import Autoencoder, AutoencoderUnavailable  # noqa: E402
from lightning_speed.data import ImageFolderDataModule, LatentDataModule  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("latents_setup")
    return {"vae": write_tiny_autoencoder(root / "vae"), "images": write_image_folder(root / "images", n=8, size=16)}


def forbid_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def encode(self, images):
        raise AssertionError("the encoder was called")

    monkeypatch.setattr(Autoencoder, "encode", encode)


@pytest.mark.parametrize("subfolder", [None, "vae"])
def test_a_missing_folder_named_like_a_hub_repository_names_the_folder_and_a_download_that_fills_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, subfolder: str | None) -> None:
    """The message's download command, run where there is network, writes the files where the load looks for them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AutoencoderUnavailable) as err:
        Autoencoder.load("vae/sd-vae-ft-ema", subfolder=subfolder)
    message = str(err.value)
    folder = tmp_path / "vae" / "sd-vae-ft-ema"
    assert f"there is no folder {str(folder)!r}" in message and "huggingface-cli download vae" not in message
    command = shlex.split(message.split("e.g. where there is network: ", 1)[1].split(" (", 1)[0])
    prefix = f"{subfolder}/" if subfolder else ""
    assert command == ["hf", "download", "vae/sd-vae-ft-ema", f"{prefix}config.json",
                       f"{prefix}diffusion_pytorch_model.safetensors", "--local-dir", str(folder)]
    write_tiny_autoencoder(folder / subfolder if subfolder else folder)  # what that download writes
    assert Autoencoder.load("vae/sd-vae-ft-ema", subfolder=subfolder).latent_channels == 4


def test_a_weights_file_given_for_its_folder_is_named_with_the_folder_to_set(files: dict[str, Path]) -> None:
    weights = files["vae"] / "diffusion_pytorch_model.safetensors"
    with pytest.raises(AutoencoderUnavailable, match=rf"The autoencoder '{weights}' is a file; it must be the folder "
                                                     rf"that holds .*: set the autoencoder to '{files['vae']}'"):
        Autoencoder.load(str(weights))


def test_a_missing_folder_names_where_the_files_go(tmp_path: Path) -> None:
    with pytest.raises(AutoencoderUnavailable, match=rf"in one folder and set the autoencoder to that folder "
                                                     rf"\({tmp_path / 'no_vae'}\)"):
        Autoencoder.load(str(tmp_path / "no_vae"))


def test_negative_num_workers_is_refused_before_any_encoding(files: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The DataLoader that would refuse it is built after the encoding."""
    forbid_encoding(monkeypatch)
    images = ImageFolderDataModule(str(files["images"]), image_size=16, num_workers=0, val_fraction=0.0)
    with pytest.raises(ValueError, match="num_workers must be an integer of at least 0"):
        LatentDataModule(images, str(files["vae"]), cache_dir=str(tmp_path / "cache"), batch_size=2, num_workers=-1)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("world_size, batch_size, message", [
    (1, 9, r"8 training images is fewer than batch_size=9: lower batch_size to at most 8"),
    (4, 3, r"8 training images \(2 per process on 4 processes\) is fewer than batch_size=3: lower batch_size to at "
           r"most 2"),
])
def test_too_few_images_for_a_batch_per_process_are_refused_before_any_encoding(
        files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world_size: int, batch_size: int,
        message: str) -> None:
    """Each process takes its 8 // world_size images in full batches (drop_last): fewer than one batch trains on
    nothing, and on the host loader silently so."""
    from types import SimpleNamespace

    forbid_encoding(monkeypatch)
    images = ImageFolderDataModule(str(files["images"]), image_size=16, num_workers=0, val_fraction=0.0)
    data = LatentDataModule(images, str(files["vae"]), cache_dir=str(tmp_path / "cache"), batch_size=batch_size)
    if world_size > 1:
        data.trainer = SimpleNamespace(world_size=world_size, lightning_module=None)
    with pytest.raises(ValueError, match=message):
        data.prepare_data() if world_size > 1 else data.setup("fit")
    assert not list(tmp_path.rglob("*.npy*"))
