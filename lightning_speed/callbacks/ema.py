"""EMAWeightAveraging: Lightning's EMA callback with a sync-free, multi-tensor update, also under FSDP.

Lightning's ``EMAWeightAveraging`` delegates each update to ``torch.optim.swa_utils.AveragedModel``,
which reads its on-device ``n_averaged`` counter on the host twice per call (``bool(n == 0)``,
``if n > 0``) and then updates one tensor at a time. Those two reads block the CPU until the GPU
has finished the step, so the next step's launches can no longer overlap the current step's
kernels. This subclass keeps everything else (``should_update``, the averaged model, swapping in
for validation, checkpoint format) and replaces only the update: one ``_foreach_lerp_`` over all
floating tensors, with the "first update copies" decision kept on the host.

Under FSDP each rank holds only a shard of every parameter, so a full copy of the module cannot be
paired with its parameters. The average is elementwise, so there each rank averages the shard it
holds (``ShardAverage``): no communication per update and 1/N of the memory of a full copy. The full
average is gathered only where it is needed whole, through the strategy's own state-dict gathering:
checkpoints hold it in ``state_dict`` exactly as Lightning's layout does, so the average and the training
weights of a checkpoint written under FSDP load on one GPU too, and an EMA state written either way resumes in
the other (tested on one CPU process in tests/test_ema.py).

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
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_speed.validation import check_number


SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
"""Strategies that shard the parameters across ranks (the EMA averages FSDP's shards, not the others')."""


class ShardAverage:
    """Exponential moving average of the tensors one rank holds: a whole model, or its shard under FSDP.

    ``ema_1 = w_1``, ``ema_n = decay * ema_{n-1} + (1 - decay) * w_n`` for floating tensors; other
    tensors (integer buffers) are copied. Elementwise, so averaging each shard separately equals
    averaging the whole. ``n_averaged`` is a host counter: an update reads nothing back from the device.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.tensors: list[Tensor] | None = None
        self.n_averaged = 0
        self._floating: list[int] = []
        self._other: list[int] = []

    def update(self, current: list[Tensor]) -> None:
        if self.tensors is None:
            self.load(current, n_averaged=0)
        tensors = self._paired(current)
        floating = [tensors[i] for i in self._floating]
        if self.n_averaged == 0:
            torch._foreach_copy_(tensors, current)
        elif floating:
            torch._foreach_lerp_(floating, [current[i] for i in self._floating], 1.0 - self.decay)
        for i in self._other:
            tensors[i].copy_(current[i])
        self.n_averaged += 1

    def load(self, tensors: list[Tensor], n_averaged: int) -> None:
        """Take copies of ``tensors`` as the average of ``n_averaged`` updates."""
        self.tensors = [t.detach().clone() for t in tensors]
        self.n_averaged = n_averaged
        self._floating = [i for i, t in enumerate(self.tensors) if t.is_floating_point()]
        self._other = [i for i, t in enumerate(self.tensors) if not t.is_floating_point()]

    def swap(self, current: list[Tensor]) -> None:
        """Exchange the values of the average and ``current`` (no-op before the first update)."""
        if self.tensors is None:
            return
        tensors = self._paired(current)
        held = [t.clone() for t in current]
        torch._foreach_copy_(current, tensors)
        torch._foreach_copy_(tensors, held)

    def copy_to(self, current: list[Tensor]) -> None:
        if self.tensors is not None:
            torch._foreach_copy_(current, self._paired(current))

    def _paired(self, current: list[Tensor]) -> list[Tensor]:
        assert self.tensors is not None
        if len(current) != len(self.tensors):
            raise RuntimeError(
                f"The EMA holds {len(self.tensors)} parameters+buffers but the module has {len(current)}: the module "
                "changed after EMAWeightAveraging started averaging it (or pass use_ema=False to an evaluation callback)."
            )
        return self.tensors


class EMAWeightAveraging(_LightningEMA):
    """Exponential moving average of the weights, ``ema = decay * ema + (1 - decay) * weights``.

    A drop-in replacement for ``lightning.pytorch.callbacks.EMAWeightAveraging`` (same arguments,
    same checkpoints) whose per-step update makes no host-device synchronisation, and which also works
    under ``FSDPStrategy`` (each rank averages its own shard; ``state_dict_type`` must be ``full``).
    One difference: integer buffers (e.g. BatchNorm's step counter) are copied rather than averaged
    and truncated.
    """

    def __init__(self, *args: Any, decay: float = 0.999, **kwargs: Any) -> None:
        # 1 would freeze the average at the weights after the first update; 0 makes it the latest weights.
        decay = check_number(decay, "decay", at_least=0.0, below=1.0,
                             hint="0.999 or 0.9999 are common (1 never moves the average)")
        super().__init__(*args, decay=decay, **kwargs)
        self.decay = decay
        self._started: bool | None = None  # host copy of "n_averaged > 0", read once per fit
        self._pairs: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] | None = None
        self._training_state: dict[str, Tensor] | None = None  # the module's own weights once training has ended
        self._shards: ShardAverage | None = None  # the average when each rank averages what it holds (FSDP)
        self._training_shards: list[Tensor] | None = None  # the rank's own weights once training has ended

    def averages_shards(self, strategy: Strategy) -> bool:
        """Whether each rank averages the shard it holds (FSDP) instead of a full copy of the module."""
        return isinstance(strategy, FSDPStrategy)

    @property
    def holds_average(self) -> bool:
        """Whether an average exists to evaluate with or save (during and after ``fit``)."""
        return self._average_model is not None or self._shards is not None

    @property
    def n_averaged(self) -> int:
        """How many updates the average holds (reads the device counter of a full copy)."""
        if self._shards is not None:
            return self._shards.n_averaged
        return int(self._average_model.n_averaged) if self._average_model is not None else 0

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return super().setup(trainer, pl_module, stage)
        strategy = trainer.strategy
        if isinstance(strategy, SHARDED_STRATEGIES) and not self.averages_shards(strategy):
            raise ValueError(
                f"EMAWeightAveraging cannot average the weights under {type(strategy).__name__}: it averages either a "
                "full copy of the module or, under FSDPStrategy, each rank's shard. Train with FSDP "
                "(configs/multi_gpu/fsdp_dit_xl.yaml) or DDP (configs/multi_gpu/ddp.yaml), or drop the EMA (ema: null)."
            )
        if not self.averages_shards(strategy):
            self._shards = None
            return super().setup(trainer, pl_module, stage)
        state_dict_type = getattr(strategy, "_state_dict_type", "full")
        if state_dict_type != "full":
            raise ValueError(
                f"EMAWeightAveraging under FSDP needs FSDPStrategy(state_dict_type='full'), got {state_dict_type!r}: "
                "the average is gathered into the checkpoint's state_dict the way the training weights are, which a "
                "sharded (per-rank) checkpoint does not allow. Set trainer.strategy.init_args.state_dict_type: full."
            )
        if self._device is not None:
            raise ValueError(
                f"EMAWeightAveraging(device={self._device!r}) under FSDP: each rank averages its shard where the shard "
                "lives, so the device cannot be chosen. Leave device unset (the average takes 1/N of a full copy), or "
                "offload the shards themselves with FSDPStrategy(cpu_offload=True)."
            )
        self._average_model = None  # no full copy: the module is sharded after this hook
        self._shards = ShardAverage(self.decay)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        self._started = None  # a restored checkpoint may have changed n_averaged
        self._pairs = None
        self._training_state = None
        self._training_shards = None

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Keep the training weights, then copy the average into the module (as Lightning does)."""
        if self._shards is not None:
            self._training_shards = [t.clone() for t in self._held(pl_module)]
        else:
            self._training_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self._copy_average_to_current(pl_module)

    @override
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.holds_average:
            self._swap_models(pl_module)

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.holds_average:
            self._swap_models(pl_module)

    @override
    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        """Lightning's layout (average in ``state_dict``, training weights in ``current_model_state``),
        with the training weights from before the end-of-training copy when there was one."""
        if self._shards is None:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            if self._training_state is not None and "current_model_state" in checkpoint:
                checkpoint["current_model_state"] = self._training_state
            return
        # The strategy has gathered the module's weights into checkpoint["state_dict"] (on rank 0); the average is
        # gathered the same way, with its shards put into the module for the time being.
        shards = self._shards
        if self._training_shards is None:  # the module holds the training weights
            current = checkpoint["state_dict"]
            average = self._gathered_with(trainer, pl_module, shards.tensors) if shards.tensors is not None else current
        else:  # after on_train_end the module holds the average
            average = checkpoint["state_dict"]
            current = self._gathered_with(trainer, pl_module, self._training_shards)
        checkpoint["current_model_state"] = current
        checkpoint["state_dict"] = average
        checkpoint["averaging_state"] = {"n_averaged": torch.tensor(shards.n_averaged, dtype=torch.long)}

    @override
    def on_load_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        if self._shards is None:
            return super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if "current_model_state" not in checkpoint or "averaging_state" not in checkpoint:
            rank_zero_warn(
                "The checkpoint was not written with EMAWeightAveraging: the average starts from the loaded weights."
            )
            return
        # The strategy has loaded checkpoint["state_dict"], the average, into the module: keep it, then load the
        # training weights over it.
        n_averaged = int(checkpoint["averaging_state"]["n_averaged"])
        self._shards.load(self._held(pl_module), n_averaged=n_averaged)
        _load_full_state_dict(trainer, pl_module, checkpoint["current_model_state"])

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step_idx = trainer.global_step - 1  # zero-based, as in Lightning's WeightAveraging
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self.update(pl_module)
            self._latest_update_step = trainer.global_step

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.current_epoch > self._latest_update_epoch and self.should_update(epoch_idx=trainer.current_epoch):
            self.update(pl_module)
            self._latest_update_epoch = trainer.current_epoch

    @torch.no_grad()
    def update(self, pl_module: "pl.LightningModule") -> None:
        """One EMA step of the average towards ``pl_module``'s current weights."""
        if self._shards is not None:
            self._shards.update(self._held(pl_module))
            return
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

    @override
    def _swap_models(self, pl_module: "pl.LightningModule") -> None:
        if self._shards is None:
            return super()._swap_models(pl_module)
        with torch.no_grad():
            self._shards.swap(self._held(pl_module))

    @override
    def _copy_average_to_current(self, pl_module: "pl.LightningModule") -> None:
        if self._shards is None:
            return super()._copy_average_to_current(pl_module)
        with torch.no_grad():
            self._shards.copy_to(self._held(pl_module))

    def _held(self, pl_module: "pl.LightningModule") -> list[Tensor]:
        """The tensors this rank holds, in the order the average pairs them: parameters (under FSDP the rank's
        shard of each), then buffers if they are averaged. Read anew each time: FSDP re-points parameters at
        their shards after every forward and backward."""
        held = [p.detach() for p in pl_module.parameters()]
        if self._use_buffers:
            held += [b.detach() for b in pl_module.buffers()]
        return held

    @torch.no_grad()
    def _gathered_with(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", tensors: list[Tensor]) -> Any:
        """The strategy's full state dict of the module with ``tensors`` in place of the rank's own (collective)."""
        held = self._held(pl_module)
        own = [t.clone() for t in held]
        torch._foreach_copy_(held, tensors)
        try:
            state = trainer.strategy.lightning_module_state_dict()
            # copies, not views of the module: its own weights go back in below
            return {k: v.clone() if isinstance(v, Tensor) and v.device == held[0].device else v
                    for k, v in state.items()} if held else state
        finally:
            torch._foreach_copy_(held, own)


def _load_full_state_dict(trainer: "pl.Trainer", pl_module: "pl.LightningModule", state: dict[str, Any]) -> None:
    """Load a full (unsharded) state dict into the module, on every rank, under FSDP into each rank's shards."""
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy) and strategy.model is not None:
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=False)
        with FullyShardedDataParallel.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT, config):
            strategy.model.load_state_dict(state, strict=pl_module.strict_loading)
    else:
        pl_module.load_state_dict(state, strict=pl_module.strict_loading)


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
    """The trainer's active ``WeightAveraging`` callback (one holding an average), or None."""
    for callback in trainer.callbacks:
        if isinstance(callback, EMAWeightAveraging) and callback.holds_average:
            return callback
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
    """The swap pairs tensors by position (zip): a different count would silently mis-pair them.

    (A shard average checks its own pairing in ``ShardAverage.swap``.)"""
    if averaging._average_model is None:
        return
    average = averaging._average_model.module
    own = len(list(pl_module.parameters())) + len(list(pl_module.buffers()))
    avg = len(list(average.parameters())) + len(list(average.buffers()))
    if own != avg:
        raise RuntimeError(
            f"The EMA model has {avg} parameters+buffers but the module has {own}, so its weights cannot be "
            "swapped in for evaluation: the module changed after EMAWeightAveraging was set up "
            "(or pass use_ema=False to the evaluation callback)."
        )
