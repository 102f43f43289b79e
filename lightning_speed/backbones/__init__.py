"""Denoising backbones: plain ``nn.Module``s called as ``backbone(x, t, y=None)``.

``x`` is (B, C, H, W), ``t`` is (B,) integer time steps in [0, T), ``y`` is (B,) class labels
or ``None``; for class-conditional models ``y == num_classes`` is the null ("no label") token.
The output has the shape of ``x`` (with ``out_channels`` channels).
"""

from .dit import DIT_PRESETS, DiT, DiT_B_2, DiT_S_2, DiTPreset, DiTSize, dit
from .embeddings import LabelEmbedding, TimestepEmbedding, sinusoidal_embedding
from .unet import UNet

__all__ = [
    "DIT_PRESETS",
    "DiT",
    "DiT_B_2",
    "DiT_S_2",
    "DiTPreset",
    "DiTSize",
    "LabelEmbedding",
    "TimestepEmbedding",
    "UNet",
    "dit",
    "sinusoidal_embedding",
]
