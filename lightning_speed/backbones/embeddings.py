"""Conditioning pieces shared by every backbone: time-step and class-label embeddings.

Kept in one place so the UNet and the DiT read ``t`` and ``y`` the same way, and so the
input checks (shapes only, never values: no host-device syncs) give the same messages.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..validation import is_integer_tensor


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sin/cos features of (possibly fractional) time steps.

    ``t`` has shape ``(B,)``; the result is ``(B, dim)`` float32, ``[cos | sin]`` halves with
    frequencies from 1 down to ``1 / max_period``. An odd ``dim`` gets one zero column.
    """
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(max_period) / half)
    args = t.to(torch.float32)[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedding(nn.Module):
    """``t -> MLP(sinusoid(t * 1000 / num_timesteps))``.

    Rescaling to a 1000-step range keeps the sinusoid's frequency coverage the same whatever
    ``T`` the schedule uses (identity at the usual ``T = 1000``).
    """

    def __init__(self, out_dim: int, frequency_dim: int = 256, num_timesteps: int = 1000) -> None:
        super().__init__()
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}.")
        self.frequency_dim = int(frequency_dim)
        self.time_scale = 1000.0 / float(num_timesteps)
        self.mlp = nn.Sequential(
            nn.Linear(self.frequency_dim, out_dim),
            nn.SiLU(),
            nn.Linear(out_dim, out_dim),
        )

    def forward(self, t: Tensor) -> Tensor:
        # The sinusoid is computed in fp32 (t up to 1000 needs it), then fed to the MLP in its weights' dtype
        # (a no-op for fp32 weights, autocast included; bf16 for a module cast to bf16).
        frequencies = sinusoidal_embedding(t.to(torch.float32) * self.time_scale, self.frequency_dim)
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))


class LabelEmbedding(nn.Module):
    """Class labels to vectors, with one extra row (index ``num_classes``) for "no label".

    The null row is what classifier-free guidance uses for the unconditional branch; the
    training module drops labels by replacing them with ``num_classes``.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive (or None for an unconditional model), got {num_classes}.")
        self.num_classes = int(num_classes)
        self.embedding = nn.Embedding(self.num_classes + 1, dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding(y)


def check_inputs(
    name: str,
    x: Tensor,
    t: Tensor,
    y: Tensor | None,
    expected_chw: tuple[int, int, int],
    num_classes: int | None,
) -> Tensor:
    """Shape-check a backbone call and return ``t`` as a ``(B,)`` tensor.

    Only shapes are inspected (python ints), so this costs no device sync and compiles away
    into guards under ``torch.compile``.
    """
    c, h, w = expected_chw
    if x.ndim != 4:
        raise ValueError(f"{name} expects a batch of images (B, C, H, W) but got a tensor of shape {tuple(x.shape)}.")
    if tuple(x.shape[1:]) != (c, h, w):
        got = "x".join(str(s) for s in x.shape[1:])
        raise ValueError(
            f"{name} expects {c}x{h}x{w} images but got {got}: set in_channels / the image size in the "
            "backbone's config to match the data, or pad / resize the data."
        )
    batch = x.shape[0]
    if t.ndim == 0:
        t = t.expand(batch)
    elif t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} expects t of shape ({batch},) (one time step per image) but got {tuple(t.shape)}.")
    if y is not None:
        if num_classes is None:
            raise ValueError(
                f"{name} got class labels y but was built without num_classes: set num_classes in the "
                "backbone's config for a class-conditional model, or pass y=None."
            )
        if y.ndim != 1 or y.shape[0] != batch:
            raise ValueError(f"{name} expects y of shape ({batch},) (one label per image) but got {tuple(y.shape)}.")
        if not is_integer_tensor(y):  # 2.7 would embed as class 2
            raise TypeError(f"{name} expects integer class labels y, got {y.dtype}: pass y.long() of whole class "
                            "numbers (0 .. num_classes - 1).")
    return t


def labels_or_null(y: Tensor | None, batch: int, num_classes: int, device: torch.device) -> Tensor:
    """``y`` itself, or the null label for the whole batch when a conditional model gets ``y=None``."""
    if y is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    return y.long()
