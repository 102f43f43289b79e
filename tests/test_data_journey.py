"""A user's own image folder through ImageFolderDataModule: the mistakes a first run meets (a file that does not
decode, too few images for a batch) fail with a short error before the costly work, and unusual image files decode."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import lightning_speed.data.image_folder as image_folder
from lightning_speed.data import ImageFolderDataModule
from lightning_speed.data.image_folder import load_image


def folder_of(root: Path, n: int, size: int = 8) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (size, size), (10 * i, 0, 0)).save(root / f"{i:02d}.png")
    return root


def test_a_file_that_does_not_decode_is_named_without_a_worker_traceback(tmp_path: Path) -> None:
    """With decoding workers (the default is 4), the error is the file's own message, not the DataLoader's
    "Caught ValueError in DataLoader worker process" with a traceback pasted into it."""
    root = folder_of(tmp_path / "images", 4)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    data = ImageFolderDataModule(str(root), image_size=8, num_workers=1, batch_size=2, val_fraction=0.0)
    with pytest.raises(ValueError) as info:
        data.setup("fit")
    message = str(info.value)
    assert message.startswith(f"{root / 'broken.jpg'}: cannot decode image") and "Fix or delete the file" in message
    assert "worker" not in message and "Traceback" not in message


@pytest.mark.parametrize(("on_device", "world", "batch_size", "message"), [
    (False, 1, 10, r"9 training images is fewer than batch_size=10: lower batch_size to at most 9"),
    # 9 images on 2 ranks: the host loader's sampler gives each 5 (padded), the on-device loader 4
    (False, 2, 6, r"9 training images \(5 per process on 2 processes\) is fewer than batch_size=6: lower batch_size "
                  r"to at most 5"),
    (True, 2, 5, r"9 training images \(4 per process on 2 processes\) is fewer than batch_size=5: lower batch_size "
                 r"to at most 4"),
])  # fmt: skip
def test_too_few_training_images_for_a_batch_fail_before_any_image_is_decoded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_device: bool, world: int, batch_size: int,
        message: str) -> None:
    root = folder_of(tmp_path / "images", 10)  # 9 training images, 1 held out
    data = ImageFolderDataModule(str(root), image_size=8, num_workers=0, batch_size=batch_size, on_device=on_device)
    data.trainer = SimpleNamespace(global_rank=0, world_size=world)  # what setup reads of the Trainer

    def no_decoding(*args: object) -> None:
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(image_folder, "load_image", no_decoding)
    with pytest.raises(ValueError, match=message):
        data.setup("fit")


def test_a_batch_of_all_the_training_images_still_sets_up(tmp_path: Path) -> None:
    root = folder_of(tmp_path / "images", 10)
    data = ImageFolderDataModule(str(root), image_size=8, num_workers=0, batch_size=9)
    data.trainer = SimpleNamespace(global_rank=0, world_size=1)
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (9, 3, 8, 8) and labels.tolist() == [0] * 9


def test_a_lab_tiff_decodes_to_grey_as_its_rgb_does(tmp_path: Path) -> None:
    """Pillow converts a Lab image to RGB but not to grey; the grey value is the luma of its RGB conversion."""
    path = tmp_path / "lab.tif"
    Image.new("RGB", (12, 8), (200, 30, 10)).convert("LAB").save(path)
    rgb = load_image(path, 4, 3)
    with Image.open(path) as img:
        grey = np.asarray(img.convert("RGB").convert("L"))[0, 0]
    assert np.array_equal(load_image(path, 4, 1), np.full((1, 4, 4), grey, np.uint8))
    assert abs(int(rgb[0, 0, 0]) - 200) <= 2 and abs(int(rgb[1, 0, 0]) - 30) <= 2  # Lab round trip: rounding only


def test_a_loose_image_beside_class_folders_warns_that_every_label_is_0(tmp_path: Path) -> None:
    """A stray image at the top of a folder of class folders turns off the class labels; that is said, not silent."""
    root = tmp_path / "images"
    folder_of(root / "cats", 2)
    folder_of(root / "dogs", 2)
    Image.new("RGB", (8, 8)).save(root / "preview.png")
    data = ImageFolderDataModule(str(root), image_size=8, num_workers=0)
    with pytest.warns(UserWarning, match=r"1 image\(s\) sit directly in it \(e\.g\. preview\.png\) beside 4 in "
                                         r"subfolders, so the subfolders are not classes and every label is 0"):
        assert data.num_classes == 1
    (root / "preview.png").unlink()
    assert ImageFolderDataModule(str(root), image_size=8, num_workers=0).class_names == ("cats", "dogs")


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"on_device": "auto"}, TypeError, r"on_device must be true or false.*'auto'"),  # "auto" read as true
    ({"on_device": "false"}, TypeError, r"on_device must be true or false.*'false'"),
    ({"random_flip": 1}, TypeError, r"random_flip must be true or false"),
    ({"image_size": 32.0}, TypeError, r"image_size must be an integer, got 32.0"),  # failed deep inside Pillow
    ({"batch_size": 0}, ValueError, r"batch_size must be an integer of at least 1"),
    ({"num_workers": 1.5}, TypeError, r"num_workers must be an integer"),
])
def test_image_module_arguments_of_the_wrong_kind_are_refused_when_built(tmp_path: Path, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        ImageFolderDataModule(str(tmp_path), **{"image_size": 8, **kwargs})
