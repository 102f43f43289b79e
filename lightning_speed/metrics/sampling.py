"""Generating evaluation images from a LightningModule in fixed-seed batches.

Shared by ``FIDCallback`` and ``SampleGridCallback``, which wrap it in
``lightning_speed.callbacks.ema.averaged_weights`` to evaluate the EMA weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor


def local_share(total: int, world_size: int, rank: int) -> int:
    """How many of ``total`` samples rank ``rank`` generates (the first ranks take the remainder)."""
    return total // world_size + (1 if rank < total % world_size else 0)


def sample_method(pl_module: "pl.LightningModule") -> Callable[..., Tensor]:
    """``pl_module.sample``, or a ``TypeError`` saying that evaluation callbacks need one."""
    sample = getattr(pl_module, "sample", None)
    if not callable(sample):
        raise TypeError(
            f"{type(pl_module).__name__} has no sample(num_samples, *, solver, solver_steps, eta, generator, ...) method; "
            "evaluation callbacks need it (see lightning_speed.module.DiffusionModule.sample)."
        )
    return sample


def precision_context(pl_module: "pl.LightningModule") -> Any:
    """The Trainer's precision context, in which Lightning runs a module's own steps: under ``bf16-true`` tensors
    made without a dtype are bf16 like the weights (a ``sample`` drawing float32 noise failed against them), under
    ``bf16-mixed`` autocast. A module that sets its own sampling precision says so with ``sets_sampling_precision``
    (``DiffusionModule``: autocast, its noise and solver in float32) and is left to it."""
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None or getattr(pl_module, "sets_sampling_precision", False):
        return nullcontext()
    return trainer.precision_plugin.forward_context()


@torch.no_grad()
def generate_batches(
    pl_module: "pl.LightningModule",
    num_samples: int,
    *,
    batch_size: int,
    solver: str = "ddim",
    solver_steps: int = 50,
    eta: float | None = None,
    seed: int = 0,
    sample_kwargs: dict[str, Any] | None = None,
) -> Iterator[Tensor]:
    """Yield ``num_samples`` images in [-1, 1] in batches from ``pl_module.sample`` with a fixed seed.

    A fresh generator seeded with ``seed`` on the module's device makes successive calls draw the
    same noise, so evaluations at different steps are comparable. A module with a ``decode`` method
    (``DiffusionModule``: latents -> images with an autoencoder, else the identity) has its samples decoded.
    ``sample`` runs in the Trainer's precision context (``precision_context``).
    """
    sample = sample_method(pl_module)
    device = pl_module.device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    kwargs: dict[str, Any] = {"solver": solver, "solver_steps": solver_steps, "generator": generator, **(sample_kwargs or {})}
    if eta is not None:
        kwargs["eta"] = eta
    decode = getattr(pl_module, "decode", None)
    decode = decode if callable(decode) else None
    name = type(pl_module).__name__
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        with precision_context(pl_module):
            images = check_images(sample(n, **kwargs), f"{name}.sample({n})")
        if images.shape[0] != n:
            raise ValueError(f"{name}.sample({n}) returned {images.shape[0]} images.")
        yield check_images(decode(images), f"{name}.decode") if decode is not None else images


def check_images(images: Any, source: str) -> Tensor:
    """``images`` if it is a float (N, C, H, W) tensor, as ``sample`` (and ``decode``) must return: anything else
    would fail deep inside the feature network or the PNG writer, or (integers) be read on the wrong scale."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        what = f"a {images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else (
            f"a {type(images).__name__}")
        raise TypeError(f"{source} returned {what}; it must return a float tensor (num_samples, C, H, W) in [-1, 1].")
    if images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
        raise ValueError(
            f"{source} returned images of shape {tuple(images.shape)}, which look channels-last (N, H, W, C); it "
            "must return (num_samples, C, H, W): permute them with images.permute(0, 3, 1, 2)."
        )
    return images
