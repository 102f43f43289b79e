"""Cache keys that must tell real-image sets apart, and feature networks that must give features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_speed.data import FashionMNISTDataModule
from lightning_speed.metrics import FashionMNISTFeatureNet, FashionMNISTFeatures, resolve_feature_extractor

from test_data import write_fake_fashion  # pytest puts tests/ on sys.path (no __init__.py there)


def test_first_images_of_two_training_subsets_have_their_own_keys(tmp_path: Path) -> None:
    """The first 5 images of a 10-image subset and of a 30-image subset differ, so their FID statistics must not
    share a cache entry."""
    write_fake_fashion(tmp_path, n_train=40, n_test=6)
    small = FashionMNISTDataModule(root=str(tmp_path), val_images=6, train_subset=10)
    large = FashionMNISTDataModule(root=str(tmp_path), val_images=6, train_subset=30)
    assert not torch.equal(small.reference_images("train", 5), large.reference_images("train", 5))
    assert small.reference_key("train", 5) != large.reference_key("train", 5)
    same = FashionMNISTDataModule(root=str(tmp_path), val_images=6, train_subset=10)
    assert torch.equal(small.reference_images("train", 5), same.reference_images("train", 5))
    assert small.reference_key("train", 5) == same.reference_key("train", 5)
    assert small.reference_key("test") == large.reference_key("test")  # the same test images


@pytest.mark.parametrize("how", ["module", "import path"])
def test_the_fashion_feature_net_given_as_a_module_gives_its_features_not_its_logits(how: str) -> None:
    """``forward`` of the shipped net returns 10 class logits; as a feature extractor it must give the 256-d
    penultimate features, exactly as ``feature_extractor="fashion_mnist"`` does."""
    torch.manual_seed(0)
    net = FashionMNISTFeatureNet().eval()
    if how == "module":
        spec = net
    else:
        spec = "lightning_speed.metrics.load_fashion_mnist_feature_net"
        net = resolve_feature_extractor("fashion_mnist").net
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    for shape in (None, (1, 32, 32)):
        extractor = resolve_feature_extractor(spec, shape)
        assert isinstance(extractor, FashionMNISTFeatures)
        features = extractor(images)
        assert features.shape == (3, 256) and extractor.num_features == 256
        torch.testing.assert_close(features, net.features(images), rtol=0, atol=0)
    if how == "import path":  # the same weights as the "fashion_mnist" choice: the same cache entry
        assert extractor.fingerprint == resolve_feature_extractor("fashion_mnist").fingerprint


def test_fid_reloads_the_real_statistics_for_another_datamodule(tmp_path: Path) -> None:
    """A ``validate`` (or ``fit``) on a trainer whose FIDCallback was set up for one data set, with another
    datamodule, must compare with the new real images, not the statistics of the first."""
    from lightning_speed.data.embedded import EmbeddedFashionMNISTDataModule
    from lightning_speed.metrics.reference import compute_reference_stats

    from test_fid_callback import TinyGenerator, fid_callback, make_trainer

    write_fake_fashion(tmp_path / "fake", n_train=12, n_test=6)
    first = EmbeddedFashionMNISTDataModule(batch_size=8, val_images=6)
    other = FashionMNISTDataModule(root=str(tmp_path / "fake"), batch_size=4, val_images=6)
    fid = fid_callback(tmp_path, on_train_end=False, num_reference=6)
    trainer = make_trainer(tmp_path, [fid], max_steps=1)
    model = TinyGenerator()
    trainer.fit(model, datamodule=first)
    metric = fid._fid
    trainer.validate(model, datamodule=first)
    assert fid._fid is metric  # the same real images: nothing reloaded
    trainer.validate(model, datamodule=other)
    assert fid.reference_key.startswith("fashion_mnist-test-n6-")
    expected = compute_reference_stats(other.reference_images("test", 6), fid._extractor)
    torch.testing.assert_close(fid._fid.real_features_sum.cpu(), expected.feature_sum, rtol=1e-12, atol=1e-9)
    assert int(fid._fid.real_features_num_samples) == 6
