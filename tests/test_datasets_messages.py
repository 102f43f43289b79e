"""Data errors that name their file and a fix that applies: an oversized image, a failed CIFAR-10 download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def test_an_image_too_large_for_pillow_names_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's decompression-bomb refusal is not an OSError: it escaped without the file's path."""
    from PIL import Image

    from lightning_speed.data.image_folder import load_image

    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1024 pixels is more than twice the limit
    with pytest.raises(ValueError, match=rf"{path}: .*Resize the image, or raise PIL.Image.MAX_IMAGE_PIXELS"):
        load_image(path, image_size=16, channels=1)


def test_a_failed_cifar_download_does_not_advise_turning_download_on(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    from lightning_speed.data import CIFAR10DataModule

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    data = CIFAR10DataModule(root=str(tmp_path), download=True)
    with pytest.raises(RuntimeError, match="failed: network unreachable. Check the network, or point root at") as err:
        data.prepare_data()
    assert "set download: true" not in str(err.value)
