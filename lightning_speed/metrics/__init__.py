"""Evaluation: feature networks for FID/KID, cached real-data statistics, sampling helpers."""

from lightning_speed.metrics.fashion_net import FashionMNISTFeatureNet
from lightning_speed.metrics.features import (
    INCEPTION_URL,
    CustomFeatures,
    FashionMNISTFeatures,
    InceptionFeatures,
    InceptionWeightsUnavailable,
    count_nonfinite,
    ensure_inception_weights,
    fashion_mnist_net_info,
    inception_weights_path,
    load_fashion_mnist_feature_net,
    resolve_feature_extractor,
    to_uint8,
)
from lightning_speed.metrics.reference import (
    ReferenceStats,
    compute_reference_stats,
    load_or_compute_reference_stats,
)
from lightning_speed.metrics.sampling import generate_batches

__all__ = [
    "INCEPTION_URL",
    "CustomFeatures",
    "FashionMNISTFeatureNet",
    "FashionMNISTFeatures",
    "InceptionFeatures",
    "InceptionWeightsUnavailable",
    "ReferenceStats",
    "compute_reference_stats",
    "count_nonfinite",
    "ensure_inception_weights",
    "fashion_mnist_net_info",
    "generate_batches",
    "inception_weights_path",
    "load_fashion_mnist_feature_net",
    "load_or_compute_reference_stats",
    "resolve_feature_extractor",
    "to_uint8",
]
