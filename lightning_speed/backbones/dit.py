"""A Diffusion Transformer (Peebles & Xie 2023) with adaLN-Zero conditioning.

Images are cut into ``patch_size`` patches, embedded with a strided conv plus a fixed 2D
sin-cos position table, passed through transformer blocks whose LayerNorms are modulated
(shift, scale, gate) by the time(+class) embedding, and unpatchified back to an image.
All modulation layers and the output projection start at zero, so each block starts as the
identity and the untrained model predicts exactly zero.

The paper's model sizes are one registry, ``DIT_PRESETS`` (name -> depth, hidden size, heads,
patch), chosen by name: ``DiT(preset="DiT-S/2", image_size=32, in_channels=1)`` in Python, or in
YAML ``class_path: lightning_speed.backbones.DiT`` with ``init_args: {preset: DiT-S/2, ...}``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import check_int, check_number
from .embeddings import LabelEmbedding, TimestepEmbedding, check_inputs, labels_or_null, sinusoidal_embedding


def sincos_position_table(grid_size: int, dim: int) -> Tensor:
    """Fixed ``(grid_size**2, dim)`` table: half the features encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"The 2D sin-cos position embedding needs a width divisible by 4, got {dim}.")
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat(
        [sinusoidal_embedding(rows.flatten(), dim // 2), sinusoidal_embedding(cols.flatten(), dim // 2)], dim=-1
    )


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    """Multi-head self-attention via ``F.scaled_dot_product_attention`` (flash kernels on GPU)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def _gelu_epilogue_applies(x: Tensor) -> bool:
    """cuBLASLt's GELU epilogue computes the tanh GELU on CUDA only, and it has no derivative: sampling on a GPU."""
    return x.is_cuda and not torch.is_grad_enabled()


def linear_tanh_gelu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``GELU_tanh(x W^T + b)`` as one ``torch._addmm_activation`` call: on CUDA a cuBLASLt product with the bias and
    the GELU in its epilogue. Under autocast it runs in the autocast dtype, as ``F.linear`` would."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    out = torch._addmm_activation(bias.to(dtype), x.reshape(-1, x.shape[-1]).to(dtype), weight.to(dtype).t(),
                                  use_gelu=True)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class FeedForward(nn.Sequential):
    """DiT's MLP, Linear -> tanh GELU -> Linear (state-dict keys ``0.*`` and ``2.*``, as an ``nn.Sequential``).

    Sampling on a GPU (CUDA, no autograd) runs the first layer and the GELU as one product with a GELU epilogue
    (``linear_tanh_gelu``): the 4x-wide hidden activations are then written once, instead of written, read and
    written again by the GELU kernel that ``torch.compile`` leaves after a cuBLAS product. On an H100 that took 11 %
    off the compiled bf16 DiT-S/2 forward at the FID batch (BENCHMARKS.md, FID time). ``gelu_epilogue = False``
    keeps the three separate calls everywhere.
    """

    gelu_epilogue: bool = True

    def forward(self, x: Tensor) -> Tensor:
        fc1, act, fc2 = self
        if self.gelu_epilogue and isinstance(fc1, nn.Linear) and _gelu_epilogue_applies(x):
            return fc2(linear_tanh_gelu(x, fc1.weight, fc1.bias))
        return fc2(act(fc1(x)))


class DiTBlock(nn.Module):
    """Pre-norm transformer block; the conditioning sets each norm's shift/scale and each branch's gate."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None, :].chunk(6, dim=-1)
        x = x + gate1 * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Modulated LayerNorm then a linear map to ``patch_size**2 * out_channels`` per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c)[:, None, :].chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class DiTSize(NamedTuple):
    """One row of the DiT paper's model table (Peebles & Xie 2023, Table 1)."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int


DiTPreset = Literal[
    "DiT-S/2", "DiT-S/4", "DiT-S/8",
    "DiT-B/2", "DiT-B/4", "DiT-B/8",
    "DiT-L/2", "DiT-L/4", "DiT-L/8",
    "DiT-XL/2", "DiT-XL/4", "DiT-XL/8",
]  # fmt: skip

# (depth, hidden size, heads) of each model size in the paper's Table 1; every size comes with patch 2, 4 and 8.
_DIT_WIDTHS = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

DIT_PRESETS: dict[str, DiTSize] = {
    f"DiT-{size}/{patch}": DiTSize(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in _DIT_WIDTHS.items()
    for patch in (2, 4, 8)
}
"""The preset sizes by name; every name is also in ``DiTPreset`` so config parsers reject typos."""

_CUSTOM = DiTSize(depth=12, hidden_size=384, num_heads=6, patch_size=2)  # DiT-S/2's, when no preset is named


def dit_size(preset: str) -> DiTSize:
    """The (depth, hidden_size, num_heads, patch_size) of a preset name, or a clear error."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"Unknown DiT preset {preset!r}; choose one of {', '.join(DIT_PRESETS)}.")
    return DIT_PRESETS[preset]


class DiT(nn.Module):
    """Diffusion Transformer: ``dit(x, t, y=None) -> prediction`` with ``image_size`` x ``image_size`` outputs.

    Args:
        preset: a size from ``DIT_PRESETS`` ("DiT-S/2" ... "DiT-XL/8"): sets depth, hidden_size,
            num_heads and patch_size. Any of those four given explicitly overrides the preset's value;
            with no preset they default to DiT-S/2's.
        image_size: height = width of the input images (``input_size`` in DiT's code).
        in_channels: image channels.
        out_channels: predicted channels; defaults to ``in_channels`` (``2 * in_channels`` with
            ``learn_sigma``).
        learn_sigma: also predict the variance interpolation of improved DDPM: the output has
            ``2 * in_channels`` channels, the prediction first and the variance values second.
        patch_size: side of the square patches (tokens = (image_size / patch_size) ** 2).
        hidden_size: token width (divisible by num_heads and by 4).
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width over hidden_size.
        num_classes: classes for a class-conditional model (``None``: unconditional); the label
            embedding has ``num_classes + 1`` rows, label ``num_classes`` meaning "no label".
        num_timesteps: the diffusion's ``T``; time steps are rescaled to 0..1000 before embedding.
        input_size: DiT's name for ``image_size``, accepted for configs written against DiT's code.
    """

    default_preset: str | None = None
    """Subclasses that stand for one preset (``DiT_S_2``) set this; ``preset`` then defaults to it."""

    def __init__(
        self,
        preset: DiTPreset | None = None,
        image_size: int | None = None,
        in_channels: int = 1,
        out_channels: int | None = None,
        learn_sigma: bool = False,
        patch_size: int | None = None,
        hidden_size: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        num_timesteps: int = 1000,
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        if self.default_preset is not None and preset not in (None, self.default_preset):
            raise ValueError(
                f"{type(self).__name__} is {self.default_preset}; for {preset} use DiT(preset={preset!r})."
            )
        preset = preset if preset is not None else self.default_preset
        size = dit_size(preset) if preset is not None else _CUSTOM
        patch_size = size.patch_size if patch_size is None else patch_size
        hidden_size = size.hidden_size if hidden_size is None else hidden_size
        depth = size.depth if depth is None else depth
        num_heads = size.num_heads if num_heads is None else num_heads
        if image_size is not None and input_size is not None and image_size != input_size:
            raise ValueError(
                f"image_size={image_size} and input_size={input_size} name the same thing: give only image_size."
            )
        image_size = next((s for s in (image_size, input_size) if s is not None), 32)
        if learn_sigma and out_channels is not None and out_channels != 2 * in_channels:
            raise ValueError(
                f"learn_sigma=True predicts 2 * in_channels = {2 * in_channels} channels, but out_channels="
                f"{out_channels}: leave out_channels unset."
            )
        if min(image_size, patch_size, in_channels, hidden_size, depth, num_heads) < 1:
            raise ValueError("image_size, patch_size, in_channels, hidden_size, depth and num_heads must be positive.")
        mlp_ratio = check_number(mlp_ratio, "mlp_ratio", above=0.0, hint="the MLP's width over hidden_size, 4 in DiT")
        if int(hidden_size * mlp_ratio) < 1:
            raise ValueError(
                f"mlp_ratio={mlp_ratio:g} gives the MLP int({hidden_size} * {mlp_ratio:g}) = 0 hidden units at "
                f"hidden_size={hidden_size}: use an mlp_ratio of at least {1 / hidden_size:g} (DiT uses 4)."
            )
        if num_classes is not None:
            num_classes = check_int(num_classes, "num_classes", minimum=1, hint="or null for an unconditional model")
        num_timesteps = check_int(num_timesteps, "num_timesteps", minimum=1)
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} is not divisible by patch_size={patch_size}"
                f"{f' of {preset}' if preset is not None else ''}: "
                "pad the images or pick a patch size that divides the image size."
            )
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
        if hidden_size % 4:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by 4 (2D sin-cos position embedding).")
        self.preset = preset
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.in_channels = int(in_channels)
        self.learn_sigma = bool(learn_sigma)
        default_out = 2 * self.in_channels if self.learn_sigma else self.in_channels
        self.out_channels = int(out_channels) if out_channels is not None else default_out
        self.num_classes = int(num_classes) if num_classes is not None else None
        self.num_timesteps = int(num_timesteps)
        self.grid_size = self.image_size // self.patch_size

        self.patch_embed = nn.Conv2d(self.in_channels, hidden_size, self.patch_size, stride=self.patch_size)
        # A deterministic function of the config, so kept out of checkpoints.
        self.register_buffer(
            "pos_embed", sincos_position_table(self.grid_size, hidden_size)[None], persistent=False
        )
        self.time_embed = TimestepEmbedding(hidden_size, frequency_dim=256, num_timesteps=num_timesteps)
        self.label_embed = LabelEmbedding(self.num_classes, hidden_size) if self.num_classes is not None else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(hidden_size, self.patch_size, self.out_channels)
        self._init_weights()

    @property
    def input_size(self) -> int:
        """DiT's name for ``image_size``."""
        return self.image_size

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in self.time_embed.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.embedding.weight, std=0.02)
        # adaLN-Zero: modulation and the output projection start at zero.
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.final.modulation[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """``(B, N, p*p*C)`` tokens back to ``(B, C, H, W)`` images."""
        b, g, p, c = tokens.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = tokens.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict from noisy images ``x`` (B, C, H, W), time steps ``t`` (B,) and optional labels ``y`` (B,)."""
        t = check_inputs(
            type(self).__name__, x, t, y, (self.in_channels, self.image_size, self.image_size), self.num_classes
        )
        # x in the weights' dtype: a no-op for fp32 weights (autocast casts inside the conv), bf16 for a bf16 module
        h = self.patch_embed(x.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.time_embed(t)
        if self.label_embed is not None:
            c = c + self.label_embed(labels_or_null(y, x.shape[0], self.label_embed.null_label, x.device))
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final(h, c))


def dit(preset: DiTPreset, **kwargs) -> DiT:
    """A DiT of a preset size by name, e.g. ``dit("DiT-B/2", image_size=32, in_channels=4, learn_sigma=True)``."""
    return DiT(preset, **kwargs)


# The class names configs already use: DiT with one preset as the default.
class DiT_S_2(DiT):  # noqa: N801 - the paper's name
    default_preset = "DiT-S/2"


class DiT_B_2(DiT):  # noqa: N801 - the paper's name
    default_preset = "DiT-B/2"
