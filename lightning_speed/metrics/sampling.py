"""Generating evaluation images from a LightningModule, with EMA weights when training keeps them.

Shared by ``FIDCallback`` and ``SampleGridCallback``. EMA comes from Lightning's
``WeightAveraging`` callback (``EMAWeightAveraging``): it keeps an ``AveragedModel`` copy and
swaps it into the module only around validation epochs. For evaluations at other times
(every N training steps, train end) :func:`averaged_weights` swaps the averaged values in and
back out itself, pairing parameters and buffers the way that callback does; sampling then runs
on the live module (its device, its compiled backbone), and training resumes with its own weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

try:  # Lightning >= 2.5
    from lightning.pytorch.callbacks import WeightAveraging
except ImportError:  # pragma: no cover - older Lightning: no EMA callback to honour
    WeightAveraging = None  # type: ignore[assignment,misc]


def find_weight_averaging(trainer: "pl.Trainer") -> Any | None:
    """The trainer's active ``WeightAveraging`` callback (one holding an averaged model), or None."""
    if WeightAveraging is None:
        return None
    for callback in trainer.callbacks:
        if isinstance(callback, WeightAveraging) and getattr(callback, "_average_model", None) is not None:
            return callback
    return None


@torch.no_grad()
def _swap(averaging: Any, pl_module: "pl.LightningModule") -> None:
    average = averaging._average_model.module
    own = list(pl_module.parameters()) + list(pl_module.buffers())
    avg = list(average.parameters()) + list(average.buffers())
    if len(own) != len(avg):
        raise RuntimeError(
            f"the EMA model has {len(avg)} parameters+buffers but the module has {len(own)}; "
            "cannot evaluate with averaged weights (pass use_ema=False to the callback)."
        )
    for a, b in zip(avg, own):
        tmp = a.detach().clone()
        a.copy_(b.detach())
        b.copy_(tmp)


def ema_swapped_in_during_validation(trainer: "pl.Trainer", caller: "pl.Callback") -> bool:
    """In ``on_validation_epoch_end``: are the EMA weights still in the module when ``caller`` runs?

    ``WeightAveraging`` swaps at validation-epoch start and swaps back at its own epoch end;
    callbacks run in ``trainer.callbacks`` order, so they are still in iff it comes after ``caller``.
    """
    averaging = find_weight_averaging(trainer)
    if averaging is None:
        return False
    callbacks = list(trainer.callbacks)
    return callbacks.index(averaging) > callbacks.index(caller)


@contextmanager
def averaged_weights(
    trainer: "pl.Trainer", pl_module: "pl.LightningModule", *, enabled: bool = True, already_in: bool = False
) -> Iterator[bool]:
    """Run the body with the EMA weights in ``pl_module`` (if any); restore the training weights after.

    Yields whether EMA weights are in use. ``already_in``: the caller knows they are swapped in.
    """
    averaging = find_weight_averaging(trainer) if enabled else None
    if averaging is None or already_in:
        yield averaging is not None
        return
    _swap(averaging, pl_module)
    try:
        yield True
    finally:
        _swap(averaging, pl_module)


def local_share(total: int, world_size: int, rank: int) -> int:
    """How many of ``total`` samples rank ``rank`` generates (the first ranks take the remainder)."""
    return total // world_size + (1 if rank < total % world_size else 0)


@torch.no_grad()
def generate_batches(
    pl_module: "pl.LightningModule",
    num_samples: int,
    *,
    batch_size: int,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float | None = None,
    seed: int = 0,
    sample_kwargs: dict[str, Any] | None = None,
) -> Iterator[Tensor]:
    """Yield ``num_samples`` images in [-1, 1] in batches from ``pl_module.sample`` with a fixed seed.

    A fresh generator seeded with ``seed`` on the module's device makes successive calls draw the
    same noise, so evaluations at different steps are comparable.
    """
    if not callable(getattr(pl_module, "sample", None)):
        raise TypeError(
            f"{type(pl_module).__name__} has no sample(num_samples, *, steps, sampler, eta, generator, ...) method; "
            "evaluation callbacks need it (see lightning_speed.module.DiffusionModule.sample)."
        )
    device = pl_module.device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    kwargs: dict[str, Any] = {"steps": steps, "sampler": sampler, "generator": generator, **(sample_kwargs or {})}
    if eta is not None:
        kwargs["eta"] = eta
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        images = pl_module.sample(n, **kwargs)
        if images.shape[0] != n:
            raise ValueError(f"{type(pl_module).__name__}.sample({n}) returned {images.shape[0]} images.")
        yield images
