"""EMAWeightAveraging: Lightning's EMA callback with a sync-free, multi-tensor update.

Lightning's ``EMAWeightAveraging`` delegates each update to ``torch.optim.swa_utils.AveragedModel``,
which reads its on-device ``n_averaged`` counter on the host twice per call (``bool(n == 0)``,
``if n > 0``) and then updates one tensor at a time. Those two reads block the CPU until the GPU
has finished the step, so the next step's launches can no longer overlap the current step's
kernels. This subclass keeps everything else (``should_update``, the averaged model, swapping in
for validation, checkpoint format) and replaces only the update: one ``_foreach_lerp_`` over all
floating tensors, with the "first update copies" decision kept on the host.

Checkpoints written after training ends keep the training weights. Lightning copies the average
into the module when training ends; a checkpoint written after that (``ModelCheckpoint(save_last=True)``
when ``max_steps`` or a time limit stops training mid-epoch, or ``trainer.save_checkpoint`` after
``fit``) would otherwise store the average as the training weights, and a run resumed from it would
restart from the EMA weights with the optimizer state of the real ones.

``averaged_weights`` evaluates with the average at any time (every N training steps, train end),
for ``FIDCallback`` and ``SampleGridCallback``: it swaps the average in and back out with the
callback's own swap, the one Lightning uses around validation epochs, so parameters and buffers
pair exactly as there. It works with Lightning's ``EMAWeightAveraging`` too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging as _LightningEMA
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor
from typing_extensions import override

from lightning_speed.validation import check_number


SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
"""Strategies whose parameters are sharded across ranks, which the EMA copy cannot pair with."""


class EMAWeightAveraging(_LightningEMA):
    """Exponential moving average of the weights, ``ema = decay * ema + (1 - decay) * weights``.

    A drop-in replacement for ``lightning.pytorch.callbacks.EMAWeightAveraging`` (same arguments,
    same checkpoints) whose per-step update makes no host-device synchronisation. One difference:
    integer buffers (e.g. BatchNorm's step counter) are copied rather than averaged and truncated.
    """

    def __init__(self, *args: Any, decay: float = 0.999, **kwargs: Any) -> None:
        decay = check_number(decay, "decay", at_least=0.0, at_most=1.0, hint="0.999 or 0.9999 are common")
        super().__init__(*args, decay=decay, **kwargs)
        self.decay = decay
        self._started: bool | None = None  # host copy of "n_averaged > 0", read once per fit
        self._pairs: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] | None = None
        self._training_state: dict[str, Tensor] | None = None  # the module's own weights once training has ended

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and isinstance(trainer.strategy, SHARDED_STRATEGIES):
            raise ValueError(
                f"EMAWeightAveraging cannot average the weights under {type(trainer.strategy).__name__}: it keeps a "
                "full, unsharded copy of the module and pairs its tensors with the module's by position, which "
                "sharded parameters break. Train with DDP (configs/multi_gpu/ddp.yaml; DiT-XL/2 at batch 256 per GPU "
                "with its optimizer state and EMA takes 93 GiB, an H200), or drop the EMA (ema: null) under a "
                "sharded strategy."
            )
        super().setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        self._started = None  # a restored checkpoint may have changed n_averaged
        self._pairs = None
        self._training_state = None

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Keep the training weights, then let Lightning copy the average into the module."""
        self._training_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    @override
    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        """Lightning's layout (average in ``state_dict``, training weights in ``current_model_state``),
        with the training weights from before the end-of-training copy when there was one."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._training_state is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._training_state

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step_idx = trainer.global_step - 1  # zero-based, as in Lightning's WeightAveraging
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self.update(pl_module)
            self._latest_update_step = trainer.global_step

    @torch.no_grad()
    def update(self, pl_module: "pl.LightningModule") -> None:
        """One EMA step of the averaged model towards ``pl_module``'s current weights."""
        average = self._average_model
        assert average is not None, "update() before setup()"
        if self._started is None:
            self._started = bool(average.n_averaged > 0)  # one read per fit, not per step
        if self._pairs is None:  # built once per fit: rebuilding costs more host time than the update
            self._pairs = _update_lists(average.module, pl_module, average.use_buffers)
        avg_float, cur_float, avg_copied, cur_copied = self._pairs
        if not self._started:
            if avg_float:
                torch._foreach_copy_(avg_float, cur_float)
            self._started = True
        elif avg_float:
            torch._foreach_lerp_(avg_float, cur_float, 1.0 - self.decay)
        for a, c in zip(avg_copied, cur_copied):
            a.copy_(c.to(a.device))
        average.n_averaged += 1


def _update_lists(
    average: torch.nn.Module, model: torch.nn.Module, use_buffers: bool
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """(averaged, current) tensors to lerp, then (averaged, current) tensors to copy each update.

    Paired in ``AveragedModel``'s order. Floating tensors on the same device are averaged; integer
    buffers, tensors on another device and, without ``use_buffers``, all buffers (AveragedModel
    keeps those equal to the model's) are copied.
    """
    averaged, current = list(average.parameters()), list(model.parameters())
    averaged_buffers, current_buffers = list(average.buffers()), list(model.buffers())
    if use_buffers:
        averaged, current = averaged + averaged_buffers, current + current_buffers
    if len(averaged) != len(current) or len(averaged_buffers) != len(current_buffers):
        raise RuntimeError(
            f"The averaged model has {len(averaged)} tensors but the module has {len(current)}: "
            "the module's parameters changed after EMAWeightAveraging was set up."
        )
    lerp: tuple[list[Tensor], list[Tensor]] = ([], [])
    copy: tuple[list[Tensor], list[Tensor]] = ([], [])
    for a, c in zip(averaged, current):
        target = lerp if a.is_floating_point() and a.device == c.device else copy
        target[0].append(a.detach())
        target[1].append(c.detach())
    if not use_buffers:
        copy[0].extend(b.detach() for b in averaged_buffers)
        copy[1].extend(b.detach() for b in current_buffers)
    return lerp[0], lerp[1], copy[0], copy[1]


# ------------------------------------------------------------------ evaluating with the average
def find_weight_averaging(trainer: "pl.Trainer") -> WeightAveraging | None:
    """The trainer's active ``WeightAveraging`` callback (one holding an averaged model), or None."""
    for callback in trainer.callbacks:
        if isinstance(callback, WeightAveraging) and getattr(callback, "_average_model", None) is not None:
            return callback
    return None


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
    _check_pairing(averaging, pl_module)
    averaging._swap_models(pl_module)  # Lightning's swap around validation; no public equivalent
    try:
        yield True
    finally:
        averaging._swap_models(pl_module)


def _check_pairing(averaging: WeightAveraging, pl_module: "pl.LightningModule") -> None:
    """The swap pairs tensors by position (zip): a different count would silently mis-pair them."""
    average = averaging._average_model.module
    own = len(list(pl_module.parameters())) + len(list(pl_module.buffers()))
    avg = len(list(average.parameters())) + len(list(average.buffers()))
    if own != avg:
        raise RuntimeError(
            f"The EMA model has {avg} parameters+buffers but the module has {own}, so its weights cannot be "
            "swapped in for evaluation: the module changed after EMAWeightAveraging was set up "
            "(or pass use_ema=False to the evaluation callback)."
        )
