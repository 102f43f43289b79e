"""Image folders reached through linked folders, and Inception weights files that are not the published ones."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_speed.data.image_folder import scan_image_folder
from lightning_speed.metrics import features as features_module
from lightning_speed.metrics.features import InceptionWeightsUnavailable, resolve_feature_extractor


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(path)


def test_linked_class_folders_are_scanned_and_a_link_loop_is_not(tmp_path: Path) -> None:
    """A class folder that is a link to where its images live is a class like any other; a link back up to a folder
    above it is not walked again (that would never end)."""
    _png(tmp_path / "elsewhere" / "cats" / "a.png")
    _png(tmp_path / "data" / "dogs" / "b.png")
    os.symlink(tmp_path / "elsewhere" / "cats", tmp_path / "data" / "cats")
    os.symlink(tmp_path / "data", tmp_path / "data" / "dogs" / "up")  # a loop
    _png(tmp_path / "data" / ".hidden" / "c.png")
    paths, labels, classes = scan_image_folder(tmp_path / "data")
    assert [p.relative_to(tmp_path / "data").as_posix() for p in paths] == ["cats/a.png", "dogs/b.png"]
    assert classes == ("cats", "dogs")
    assert labels.tolist() == [0, 1]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The torch hub folder in tmp_path; the path the weights file belongs at."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints" / features_module.INCEPTION_FILENAME


def test_a_weights_file_that_is_not_inception_names_the_file_and_the_fix(hub: Path, monkeypatch) -> None:
    """A page a proxy served instead of the weights, put where they belong, fails with the file named and the
    fix, not with a bare unpickling error."""
    hub.parent.mkdir(parents=True)
    hub.write_text("<html>sign in to the network</html>")
    monkeypatch.setattr(features_module, "_download", lambda url, dst, timeout: pytest.fail("no download expected"))
    with pytest.raises(InceptionWeightsUnavailable) as info:
        resolve_feature_extractor("inception")
    message = str(info.value)
    assert f"{hub} is not the InceptionV3 weights file" in message
    assert f"Put it at: {hub}" in message and features_module.INCEPTION_URL in message
    assert "feature_extractor: fashion_mnist" in message


def test_a_download_that_is_not_the_published_file_is_refused_and_removed(hub: Path, monkeypatch) -> None:
    def portal(url: str, dst: Path, timeout: float) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text("<html>sign in to the network</html>")

    monkeypatch.setattr(features_module, "_download", portal)
    with pytest.raises(InceptionWeightsUnavailable, match="not the published file") as info:
        features_module.ensure_inception_weights()
    assert f"Put it at: {hub}" in str(info.value)
    assert not hub.exists()  # the next run tries again instead of loading the page


def test_a_download_with_the_published_hash_is_kept(hub: Path, monkeypatch) -> None:
    def fetch(url: str, dst: Path, timeout: float) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(b"weights")

    monkeypatch.setattr(features_module, "_download", fetch)
    monkeypatch.setattr(features_module, "_sha256_prefix", lambda path: features_module.INCEPTION_SHA256_PREFIX)
    assert features_module.ensure_inception_weights() == hub and hub.read_bytes() == b"weights"


def test_the_hash_checked_is_the_sha256_prefix_in_the_file_name(tmp_path: Path) -> None:
    """torch hub names a file by its sha256's first hex digits; the check reads the same digits."""
    import hashlib

    path = tmp_path / "f"
    path.write_bytes(b"abc" * 1000)
    expected = hashlib.sha256(b"abc" * 1000).hexdigest()[:8]
    assert features_module._sha256_prefix(path) == expected
    assert features_module.INCEPTION_SHA256_PREFIX == "6726825d"


def test_a_dropped_connection_mid_download_is_an_offline_error(hub: Path, monkeypatch) -> None:
    import http.client

    def dropped(url: str, dst: Path, timeout: float) -> None:
        raise http.client.IncompleteRead(b"partial")

    monkeypatch.setattr(features_module, "_download", dropped)
    with pytest.raises(InceptionWeightsUnavailable, match="download failed"):
        features_module.ensure_inception_weights()
    assert isinstance(urllib.error.URLError("x"), OSError)  # the other failures are OSErrors, caught alike
