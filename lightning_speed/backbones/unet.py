"""An ADM-style UNet (Dhariwal & Nichol 2021) for small images, written for speed.

Residual blocks (GroupNorm + SiLU + 3x3 conv) take the time(+class) embedding as a
scale/shift on their second norm; self-attention (``F.scaled_dot_product_attention``) runs at
the chosen resolutions and in the middle; every residual branch's last layer and the output
conv start at zero, so the untrained network is the identity on its residual path and
predicts exactly zero. ``forward`` has no data-dependent control flow, so it compiles into
one graph and runs in bf16 autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import LabelEmbedding, TimestepEmbedding, check_inputs, labels_or_null

MAX_NORM_GROUPS = 32


def norm_groups(channels: int) -> int:
    """GroupNorm group count for ``channels``: the largest power of two <= 32 dividing it.

    Raises ``ValueError`` when that would leave fewer than 8 groups (or fewer than
    ``channels`` groups for tiny widths), i.e. when the width is not a multiple of 8.
    """
    groups = math.gcd(channels, MAX_NORM_GROUPS)
    if groups < min(8, channels):
        raise ValueError(
            f"{channels} channels cannot be split evenly into GroupNorm groups (the UNet uses up to "
            f"{MAX_NORM_GROUPS}, at least 8): make base_channels * every channel_mult a multiple of 8."
        )
    return groups


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, then GN modulated by the embedding (scale/shift), SiLU, dropout, zero conv."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(norm_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual with a zero-init projection."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(
                f"Attention at {channels} channels cannot use num_heads={num_heads}: "
                "choose num_heads dividing every attended width (base_channels * channel_mult)."
            )
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(norm_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(b, 3, heads, c // heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, HW, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Strided 3x3 conv: halves H and W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """One ResBlock, optionally followed by attention (a unit of the encoder/decoder)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, attn_heads: int | None) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout)
        self.attn = AttentionBlock(out_ch, attn_heads) if attn_heads is not None else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """ADM-style UNet: ``unet(x, t, y=None) -> prediction`` with the shape of ``x``.

    Args:
        in_channels: image channels (1 for Fashion-MNIST, 3 for CIFAR-10).
        out_channels: predicted channels; defaults to ``in_channels``.
        image_size: height = width of the images the model is built for.
        base_channels: width of the first level; level ``i`` has ``base_channels * channel_mult[i]``.
        channel_mult: width multipliers, one per resolution level (each level after the first halves H, W).
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
        attention_resolutions: feature-map sizes in pixels (e.g. ``16``) that get self-attention;
            the middle block always has it. Use ``()`` for none besides the middle.
        num_heads: attention heads.
        dropout: dropout inside the residual blocks.
        num_classes: number of classes for a class-conditional model (``None``: unconditional).
            The label embedding has ``num_classes + 1`` rows; label ``num_classes`` means "no label".
        num_timesteps: the diffusion's ``T``; time steps are rescaled to a 0..1000 range before
            the sinusoidal embedding.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 32,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (16,),
        num_heads: int = 4,
        dropout: float = 0.0,
        num_classes: int | None = None,
        num_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        self._validate(in_channels, out_channels, image_size, base_channels, channel_mult,
                       num_res_blocks, attention_resolutions, num_heads, dropout)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels) if out_channels is not None else self.in_channels
        self.image_size = int(image_size)
        self.num_classes = int(num_classes) if num_classes is not None else None
        self.num_timesteps = int(num_timesteps)

        emb_dim = 4 * base_channels
        self.time_embed = TimestepEmbedding(emb_dim, frequency_dim=base_channels, num_timesteps=num_timesteps)
        self.label_embed = LabelEmbedding(self.num_classes, emb_dim) if self.num_classes is not None else None

        self.input_conv = nn.Conv2d(self.in_channels, base_channels, 3, padding=1)

        # Encoder: remember each unit's output width; the decoder consumes them in reverse.
        self.down = nn.ModuleList()
        skip_widths = [base_channels]
        ch, res = base_channels, self.image_size
        for level, mult in enumerate(channel_mult):
            out_ch = base_channels * mult
            heads = num_heads if res in attention_resolutions else None
            for _ in range(num_res_blocks):
                self.down.append(_Stage(ch, out_ch, emb_dim, dropout, heads))
                ch = out_ch
                skip_widths.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_widths.append(ch)
                res //= 2

        self.mid_res1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = AttentionBlock(ch, num_heads)
        self.mid_res2 = ResBlock(ch, ch, emb_dim, dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            out_ch = base_channels * mult
            heads = num_heads if res in attention_resolutions else None
            for _ in range(num_res_blocks + 1):
                self.up.append(_Stage(ch + skip_widths.pop(), out_ch, emb_dim, dropout, heads))
                ch = out_ch
            if level != 0:
                self.up.append(Upsample(ch))
                res *= 2

        self.out_norm = nn.GroupNorm(norm_groups(ch), ch)
        self.out_conv = _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1))

    @staticmethod
    def _validate(
        in_channels: int,
        out_channels: int | None,
        image_size: int,
        base_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        attention_resolutions: tuple[int, ...],
        num_heads: int,
        dropout: float,
    ) -> None:
        if in_channels < 1 or (out_channels is not None and out_channels < 1):
            raise ValueError(f"in_channels/out_channels must be positive, got {in_channels}/{out_channels}.")
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult needs at least one positive multiplier, got {channel_mult}.")
        if base_channels < 1 or num_res_blocks < 1 or num_heads < 1:
            raise ValueError(
                "base_channels, num_res_blocks and num_heads must be positive, got "
                f"{base_channels}, {num_res_blocks}, {num_heads}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}.")
        factor = 2 ** (len(channel_mult) - 1)
        if image_size < 1 or image_size % factor:
            raise ValueError(
                f"image_size={image_size} must be divisible by {factor} (2 ** (len(channel_mult) - 1)) so every "
                f"downsampling halves it exactly: pad the images (e.g. 28 -> 32) or use fewer levels in channel_mult."
            )
        for mult in channel_mult:
            norm_groups(base_channels * mult)
        reached = [image_size // 2**i for i in range(len(channel_mult))]
        unreached = [r for r in attention_resolutions if r not in reached]
        if unreached:
            raise ValueError(
                f"attention_resolutions {attention_resolutions} include {unreached}, which this UNet never reaches: "
                f"with image_size={image_size} and {len(channel_mult)} levels the feature maps are {reached} pixels. "
                "Pick from those, or use () for attention in the middle block only."
            )
        for r, mult in zip(reached, channel_mult):
            if (r in attention_resolutions or r == reached[-1]) and (base_channels * mult) % num_heads:
                raise ValueError(
                    f"num_heads={num_heads} does not divide the attended width {base_channels * mult} "
                    f"(at {r}px): choose num_heads dividing base_channels * channel_mult there."
                )

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict from noisy images ``x`` (B, C, H, W), time steps ``t`` (B,) and optional labels ``y`` (B,)."""
        t = check_inputs(
            type(self).__name__, x, t, y, (self.in_channels, self.image_size, self.image_size), self.num_classes
        )
        emb = self.time_embed(t)
        if self.label_embed is not None:
            emb = emb + self.label_embed(labels_or_null(y, x.shape[0], self.label_embed.null_label, x.device))

        # x in the weights' dtype: a no-op for fp32 weights (autocast casts inside the conv), bf16 for a bf16 module
        h = self.input_conv(x.to(self.input_conv.weight.dtype))
        skips = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, _Stage) else block(h)
            skips.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)

        for block in self.up:
            if isinstance(block, _Stage):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = block(h)

        return self.out_conv(F.silu(self.out_norm(h)))
