"""Tests for lightning_speed.metrics: the Fashion-MNIST feature net, extractor resolution, the Inception
offline error, FID behaviour on real images and the reference-statistics cache."""

from __future__ import annotations

import json
import sys
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from lightning_speed.data.embedded import EmbeddedFashionMNISTDataModule, load_embedded_subset
from lightning_speed.metrics import (
    CustomFeatures,
    FashionMNISTFeatureNet,
    FashionMNISTFeatures,
    InceptionWeightsUnavailable,
    compute_reference_stats,
    ensure_inception_weights,
    fashion_mnist_net_info,
    load_fashion_mnist_feature_net,
    load_or_compute_reference_stats,
    resolve_feature_extractor,
    to_uint8,
)
from lightning_speed.metrics import features as features_module
from lightning_speed.metrics.features import fashion_mnist_weights_path
from lightning_speed.metrics.reference import cache_file

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    """1000 real Fashion-MNIST test images (uint8, 1x32x32, padded like the training data)."""
    return EmbeddedFashionMNISTDataModule().reference_images("test", 1000)


@pytest.fixture(scope="module")
def extractor() -> FashionMNISTFeatures:
    return resolve_feature_extractor("fashion_mnist")


def fid_against(stats, extractor, fake: torch.Tensor) -> float:
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    metric.real_features_sum = stats.feature_sum
    metric.real_features_cov_sum = stats.feature_cov_sum
    metric.real_features_num_samples = torch.tensor(stats.num_samples)
    metric.update(fake, real=False)
    return float(metric.compute())


# ----------------------------------------------------------------------------- the feature network
def test_feature_net_input_conventions() -> None:
    torch.manual_seed(0)
    net = FashionMNISTFeatureNet().eval()
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    padded = F.pad(x, (2, 2, 2, 2), value=0)
    as_float = padded.float() / 127.5 - 1
    f28, f32, ffloat = net.features(x), net.features(padded), net.features(as_float)
    f_rgb = net.features(padded.expand(-1, 3, -1, -1))
    assert f28.shape == (4, net.num_features) == (4, 256)
    torch.testing.assert_close(f28, f32)  # 28x28 is padded with black, like the training data
    torch.testing.assert_close(f32, ffloat)  # uint8 and [-1, 1] floats mean the same images
    torch.testing.assert_close(f32, f_rgb)  # 3 channels are averaged
    assert net(padded).shape == (4, 10)
    with pytest.raises(ValueError, match="channels"):
        net.features(torch.zeros(1, 2, 32, 32))


def test_shipped_weights_small_accurate_and_documented() -> None:
    path = fashion_mnist_weights_path()
    assert path.stat().st_size < 2 * 1024 * 1024
    info = fashion_mnist_net_info()
    assert info["accuracy"] >= 0.92
    assert {"accuracy", "epochs", "seed", "date", "command"} <= set(info)
    assert json.loads(path.with_suffix(".json").read_text()) == info
    net = load_fashion_mnist_feature_net()
    subset = load_embedded_subset()  # 1000 held-out test images, 28x28 (the net pads them)
    images = torch.from_numpy(subset["test_images"]).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(subset["test_labels"]).long()
    with torch.no_grad():
        accuracy = (net(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.88, accuracy  # 1000 held-out test images; the full test set is recorded in the JSON


def test_to_uint8_maps_range() -> None:
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])
    assert to_uint8(x.view(1, 1, 1, 5)).flatten().tolist() == [0, 0, 128, 255, 255]


# ----------------------------------------------------------------------------- resolution
class NoNumFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 7)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(images.float(), 2).flatten(1)[:, :4]
        return self.proj(pooled)


def test_resolve_module_import_path_and_file(tmp_path) -> None:
    custom = resolve_feature_extractor(NoNumFeatures(), (1, 32, 32))
    assert isinstance(custom, CustomFeatures) and custom.num_features == 7
    assert not any(p.requires_grad for p in custom.parameters())
    assert custom(torch.zeros(3, 1, 32, 32, dtype=torch.uint8)).shape == (3, 7)

    by_path = resolve_feature_extractor("lightning_speed.metrics.fashion_net.FashionMNISTFeatureNet", (1, 32, 32))
    assert by_path.num_features == 256  # the net's features, not the 10 logits of its forward

    misdeclared = NoNumFeatures()
    misdeclared.num_features = 99  # describes another layer: the size is measured on a dummy batch
    assert resolve_feature_extractor(misdeclared, (1, 32, 32)).num_features == 7

    file = tmp_path / "net.pt"
    torch.save(NoNumFeatures(), file)
    from_file = resolve_feature_extractor(str(file), (1, 32, 32))
    assert from_file.num_features == 7 and "net.pt" in from_file.fingerprint

    torch.save(NoNumFeatures().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(TypeError, match="torch.save\\(module\\)"):
        resolve_feature_extractor(str(tmp_path / "sd.pt"))
    with pytest.raises(ValueError, match="fashion_mnist"):
        resolve_feature_extractor("no_such_net")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_feature_extractor("no_such_pkg.Net")
    with pytest.raises(ValueError, match="uint8"):
        custom(torch.zeros(3, 1, 32, 32))
    with pytest.raises(ValueError, match="receive uint8 images"):  # a float-only module gets a clear hint
        resolve_feature_extractor(nn.Sequential(nn.Flatten(), nn.Linear(1024, 4)), (1, 32, 32))


def test_fingerprint_follows_weights() -> None:
    a, b = FashionMNISTFeatureNet(), FashionMNISTFeatureNet()
    b.load_state_dict(a.state_dict())
    assert FashionMNISTFeatures(a).fingerprint == FashionMNISTFeatures(b).fingerprint
    with torch.no_grad():
        b.head.bias.add_(1.0)
    assert FashionMNISTFeatures(a).fingerprint != FashionMNISTFeatures(b).fingerprint


def test_custom_fingerprint_follows_the_code(tmp_path, monkeypatch) -> None:
    """A user's extractor edited in its forward, with the same weights, computes other features: its fingerprint
    (the key of its cached real statistics) changes with the code, and stays with the code and weights unchanged."""
    import importlib.util

    path = tmp_path / "user_features.py"
    monkeypatch.delitem(sys.modules, "user_features", raising=False)

    def fingerprint(source: str) -> tuple[str, torch.Tensor]:
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("user_features", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "user_features", module)
        spec.loader.exec_module(module)
        torch.manual_seed(0)
        net = module.Net()
        return CustomFeatures(net).fingerprint, net.proj.weight

    source = (
        "import torch\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.proj = nn.Linear(4, 3)\n\n"
        "    def forward(self, x):\n        return self.proj(x.float().flatten(1)[:, :4] / 255)\n"
    )
    (first, weight), (same, _) = fingerprint(source), fingerprint(source)
    edited, edited_weight = fingerprint(source.replace("/ 255", "/ 127.5 - 1"))
    assert torch.equal(weight, edited_weight)  # the same weights
    assert first == same and first != edited


# ----------------------------------------------------------------------------- Inception, offline
def test_inception_features_resize_as_torch_fidelity_does(tmp_path, monkeypatch) -> None:
    """Published FIDs resize to 299 px as torch-fidelity does (TensorFlow 1's bilinear, no antialiasing): with the same
    (random) weights, InceptionFeatures gives torch-fidelity's own extractor's 2048-d features, and the cache
    fingerprint names that resize. torchmetrics' antialiased default gives other features (checked below, so the
    comparison can fail)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchmetrics.image.fid import NoTrainInceptionV3

    from lightning_speed.metrics import InceptionFeatures

    path = tmp_path / "random-inception.pth"
    torch.save({}, path)
    with monkeypatch.context() as patch:  # a network of the real architecture with random weights, saved once
        patch.setattr(nn.Module, "load_state_dict", lambda self, state, strict=True: None)
        torch.manual_seed(0)
        torch.save(FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(path)).state_dict(), path)
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(path)).eval()
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    ours = InceptionFeatures(path)
    with torch.no_grad():
        expected = reference(images.expand(-1, 3, -1, -1))[0]
        antialiased = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(path))(images.expand(-1, 3, -1, -1))
        got = ours(images)
    assert torch.equal(got, expected)  # the same float32 operations in the same order: the same bits
    assert (antialiased - expected).abs().max() > 1e-3 * expected.abs().max()  # random weights: small features
    assert ours.fingerprint.endswith("-tf1resize")


def test_missing_inception_weights_give_clear_error_without_network(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    attempts = []

    def offline(url, dst, timeout):
        attempts.append((url, timeout))
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(features_module, "_download", offline)
    with pytest.raises(InceptionWeightsUnavailable) as info:
        resolve_feature_extractor("inception", download_timeout=0.5)
    message = str(info.value)
    expected = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert str(expected) in message
    assert "weights-inception-2015-12-05-6726825d.pth" in message and "github.com/toshas/torch-fidelity" in message
    assert "feature_extractor: fashion_mnist" in message
    assert attempts == [(features_module.INCEPTION_URL, 0.5)]

    with pytest.raises(InceptionWeightsUnavailable, match="disabled"):
        ensure_inception_weights(download=False)

    # A file already in the hub cache is used without any download attempt.
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"placeholder")
    assert ensure_inception_weights() == expected
    assert len(attempts) == 1


# ----------------------------------------------------------------------------- FID on real images
def test_fid_zero_on_itself_and_grows_with_corruption(real, extractor) -> None:
    images = real
    stats = compute_reference_stats(images, extractor, "test")
    # Injected statistics equal what torchmetrics accumulates itself.
    metric = FrechetInceptionDistance(feature=extractor)
    metric.update(images, real=True)
    torch.testing.assert_close(metric.real_features_sum, stats.feature_sum)
    torch.testing.assert_close(metric.real_features_cov_sum, stats.feature_cov_sum)

    self_fid = fid_against(stats, extractor, images)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator)
    noisy = [fid_against(stats, extractor, (images.float() + s * noise).round().clamp(0, 255).to(torch.uint8))
             for s in (8.0, 24.0, 64.0)]
    shifted = [fid_against(stats, extractor, torch.roll(images, shifts=k, dims=-1)) for k in (1, 3)]
    assert abs(self_fid) < 1e-3 * noisy[0], (self_fid, noisy)
    assert noisy[0] < noisy[1] < noisy[2], noisy
    assert noisy[0] > 0.01 and shifted[0] > 0.01
    assert shifted[0] < shifted[1], shifted
    # Two disjoint halves of the real data are closer to each other than to a corrupted copy.
    half = compute_reference_stats(images[:500], extractor)
    assert fid_against(half, extractor, images[500:]) < noisy[2]


# ----------------------------------------------------------------------------- cache
def test_reference_cache_reused_and_invalidated(tmp_path, real, extractor) -> None:
    images = real
    loads = []

    def load_images():
        loads.append(1)
        return images[:200]

    key = "fashion_mnist_embedded-test-n200|" + extractor.fingerprint
    first, cached = load_or_compute_reference_stats(key, load_images, extractor, cache_dir=tmp_path)
    assert not cached and len(loads) == 1
    path = cache_file(tmp_path, key)
    mtime = path.stat().st_mtime_ns
    second, cached = load_or_compute_reference_stats(key, load_images, extractor, cache_dir=tmp_path)
    assert cached and len(loads) == 1 and path.stat().st_mtime_ns == mtime  # images not even loaded
    torch.testing.assert_close(second.feature_cov_sum, first.feature_cov_sum)
    assert second.num_samples == 200 and second.features is None

    # KID needs the features themselves: a stats-only cache entry is recomputed, with them.
    with_features, cached = load_or_compute_reference_stats(
        key, load_images, extractor, cache_dir=tmp_path, keep_features=True
    )
    assert not cached and with_features.features.shape == (200, 256)

    other, cached = load_or_compute_reference_stats(
        key.replace("n200", "n100"), lambda: images[:100], extractor, cache_dir=tmp_path
    )
    assert not cached and other.num_samples == 100
    assert cache_file(tmp_path, key.replace("n200", "n100")) != path

    path.write_bytes(b"corrupt")  # a broken cache file is recomputed, not fatal
    _, cached = load_or_compute_reference_stats(key, load_images, extractor, cache_dir=tmp_path)
    assert not cached


def test_reference_images_validated(extractor) -> None:
    with pytest.raises(ValueError, match="uint8"):
        compute_reference_stats(torch.rand(4, 1, 32, 32), extractor)


def test_the_fashion_net_names_the_fix_for_images_of_other_channel_counts() -> None:
    """4-channel latents reach it when a module has no decode method: the message says what to do."""
    from lightning_speed.metrics.fashion_net import to_net_input

    with pytest.raises(ValueError, match=r"takes grey or RGB images \(1 or 3 channels\), got 4 channels: decode latents"):
        to_net_input(torch.zeros(2, 4, 32, 32))
