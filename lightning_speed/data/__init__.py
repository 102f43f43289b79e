"""LightningDataModules yielding ``(images in [-1, 1] (B, C, H, W) float, labels long)``.

Each exposes ``image_shape``, ``num_classes``, ``name``, and ``reference_images`` (or, a batch at a
time, ``reference_batches``) / ``reference_key`` for FID's real-image statistics. ``LatentDataModule`` yields an image module's
images as cached autoencoder latents instead (see ``lightning_speed.data.latent``).
"""

from .base import DeviceBatchLoader, UInt8ImageDataModule
from .cifar10 import CIFAR10DataModule
from .embedded import EmbeddedFashionMNISTDataModule
from .fashion_mnist import FashionMNISTDataModule
from .idx import read_idx
from .image_folder import ImageFolderDataModule
from .latent import LatentBatchLoader, LatentDataModule

__all__ = [
    "CIFAR10DataModule",
    "DeviceBatchLoader",
    "EmbeddedFashionMNISTDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "LatentBatchLoader",
    "LatentDataModule",
    "UInt8ImageDataModule",
    "read_idx",
]
