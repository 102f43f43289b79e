"""A small CNN classifier for Fashion-MNIST whose penultimate layer serves as an offline FID feature space.

Standard Inception weights cannot be downloaded on offline machines; this network is trained by
``python -m lightning_speed.metrics.train_feature_net`` and its weights ship with the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE_SIZE = 32


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def to_net_input(images: Tensor) -> Tensor:
    """Bring images to the net's input convention: float (N, 1, 32, 32) in [-1, 1].

    Accepts uint8 in [0, 255] or floats in [-1, 1]; 3 channels are averaged to 1 and 28x28 images
    are padded with black (-1) like the training data; other sizes are resized bilinearly.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    elif x.shape[1] != 1:
        raise ValueError(
            f"The Fashion-MNIST feature network takes grey or RGB images (1 or 3 channels), got {x.shape[1]} "
            "channels: decode latents to images first (a decode method on the module), or give the FID a "
            "feature_extractor made for these images."
        )
    h, w = x.shape[-2:]
    if (h, w) == (28, 28):
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    elif (h, w) != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


class FashionMNISTFeatureNet(nn.Module):
    """VGG-style CNN (32x32x1 -> 10 classes); ``features(x)`` is the 256-d penultimate layer used for FID.

    ``forward`` returns class logits (for training and accuracy checks). Input: anything
    ``to_net_input`` accepts (uint8 or [-1, 1] floats, 1 or 3 channels, 28 or 32 pixels).
    """

    num_features: int = 256

    def __init__(self, num_classes: int = 10, feature_dim: int = 256) -> None:
        super().__init__()
        self.num_features = feature_dim
        self.body = nn.Sequential(
            _conv_block(1, 16),
            nn.MaxPool2d(2),  # 16x16
            _conv_block(16, 32),
            _conv_block(32, 32),
            nn.MaxPool2d(2),  # 8x8
            _conv_block(32, 64),
            _conv_block(64, 64),
            nn.MaxPool2d(2),  # 4x4: keep the layout (Fashion-MNIST classes differ in where mass is)
            nn.Flatten(),
        )
        self.embed = nn.Sequential(
            nn.Linear(64 * 4 * 4, feature_dim, bias=False),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: Tensor) -> Tensor:
        """Penultimate-layer features (N, feature_dim)."""
        return self.embed(self.body(to_net_input(images)))

    def forward(self, images: Tensor) -> Tensor:
        """Class logits (N, num_classes)."""
        return self.head(self.dropout(self.features(images)))
