"""Real-data statistics for FID/KID: computed once, cached on disk, injected into torchmetrics.

The FID of a generated set needs the mean and covariance of the real set's features. They do
not change during training, so they are computed once per (reference images, feature network)
pair and stored under ``cache_dir`` (default ``~/.cache/lightning_speed/fid``) in a file named
by a hash of the key ``"<reference key>|<feature network fingerprint>"``. A different image
count, split, dataset or feature network gives a different key and so a fresh computation.

The stored sums are exactly what ``FrechetInceptionDistance.update(real=True)`` would
accumulate (float64 feature sum, float64 sum of outer products, sample count), so injecting
them is equivalent to feeding the real images every evaluation, without the cost.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

DEFAULT_CACHE_DIR = Path("~/.cache/lightning_speed/fid")
CACHE_FORMAT = 1


@dataclass
class ReferenceStats:
    """Sufficient statistics of the real features (+ the features themselves when KID needs them)."""

    key: str
    num_samples: int
    feature_sum: Tensor  # (D,) float64
    feature_cov_sum: Tensor  # (D, D) float64, sum of outer products
    features: Tensor | None = None  # (N, D) float32, only kept for KID

    @property
    def mean(self) -> Tensor:
        return self.feature_sum / self.num_samples

    @property
    def cov(self) -> Tensor:
        """Unbiased covariance, the same formula as torchmetrics' FID."""
        mean = self.mean.unsqueeze(0)
        return (self.feature_cov_sum - self.num_samples * mean.t().mm(mean)) / (self.num_samples - 1)


def images_fingerprint(images: Tensor) -> str:
    """Short content hash of an image tensor (for reference sets given as tensors, not by a datamodule)."""
    digest = hashlib.sha256(f"{tuple(images.shape)}{images.dtype}".encode())
    digest.update(images.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_reference_images(images: Tensor, min_count: int = 2) -> Tensor:
    """Validate real images: uint8 (N, C, H, W), N >= ``min_count`` (FID needs 2 in all; a batch 1)."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        what = f"{type(images).__name__}" if not isinstance(images, Tensor) else f"{images.dtype} {tuple(images.shape)}"
        raise ValueError(
            f"reference images must be a uint8 tensor (N, C, H, W) in [0, 255], got {what}. Convert [-1, 1] "
            "floats with lightning_speed.metrics.to_uint8."
        )
    if images.shape[0] < min_count:
        what = "reference images for FID" if min_count > 1 else "reference image in a batch"
        raise ValueError(f"need at least {min_count} {what}, got {images.shape[0]}.")
    return images


@torch.no_grad()
def compute_reference_stats(
    images: Tensor | Iterable[Tensor],
    extractor: nn.Module,
    key: str = "",
    *,
    batch_size: int = 500,
    device: torch.device | str | None = None,
    keep_features: bool = False,
) -> ReferenceStats:
    """Run ``extractor`` over uint8 ``images`` on ``device``; accumulate FID's sufficient statistics.

    ``images`` is one tensor, cut into ``batch_size`` batches, or an iterable of batches (e.g. a data
    module's ``reference_batches``), read one at a time so the whole set is never in memory; the same
    batches give the same statistics either way.
    """
    batches = images
    if isinstance(images, Tensor):
        whole = check_reference_images(images)
        batches = (whole[start : start + batch_size] for start in range(0, whole.shape[0], batch_size))
    device = torch.device(device) if device is not None else next(
        (t.device for t in extractor.state_dict().values()), torch.device("cpu")
    )
    feature_sum: Tensor | None = None
    cov_sum: Tensor | None = None
    kept: list[Tensor] = []
    count = 0
    for batch in batches:
        feats = extractor(check_reference_images(batch, min_count=1).to(device)).double()
        count += batch.shape[0]
        if feature_sum is None:
            feature_sum = torch.zeros(feats.shape[1], dtype=torch.float64, device=device)
            cov_sum = torch.zeros(feats.shape[1], feats.shape[1], dtype=torch.float64, device=device)
        feature_sum += feats.sum(dim=0)
        cov_sum += feats.t().mm(feats)
        if keep_features:
            kept.append(feats.float().cpu())
    if feature_sum is None or cov_sum is None or count < 2:
        raise ValueError(f"need at least 2 reference images for FID, got {count}.")
    return ReferenceStats(
        key=key,
        num_samples=count,
        feature_sum=feature_sum.cpu(),
        feature_cov_sum=cov_sum.cpu(),
        features=torch.cat(kept) if keep_features else None,
    )


def cache_file(cache_dir: str | os.PathLike[str] | None, key: str) -> Path:
    """The cache file for ``key`` (a hash of it, so any key makes a valid file name)."""
    root = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    return root / f"ref_{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"


def save_reference_stats(stats: ReferenceStats, path: Path) -> None:
    """Write atomically (temp file + rename) so concurrent runs never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CACHE_FORMAT,
        "key": stats.key,
        "num_samples": stats.num_samples,
        "feature_sum": stats.feature_sum,
        "feature_cov_sum": stats.feature_cov_sum,
        "features": stats.features,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_reference_stats(path: Path, key: str, need_features: bool = False) -> ReferenceStats | None:
    """The cached stats for ``key``, or None if absent, stale, unreadable or lacking features KID needs."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt cache file is recomputed, never fatal
        return None
    if payload.get("format") != CACHE_FORMAT or payload.get("key") != key:
        return None
    if need_features and payload.get("features") is None:
        return None
    return ReferenceStats(
        key=key,
        num_samples=int(payload["num_samples"]),
        feature_sum=payload["feature_sum"],
        feature_cov_sum=payload["feature_cov_sum"],
        features=payload.get("features"),
    )


def load_or_compute_reference_stats(
    key: str,
    images: Tensor | Iterable[Tensor] | Callable[[], Tensor | Iterable[Tensor]],
    extractor: nn.Module,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 500,
    device: torch.device | str | None = None,
    keep_features: bool = False,
    write: bool = True,
) -> tuple[ReferenceStats, bool]:
    """Cached stats for ``key`` if present, else computed from ``images`` (called lazily) and cached.

    Returns ``(stats, from_cache)``.
    """
    path = cache_file(cache_dir, key)
    cached = load_reference_stats(path, key, need_features=keep_features)
    if cached is not None:
        return cached, True
    real = images() if callable(images) else images
    stats = compute_reference_stats(
        real, extractor, key, batch_size=batch_size, device=device, keep_features=keep_features
    )
    if write:
        save_reference_stats(stats, path)
    return stats, False
