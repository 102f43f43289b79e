"""Feature networks for FID/KID and how a user's choice resolves to one.

One input convention for every extractor: **uint8 images (N, C, H, W) in [0, 255]**, the
convention of torchmetrics' default Inception and of ``datamodule.reference_images``. Generated
images in [-1, 1] are quantised with :func:`to_uint8` first (what saving a PNG would do), so real
and generated images take the same path. Every extractor returned by
:func:`resolve_feature_extractor` outputs (N, D) features, has an int ``num_features`` (so
torchmetrics skips its 3x299x299 dummy forward) and a ``fingerprint`` string that names its
weights (the reference-statistics cache is keyed on it).

Choices (``feature_extractor=``):

- ``"inception"`` (default): torch-fidelity's InceptionV3 (2048-d pool features), the standard.
  Its weights are looked up in the torch hub cache; if missing, one short download attempt is
  made and, offline, :class:`InceptionWeightsUnavailable` says where to put the file and how to
  use the offline network instead. Grayscale images are repeated to 3 channels.
- ``"fashion_mnist"``: the small offline network shipped with this package (see ``fashion_net``).
- an ``nn.Module``: called on uint8 (N, C, H, W) images, must return (N, D).
- ``"pkg.module.Name"``: a class or factory imported and called with no arguments.
- a path to a file saved with ``torch.save(module)``.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib
import inspect
import json
import os
import pickle
import shutil
import tempfile
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_speed.metrics.fashion_net import FashionMNISTFeatureNet

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
"""torch-fidelity's InceptionV3 weights (the same URL as ``torch_fidelity.feature_extractor_inceptionv3``)."""

INCEPTION_FILENAME = INCEPTION_URL.rsplit("/", 1)[-1]
INCEPTION_SHA256_PREFIX = INCEPTION_FILENAME.rsplit("-", 1)[-1].split(".")[0]  # torch hub's naming: sha256 prefix
DOWNLOAD_TIMEOUT_S = 10.0
FASHION_MNIST_WEIGHTS = "fashion_mnist_net.pt"
FEATURE_EXTRACTOR_CHOICES = ("inception", "fashion_mnist")


class InceptionWeightsUnavailable(RuntimeError):
    """The standard Inception weights are neither cached nor downloadable (offline machine)."""


def to_uint8(images: Tensor) -> Tensor:
    """Map generated images in [-1, 1] to uint8 [0, 255] (round to nearest, clamp).

    NaN has no uint8 value (it becomes 0, a black pixel): count such images with
    :func:`count_nonfinite` first, as ``FIDCallback`` does, rather than score them.
    """
    return ((images.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def count_nonfinite(images: Tensor) -> Tensor:
    """How many images (along dim 0) hold a NaN or inf value, as a 0-d tensor on their device (no sync)."""
    return (~torch.isfinite(images.reshape(images.shape[0], -1))).any(dim=1).sum()


def _check_uint8(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"feature extractors take uint8 images (N, C, H, W) in [0, 255]; got dtype {images.dtype}, "
            f"shape {tuple(images.shape)}. Convert generated [-1, 1] images with lightning_speed.metrics.to_uint8."
        )


def state_fingerprint(module: nn.Module) -> str:
    """Short sha256 of a module's class and state_dict values: equal weights give equal fingerprints."""
    digest = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        if isinstance(value, Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


def code_fingerprint(module: nn.Module) -> str:
    """Short sha256 of the source of every class in ``module`` (its own and its submodules'): a user's extractor
    whose forward changed with the same weights gives other features, so its cached real statistics must not be
    reused. A class without inspectable source (defined in a notebook cell, say) counts by its name alone."""
    digest = hashlib.sha256()
    for cls in sorted({type(m) for m in module.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        digest.update(f"{cls.__module__}.{cls.__qualname__}".encode())
        try:
            digest.update(inspect.getsource(cls).encode())
        except (OSError, TypeError):
            pass
    return digest.hexdigest()[:16]


class _FrozenExtractor(nn.Module):
    """Base for the wrappers: always in eval mode, no gradients, has ``num_features`` and ``fingerprint``."""

    num_features: int
    fingerprint: str

    def train(self, mode: bool = True) -> "_FrozenExtractor":
        return super().train(False)


class FashionMNISTFeatures(_FrozenExtractor):
    """uint8 images -> 256-d penultimate features of a :class:`FashionMNISTFeatureNet`."""

    def __init__(self, net: FashionMNISTFeatureNet, name: str = "fashion_mnist") -> None:
        super().__init__()
        self.net = net.float().eval().requires_grad_(False)
        self.num_features = int(net.num_features)
        self.fingerprint = f"{name}-{state_fingerprint(net)}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        _check_uint8(images)
        return self.net.features(images)


class InceptionFeatures(_FrozenExtractor):
    """uint8 images -> torch-fidelity InceptionV3 2048-d pool features (grayscale repeated to RGB)."""

    def __init__(self, weights_path: str | os.PathLike[str]) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        # Published FIDs resize to 299 px as TensorFlow 1 did (torch-fidelity's bilinear, no antialiasing); torchmetrics
        # antialiases by default since it gained the option, which shifts every FID: ask for the published resize.
        resize = {"antialias": False} if "antialias" in inspect.signature(NoTrainInceptionV3).parameters else {}
        try:
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights_path),
                **resize,
            )
        except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, ValueError) as err:
            # A file that is not these weights (an HTML page saved by a proxy, a partial copy, another network).
            raise InceptionWeightsUnavailable(
                f"{weights_path} is not the InceptionV3 weights file ({type(err).__name__}: {str(err)[:200]}).\n"
                + _inception_fixes(Path(weights_path))
            ) from err
        self.num_features = 2048
        self.fingerprint = f"inception-v3-compat-2048-{INCEPTION_SHA256_PREFIX}-tf1resize"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        _check_uint8(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net(images)


class CustomFeatures(_FrozenExtractor):
    """Wraps a user's module: uint8 images in, (N, D) out; ``num_features`` found by one dummy forward."""

    def __init__(self, module: nn.Module, name: str | None = None) -> None:
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        label = name or f"{type(module).__module__}.{type(module).__qualname__}"
        self.fingerprint = f"{label}-{state_fingerprint(module)}-{code_fingerprint(module)}"
        declared = getattr(module, "num_features", None)
        self.num_features = int(declared) if declared is not None else -1

    def infer_num_features(self, image_shape: tuple[int, int, int]) -> int:
        """Run two dummy uint8 images of ``image_shape`` through the module to learn its feature size."""
        device = next((t.device for t in self.module.state_dict().values()), torch.device("cpu"))
        dummy = torch.zeros((2, *image_shape), dtype=torch.uint8, device=device)
        try:
            features = self(dummy)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"the custom feature extractor {type(self.module).__name__} failed on a uint8 batch of shape "
                f"{tuple(dummy.shape)} ({err}). Feature extractors receive uint8 images in [0, 255] (N, C, H, W), "
                "like torchmetrics' Inception; convert inside the module (e.g. x.float() / 127.5 - 1)."
            ) from err
        self.num_features = int(features.shape[-1])
        return self.num_features

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        _check_uint8(images)
        features = self.module(images)
        if features.dim() != 2 or features.shape[0] != images.shape[0]:
            raise ValueError(
                f"the custom feature extractor {type(self.module).__name__} returned shape {tuple(features.shape)}; "
                f"it must return (N, D) features for N={images.shape[0]} uint8 images."
            )
        return features


# ----------------------------------------------------------------------------- Fashion-MNIST net


def fashion_mnist_weights_path() -> Path:
    """Where the committed Fashion-MNIST feature-net weights live inside the package."""
    return Path(str(resources.files("lightning_speed.metrics") / "weights" / FASHION_MNIST_WEIGHTS))


def fashion_mnist_net_info() -> dict[str, Any]:
    """The training record next to the weights (accuracy, epochs, seed, date, command)."""
    return json.loads(fashion_mnist_weights_path().with_suffix(".json").read_text())


def load_fashion_mnist_feature_net(path: str | os.PathLike[str] | None = None) -> FashionMNISTFeatureNet:
    """The trained :class:`FashionMNISTFeatureNet` (fp32, eval mode); ``path`` defaults to the shipped weights."""
    path = Path(path) if path is not None else fashion_mnist_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST feature-net weights not found at {path}. Train them with "
            "`python -m lightning_speed.metrics.train_feature_net --root /usr/share/datasets/fashion-mnist "
            f"--out {path}`, or reinstall the package."
        )
    net = FashionMNISTFeatureNet()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- Inception


def inception_weights_path() -> Path:
    """Where torch hub (and so torch-fidelity) keeps the Inception weights: <torch hub dir>/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def _download(url: str, dst: Path, timeout: float) -> None:
    """Fetch ``url`` to ``dst`` atomically, giving up after ``timeout`` seconds without a response."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            shutil.copyfileobj(response, out)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_inception_weights(timeout: float = DOWNLOAD_TIMEOUT_S, download: bool = True) -> Path:
    """Path of the Inception weights, downloading them once if missing; a clear error when that is impossible.

    Called from the FID callback's ``setup`` so an offline machine fails before training, not after it.
    """
    path = inception_weights_path()
    if path.is_file():
        return path
    reason = "downloading is disabled"
    if download:
        try:
            _download(INCEPTION_URL, path, timeout)
        except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as err:
            reason = f"download failed: {err}"
        else:
            if path.is_file() and _sha256_prefix(path) == INCEPTION_SHA256_PREFIX:
                return path
            # Not the published file (a proxy's or captive portal's page): never leave it where it would be loaded.
            path.unlink(missing_ok=True)
            reason = f"the download is not the published file (sha256 not starting {INCEPTION_SHA256_PREFIX})"
    raise InceptionWeightsUnavailable(
        f"The standard InceptionV3 weights for FID are not available ({reason}).\n" + _inception_fixes(path)
    )


def _sha256_prefix(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[: len(INCEPTION_SHA256_PREFIX)]


def _inception_fixes(path: Path) -> str:
    """Which file to get, from where, where to put it, and the offline alternative."""
    return (
        f"  File: {INCEPTION_FILENAME}\n"
        f"  From: {INCEPTION_URL}\n"
        f"  Put it at: {path}  (torch hub checkpoint dir; set TORCH_HOME to move it)\n"
        "Offline alternative: use the feature network shipped with lightning_speed, e.g. "
        "FIDCallback(feature_extractor='fashion_mnist') or in YAML `feature_extractor: fashion_mnist` "
        "(FID values are then not comparable with published Inception FIDs)."
    )


# ----------------------------------------------------------------------------- resolution


def _load_from_import_path(spec: str) -> nn.Module:
    module_name, _, attr = spec.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"feature_extractor={spec!r}: cannot import {attr!r} from {module_name!r} ({err}). Give "
            f"{FEATURE_EXTRACTOR_CHOICES}, an import path 'pkg.module.Name', or a torch.save'd module file."
        ) from err
    built = target() if callable(target) and not isinstance(target, nn.Module) else target
    if not isinstance(built, nn.Module):
        raise TypeError(f"feature_extractor={spec!r} produced {type(built).__name__}, not an nn.Module.")
    return built


def _wrap_module(module: nn.Module, name: str | None = None) -> _FrozenExtractor:
    """A user's module as an extractor. A ``FashionMNISTFeatureNet`` gives its penultimate features, as the
    ``"fashion_mnist"`` choice does: its ``forward`` returns the 10 class logits, not features."""
    if isinstance(module, FashionMNISTFeatureNet):
        return FashionMNISTFeatures(module)
    return CustomFeatures(module, name=name)


def resolve_feature_extractor(
    spec: str | nn.Module = "inception",
    image_shape: tuple[int, int, int] | None = None,
    *,
    download_timeout: float = DOWNLOAD_TIMEOUT_S,
) -> _FrozenExtractor:
    """Turn a ``feature_extractor`` option into a frozen extractor (uint8 images -> (N, D) features).

    ``image_shape`` (C, H, W) lets a custom module's feature size be found by a dummy forward.
    """
    if isinstance(spec, _FrozenExtractor):
        extractor = spec
    elif isinstance(spec, nn.Module):
        extractor = _wrap_module(spec)
    elif not isinstance(spec, str):
        raise TypeError(f"feature_extractor must be a str or nn.Module, got {type(spec).__name__}.")
    elif spec == "inception":
        extractor = InceptionFeatures(ensure_inception_weights(timeout=download_timeout))
    elif spec in ("fashion_mnist", "fashion-mnist", "fashionmnist"):
        extractor = FashionMNISTFeatures(load_fashion_mnist_feature_net())
    elif os.path.isfile(spec):
        loaded = torch.load(spec, map_location="cpu", weights_only=False)
        if not isinstance(loaded, nn.Module):
            raise TypeError(
                f"feature_extractor file {spec} holds a {type(loaded).__name__}; it must be a module saved with "
                "torch.save(module) (a state_dict alone does not say which network to build)."
            )
        extractor = _wrap_module(loaded, name=f"file:{Path(spec).name}")
    elif "." in spec and not spec.endswith((".pt", ".pth", ".ckpt")):
        extractor = _wrap_module(_load_from_import_path(spec), name=spec)
    else:
        raise ValueError(
            f"Unknown feature_extractor {spec!r}: choose 'inception' (standard, needs its weights), "
            "'fashion_mnist' (offline), an import path 'pkg.module.Name', an existing torch.save'd module file, "
            "or pass an nn.Module."
        )
    if isinstance(extractor, CustomFeatures):
        if image_shape is not None:  # measured, not trusted: the declared size may describe another layer
            extractor.infer_num_features(tuple(image_shape))
        elif extractor.num_features <= 0:
            raise ValueError(
                "cannot tell the custom feature extractor's output size: give it a `num_features` attribute "
                "or pass image_shape."
            )
    return extractor
