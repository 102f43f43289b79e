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
pair exactly as there. It works with Lightning's ``EMAWeightAveraging`` too. ``training_weights`` is its
counterpart for ``use_ema=False``: after the copy at train end it puts the kept training weights back in for the
evaluation (Lightning's callback keeps none, so an evaluation after it is refused at setup).

The average is held in float32 or the module's dtype, whichever is wider: under ``precision="bf16-true"``
(or ``16-true``) an fp32 average of the bf16 weights, as Lightning's keeps (its copy is made before the
precision plugin converts the module); a bf16 average would not move at all, since ``(1 - decay) * (w - ema)``
is below bf16's resolution for a decay such as 0.999. Under ``64-true`` the average is float64. Where the two
dtypes differ, evaluation puts the average into the module (rounded) and the training weights back from a
copy, so evaluating never rounds the average itself. Under FSDP the checkpoint's average is gathered through
the module and so holds the module's dtype.

With ``warmup=True`` the decay grows with the number of updates n already averaged, as in diffusers' ``EMAModel``
(``use_ema_warmup``): ``decay_n = min(decay, 1 - (1 + n / inv_gamma) ** -power)``. Early on the average then
follows the weights instead of keeping a share ``decay ** n`` of the first ones; ``power=1, inv_gamma=1`` is the
running mean of all the weights seen. ``power`` 3/4 reaches 0.999 after 10k updates, 2/3 after 31.6k.

Until its first update the average is the training weights, not the weights it was created from: validation,
``averaged_weights`` and checkpoints use the training weights (with a warning once training has started), and
training ends with them. Lightning's callback evaluates, saves and ends with the initial weights there, e.g.
while ``update_starting_at_step`` is ahead. A schedule that cannot update within ``max_steps`` is refused at setup.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging as _LightningEMA
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from typing_extensions import override

from lightning_speed.validation import check_bool, check_int, check_number

SLOW_START_SHARE = 0.01
"""The share of the first weights left in an average at the run's end above which setup warns (no warm-up)."""

SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
"""Strategies that shard the parameters across ranks (the EMA averages FSDP's shards, not the others')."""


class ShardAverage:
    """Exponential moving average of the tensors one rank holds: a whole model, or its shard under FSDP.

    ``ema_1 = w_1``, ``ema_n = decay * ema_{n-1} + (1 - decay) * w_n`` for floating tensors, held in
    ``average_dtype`` (fp32 for bf16 weights); other tensors (integer buffers) are copied. Elementwise, so
    averaging each shard separately equals averaging the whole. ``n_averaged`` is a host counter: an update
    reads nothing back from the device. Before the first update there is no average: ``swap`` and ``copy_to``
    leave ``current`` as it is.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.tensors: list[Tensor] | None = None
        self.n_averaged = 0
        self._floating: list[int] = []  # averaged in the tensor's own dtype
        self._widened: list[int] = []  # averaged in a wider dtype than the tensor's (fp32 of bf16)
        self._other: list[int] = []
        self._stash: list[Tensor] | None = None  # the training values of widened tensors while the average is in

    def update(self, current: list[Tensor], decay: float | None = None) -> None:
        """Average ``current`` in with ``decay`` (None: this average's own)."""
        decay = self.decay if decay is None else decay
        if self.tensors is None:
            self.load(current, n_averaged=0)
        tensors = self._paired(current)
        floating = [tensors[i] for i in self._floating]
        widened = [tensors[i] for i in self._widened]
        if self.n_averaged == 0:
            torch._foreach_copy_(tensors, current)
        else:
            if floating:
                torch._foreach_lerp_(floating, [current[i] for i in self._floating], 1.0 - decay)
            if widened:  # lerp needs one dtype; decay * ema + (1 - decay) * w takes the narrower w as it is
                torch._foreach_mul_(widened, decay)
                torch._foreach_add_(widened, [current[i] for i in self._widened], alpha=1.0 - decay)
        for i in self._other:
            tensors[i].copy_(current[i])
        self.n_averaged += 1

    def load(self, tensors: list[Tensor], n_averaged: int) -> None:
        """Take copies of ``tensors`` (floating ones in ``average_dtype``) as the average of ``n_averaged``
        updates."""
        self.tensors = [t.detach().to(average_dtype(t.dtype), copy=True) for t in tensors]
        self.n_averaged = n_averaged
        self._floating = [i for i, (a, t) in enumerate(zip(self.tensors, tensors))
                          if a.is_floating_point() and a.dtype == t.dtype]
        self._widened = [i for i, (a, t) in enumerate(zip(self.tensors, tensors))
                         if a.is_floating_point() and a.dtype != t.dtype]
        self._other = [i for i, t in enumerate(self.tensors) if not t.is_floating_point()]
        self._stash = None

    def swap(self, current: list[Tensor]) -> None:
        """Put the average into ``current``, or the training values back (alternate calls); no-op before the
        first update."""
        if self.tensors is None or self.n_averaged == 0:
            return
        self._stash = _swap_in_or_out(self._paired(current), current, self._stash)

    def copy_to(self, current: list[Tensor]) -> None:
        if self.tensors is not None and self.n_averaged > 0:
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
    Differences: integer buffers (e.g. BatchNorm's step counter) are copied rather than averaged
    and truncated; the average is held in fp32 under ``bf16-true`` and in fp64 under ``64-true``;
    an average that has not been updated yet stands for the training weights, never the initial ones
    (see the module docstring); and the average's copy of the module copies only its weights, sharing its
    other attributes (a LightningCLI optimizer factory, which cannot be copied under DDP, stays the module's);
    ``validate``/``test``/``predict`` with a ``ckpt_path`` after ``fit`` evaluate the checkpoint's average, as a new
    Trainer does; and the epoch of the last update is saved, so resuming at an epoch's end does not repeat its update.

    ``warmup``, ``inv_gamma`` and ``power``: diffusers' EMA warm-up (see the module docstring); off by default.

    ``update_every_n_steps`` must be at least 1, or 0 together with ``update_starting_at_epoch`` (updates
    after epochs only, as in Lightning). A schedule whose first update would come at or after
    ``trainer.max_steps`` (or ``max_epochs``) is refused at setup: such a run would end with no average.
    """

    def __init__(
        self,
        *args: Any,
        decay: float = 0.999,
        warmup: bool = False,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        **kwargs: Any,
    ) -> None:
        for name in ("avg_fn", "multi_avg_fn"):  # a config lists them as null (AveragedModel's arguments)
            if name in kwargs and kwargs[name] is None:
                del kwargs[name]
        unknown = sorted(set(kwargs) - {"device", "use_buffers"})
        if unknown:  # Lightning passes these on to AveragedModel; an averaging function would never be called here
            raise TypeError(
                f"EMAWeightAveraging got unknown argument(s) {', '.join(unknown)}: it takes device, use_buffers, "
                "decay, warmup, inv_gamma, power and update_every_n_steps/update_starting_at_step/_epoch, and always "
                "averages with decay (avg_fn and multi_avg_fn are not used). For another average use Lightning's "
                "WeightAveraging."
            )
        # 1 would freeze the average at the weights after the first update; 0 makes it the latest weights.
        decay = check_number(decay, "decay", at_least=0.0, below=1.0,
                             hint="0.999 or 0.9999 are common (1 never moves the average)")
        self.warmup = check_bool(warmup, "warmup")
        self.inv_gamma = check_number(inv_gamma, "inv_gamma", above=0.0, hint="diffusers uses 1")
        self.power = check_number(power, "power", above=0.0, hint="3/4 for runs up to ~100k steps, 2/3 for longer")
        if update_starting_at_epoch is not None:
            update_starting_at_epoch = check_int(update_starting_at_epoch, "update_starting_at_epoch", minimum=0)
        if update_starting_at_step is not None:
            update_starting_at_step = check_int(update_starting_at_step, "update_starting_at_step", minimum=0,
                                                hint="null starts at the first step")
        # 0 turns the per-step updates off (Lightning's meaning): only sensible with per-epoch updates.
        update_every_n_steps = check_int(
            update_every_n_steps, "update_every_n_steps", minimum=0 if update_starting_at_epoch is not None else 1,
            hint="1 updates the average after every optimizer step; 0 never does, and is allowed only with "
                 "update_starting_at_epoch set (updates after each epoch instead)",
        )
        super().__init__(*args, decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step,
                         update_starting_at_epoch=update_starting_at_epoch, **kwargs)
        self.decay = decay
        self._updates: int | None = None  # host copy of n_averaged: read once per fit, then counted here
        self._stash: list[Tensor] | None = None  # a full copy's counterpart of ShardAverage._stash
        self._warned_not_updated = False  # once per fit
        self._pairs: tuple[list[Tensor], ...] | None = None  # see _update_lists
        self._training_state: dict[str, Tensor] | None = None  # the module's own weights once training has ended
        self._shards: ShardAverage | None = None  # the average when each rank averages what it holds (FSDP)
        self._training_shards: list[Tensor] | None = None  # the rank's own weights once training has ended

    def decay_at(self, n: int) -> float:
        """The decay of the update that averages in new weights after ``n >= 1`` updates."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + n / self.inv_gamma) ** -self.power)

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
        self._check_schedule(trainer)
        strategy = trainer.strategy
        if isinstance(strategy, SHARDED_STRATEGIES) and not self.averages_shards(strategy):
            raise ValueError(
                f"EMAWeightAveraging cannot average the weights under {type(strategy).__name__}: it averages either a "
                "full copy of the module or, under FSDPStrategy, each rank's shard. Train with FSDP "
                "(configs/multi_gpu/fsdp_dit_xl.yaml) or DDP (configs/multi_gpu/ddp.yaml), or drop the EMA (ema: null)."
            )
        if not self.averages_shards(strategy):
            self._shards = None
            if is_overridden("configure_model", pl_module):  # its layers must exist before the copy (as in Lightning)
                pl_module.configure_model()
            device = self._device or pl_module.device
            # AveragedModel deep-copies the module it is given: it gets an empty one, then a copy of the weights only
            self._average_model = AveragedModel(nn.Module(), device=device, use_buffers=self._use_buffers, **self._kwargs)
            self._average_model.module = _copy_of_weights(pl_module).to(device)
            return
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

    def _check_schedule(self, trainer: "pl.Trainer") -> None:
        """Refuse a schedule that cannot update the average before ``max_steps``/``max_epochs`` end the run: it
        would end with the training weights in the average's place. Not under ``fast_dev_run``, which stops
        after a batch or two whatever the schedule; limits known only later (``max_time``, an epoch's length
        under ``max_epochs``) are left to the warning at train end."""
        if trainer.fast_dev_run:
            return
        every, start = self.update_every_n_steps, self.update_starting_at_step or 0
        first_step = -(-start // every) * every if every > 0 else None  # zero-based index of the first update
        max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
        by_steps = first_step is not None and (max_steps is None or max_steps < 0 or first_step < max_steps)
        epoch = self.update_starting_at_epoch
        by_epochs = epoch is not None and (max_epochs is None or max_epochs < 0 or epoch < max_epochs)
        if by_steps or by_epochs:
            # the most updates the limits allow; unknown (no warning) while one kind of update has no limit
            steps_set, epochs_set = (limit is not None and limit > 0 for limit in (max_steps, max_epochs))
            if (steps_set or not by_steps) and (epochs_set or not by_epochs):
                step_updates = 1 + (max_steps - 1 - first_step) // every if by_steps else 0
                self._warn_slow_start(step_updates + (max_epochs - epoch if by_epochs else 0))
            return
        first = [f"after optimizer step {first_step + 1}"] if first_step is not None else []
        first += [f"after epoch {epoch + 1}"] if epoch is not None else []
        limit = f"trainer.max_steps={max_steps}" + (f" and max_epochs={max_epochs}" if epoch is not None else "")
        raise ValueError(
            f"EMAWeightAveraging would never update its average: with {self._schedule()} its first update comes "
            f"{' or '.join(first)}, but the run stops at {limit} before that, so the checkpoint, samples and FID "
            "would be of the training weights, not an average. Start the updates earlier (update_starting_at_step "
            "below max_steps: it counts steps from 0), raise the trainer's limit, or drop the EMA (ema: null)."
        )

    def _warn_slow_start(self, updates: int) -> None:
        """Without a warm-up the average keeps a share decay**(n - 1) of the first weights after n updates (the first
        copies them): warn when more than 1 % is left at the run's end (0.9999 over 30k steps keeps 5 %, and the FID
        of that average lags the training weights' by far more than its share; BENCHMARKS.md, the strategy study)."""
        share = self.decay ** (updates - 1)
        if self.warmup or share <= SLOW_START_SHARE:
            return
        rank_zero_warn(
            f"EMAWeightAveraging(decay={self.decay}) without warm-up, over {updates} updates, still holds "
            f"{share:.1%} of the first (untrained) weights at the end of the run, and more before: samples, FID and "
            "checkpoints judge that average. Set warmup: true (configs/study/ema_warmup.yaml), or lower the decay."
        )

    def _schedule(self) -> str:
        text = f"update_every_n_steps={self.update_every_n_steps}, "
        text += f"update_starting_at_step={self.update_starting_at_step}"
        if self.update_starting_at_epoch is not None:
            text += f", update_starting_at_epoch={self.update_starting_at_epoch}"
        return text

    def _updated(self) -> bool:
        """Whether the average holds at least one update (reads the device counter of a full copy once per fit)."""
        if self._shards is not None:
            return self._shards.n_averaged > 0
        if self._average_model is None:
            return False
        if self._updates is None:
            self._updates = int(self._average_model.n_averaged)
        return self._updates > 0

    def _warn_not_updated(self, trainer: "pl.Trainer") -> None:
        """Say (once per fit) that the training weights stand in for an average that has no update yet; not
        before the first step, when the two are the same weights (the sanity check)."""
        if self._warned_not_updated or trainer.global_step == 0 or self._updated():
            return
        self._warned_not_updated = True
        rank_zero_warn(
            f"EMAWeightAveraging has not updated its average yet at step {trainer.global_step} ({self._schedule()}): "
            "until it does, validation, samples, FID and checkpoints use the training weights in its place."
        )

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        self._updates = None  # a restored checkpoint may have changed n_averaged
        self._pairs = None
        self._training_state = None
        self._training_shards = None
        self._stash = None
        self._warned_not_updated = False
        if self._average_model is not None:
            # The copy was made at setup, before the precision plugin converted the module (bf16-true, 64-true).
            _widen(self._average_model.module, pl_module)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Keep the training weights, then copy the average into the module (as Lightning does) if it was updated."""
        self._keep_training_weights(pl_module)
        if not self._updated() and trainer.global_step > 0:
            rank_zero_warn(
                f"EMAWeightAveraging never updated its average in {trainer.global_step} steps ({self._schedule()}): "
                "the model keeps its training weights, and checkpoints store them in the average's place. Lower "
                "update_starting_at_step or update_every_n_steps, train longer, or drop the EMA (ema: null)."
            )
        self._copy_average_to_current(pl_module)

    def _keep_training_weights(self, pl_module: "pl.LightningModule") -> None:
        """Keep a copy of the module's weights, the training weights, for checkpoints and ``training_weights``."""
        if self._shards is not None:
            self._training_shards = [t.clone() for t in self._held(pl_module)]
        else:
            self._training_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    @override
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.holds_average:
            self._warn_not_updated(trainer)
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
        if self.holds_average:
            self._warn_not_updated(trainer)
        if self._shards is None:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            if self._training_state is not None and "current_model_state" in checkpoint:
                checkpoint["current_model_state"] = self._training_state
            if "current_model_state" in checkpoint and not self._updated():  # the training weights, not the initial
                checkpoint["state_dict"] = checkpoint["current_model_state"]
            return
        # The strategy has gathered the module's weights into checkpoint["state_dict"] (on rank 0); the average is
        # gathered the same way, with its shards put into the module for the time being.
        shards = self._shards
        if self._training_shards is None:  # the module holds the training weights
            current = checkpoint["state_dict"]
            average = self._gathered_with(trainer, pl_module, shards.tensors) if shards.n_averaged > 0 else current
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
        with_average = "current_model_state" in checkpoint and "averaging_state" in checkpoint
        if with_average and trainer.state.fn == TrainerFn.FITTING:
            _warn_if_average_resumes(checkpoint, self.decay)
        if self._shards is None:
            if with_average and self._average_model is not None:
                _widen_to_saved(self._average_model.module, checkpoint["state_dict"])
                self._pairs = None
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
        elif not with_average:
            rank_zero_warn(
                "The checkpoint was not written with EMAWeightAveraging: the average starts from the loaded weights."
            )
            return
        else:
            # The strategy has loaded checkpoint["state_dict"], the average, into the module: keep it, then load the
            # training weights over it.
            n_averaged = int(checkpoint["averaging_state"]["n_averaged"])
            self._shards.load(self._held(pl_module), n_averaged=n_averaged)
            _load_full_state_dict(trainer, pl_module, checkpoint["current_model_state"])
        if with_average and self.holds_average and trainer.state.fn != TrainerFn.FITTING:
            # validate/test/predict(ckpt_path=...) after a fit, which left an average: evaluate the checkpoint's
            # average, as a new Trainer does, not its training weights (kept for checkpoints, as at train end)
            self._updates = None  # the checkpoint's counter
            self._stash = None
            self._keep_training_weights(pl_module)
            self._copy_average_to_current(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        # the epoch of the last update too: a fit resumed from a checkpoint written at an epoch's end runs that
        # epoch's end again, which must not average the weights in a second time
        return {**super().state_dict(), "latest_update_epoch": self._latest_update_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._latest_update_epoch = state_dict.get("latest_update_epoch", -1)  # Lightning's checkpoints lack it

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
            self._shards.update(self._held(pl_module), self.decay_at(self._shards.n_averaged))
            return
        average = self._average_model
        assert average is not None, "update() before setup()"
        self._updated()  # reads n_averaged into _updates once per fit, not per step
        if self._pairs is None:  # built once per fit: rebuilding costs more host time than the update
            self._pairs = _update_lists(average.module, pl_module, average.use_buffers)
        avg_float, cur_float, avg_converted, cur_converted, avg_copied, cur_copied = self._pairs
        if self._updates == 0:
            if avg_float:
                torch._foreach_copy_(avg_float, cur_float)
            if avg_converted:  # copy_ converts dtype and device
                torch._foreach_copy_(avg_converted, cur_converted)
        else:
            decay = self.decay_at(self._updates)
            if avg_float:
                torch._foreach_lerp_(avg_float, cur_float, 1.0 - decay)
            if avg_converted:
                # lerp needs one dtype and device; decay * ema + (1 - decay) * w takes bf16 weights of an fp32
                # average as they are (no fp32 copy of the model per step); only an average on another device
                # (EMAWeightAveraging(device=...)) needs the weights moved
                ends = [c if c.device == a.device else c.to(a.device) for a, c in zip(avg_converted, cur_converted)]
                torch._foreach_mul_(avg_converted, decay)
                torch._foreach_add_(avg_converted, ends, alpha=1.0 - decay)
        for a, c in zip(avg_copied, cur_copied):
            a.copy_(c.to(a.device))
        average.n_averaged += 1
        self._updates += 1

    @override
    def _swap_models(self, pl_module: "pl.LightningModule") -> None:
        """Put the average into the module, or the training weights back (alternate calls); no-op while the
        average has no update (it stands for the training weights then)."""
        if not self._updated():
            return
        with torch.no_grad():
            if self._shards is not None:
                return self._shards.swap(self._held(pl_module))
            assert self._average_model is not None
            # parameters, then every buffer (averaged or not), as Lightning's swap pairs them
            average = [t.detach() for t in [*self._average_model.module.parameters(),
                                            *self._average_model.module.buffers()]]
            current = [t.detach() for t in [*pl_module.parameters(), *pl_module.buffers()]]
            self._stash = _swap_in_or_out(average, current, self._stash)

    @override
    def _copy_average_to_current(self, pl_module: "pl.LightningModule") -> None:
        if not self._updated():
            return
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


_MODULE_STATE = frozenset(vars(nn.Module()))
"""nn.Module's own attributes (parameters, buffers, submodules, hooks): copied with the module, never shared."""


def _copy_of_weights(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (its tree of submodules) with its own parameters and buffers; every other attribute is
    the original's, not a copy.

    The average needs only the weights. A plain deep copy would also copy the module's configuration: the optimizer
    factory LightningCLI gives a module holds the CLI itself, its parser and trainer (thread locks under DDP, which
    cannot be copied), and an autoencoder kept as a plain attribute would be copied whole. Sharing those through
    deepcopy's memo, rather than a ``__deepcopy__`` on our module, works for any LightningModule.
    """
    memo: dict[int, Any] = {}
    for submodule in module.modules():
        for name, value in vars(submodule).items():
            if name not in _MODULE_STATE and not isinstance(value, (Tensor, nn.Module)):
                memo[id(value)] = value
    return deepcopy(module, memo)


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
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """(averaged, current) tensors to lerp as they are, (averaged, current) tensors to lerp after converting the
    current one to the average's dtype and device, then (averaged, current) tensors to copy each update.

    Paired in ``AveragedModel``'s order. Floating tensors are averaged; integer buffers and, without
    ``use_buffers``, all buffers (AveragedModel keeps those equal to the model's) are copied.
    """
    averaged, current = list(average.parameters()), list(model.parameters())
    averaged_buffers, current_buffers = list(average.buffers()), list(model.buffers())
    if use_buffers:
        averaged, current = averaged + averaged_buffers, current + current_buffers
    if len(averaged) != len(current) or len(averaged_buffers) != len(current_buffers):
        raise RuntimeError(
            f"The averaged model has {len(averaged)} tensors but the module has {len(current)}: "
            "the module's parameters or buffers changed after EMAWeightAveraging copied it at setup. Create them all "
            "in the module's __init__ or configure_model (called before the copy), not in a later hook or forward."
        )
    lerp: tuple[list[Tensor], list[Tensor]] = ([], [])
    converted: tuple[list[Tensor], list[Tensor]] = ([], [])
    copy: tuple[list[Tensor], list[Tensor]] = ([], [])
    for a, c in zip(averaged, current):
        if not a.is_floating_point():
            target = copy
        else:
            target = lerp if a.dtype == c.dtype and a.device == c.device else converted
        target[0].append(a.detach())
        target[1].append(c.detach())
    if not use_buffers:
        copy[0].extend(b.detach() for b in averaged_buffers)
        copy[1].extend(b.detach() for b in current_buffers)
    return lerp[0], lerp[1], converted[0], converted[1], copy[0], copy[1]


def average_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the average of a tensor of ``dtype`` is held in: float32 or ``dtype``, whichever is wider
    (an fp32 average of bf16/fp16 weights, fp64 of fp64); other dtypes (integer buffers) as they are."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype


@torch.no_grad()
def _widen(average: torch.nn.Module, model: torch.nn.Module) -> None:
    """Hold each floating tensor of the ``average`` copy in ``average_dtype`` of the model's tensor."""
    for a, c in zip([*average.parameters(), *average.buffers()], [*model.parameters(), *model.buffers()]):
        if a.is_floating_point() and a.dtype != average_dtype(c.dtype):
            a.data = a.data.to(average_dtype(c.dtype))


def _warn_if_average_resumes(checkpoint: dict[str, Any], decay: float) -> None:
    """Warn when a checkpoint's training weights are its average: Lightning's callback writes that after training
    ended (it copies the average into the module first), and a fit resumed from it trains on from the average. Past
    two updates with a decay above 0 the two differ in every real run, and the first tensor compared tells."""
    n_averaged = int(checkpoint["averaging_state"].get("n_averaged", 0))
    average, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    floating = [k for k, v in average.items() if isinstance(v, Tensor) and v.is_floating_point()]
    if n_averaged < 2 or decay == 0 or not floating or average.keys() != current.keys():
        return
    if all(torch.equal(average[k], current[k]) for k in floating):
        rank_zero_warn(
            f"The checkpoint's training weights are its EMA average ({n_averaged} updates): it was written after "
            "training ended by Lightning's EMAWeightAveraging, which copies the average into the model first, so this "
            "fit trains on from the average, not from the weights the run stopped at. Resume from a checkpoint "
            "written during training (ModelCheckpoint(every_n_train_steps=...)) to continue the run exactly."
        )


@torch.no_grad()
def _widen_to_saved(average: torch.nn.Module, saved: dict[str, Any]) -> None:
    """Hold each floating tensor of the ``average`` copy in at least the dtype the checkpoint saved it in, so that
    loading it does not round it. The copy is made at setup, before the precision plugin converts the module: an
    fp64 average (``64-true``) would be loaded into an fp32 copy, an fp32 one into a bf16 copy of a module created
    in bf16 (``trainer.init_module()`` under ``bf16-true``). ``on_fit_start`` then sets the dtype the run averages
    in."""
    for name, a in [*average.named_parameters(), *average.named_buffers()]:
        s = saved.get(name)
        if isinstance(s, Tensor) and s.is_floating_point() and a.is_floating_point():
            wider = torch.promote_types(a.dtype, s.dtype)
            if wider != a.dtype:
                a.data = a.data.to(wider)


def _swap_in_or_out(average: list[Tensor], current: list[Tensor], stash: list[Tensor] | None) -> list[Tensor] | None:
    """Put the average into ``current``, or the training values back (alternate calls); returns the next stash.

    Pairs of one dtype exchange values, which is lossless both ways. Where the average is held in a wider dtype
    (an fp32 average of bf16 weights), an exchange would round the average to the module's dtype at every
    evaluation, so on the way in the module's values are kept aside, and on the way out they are copied back.
    """
    putting_in = stash is None
    kept: list[Tensor] = []
    stashed = iter(stash or [])
    for a, c in zip(average, current, strict=True):
        if a.dtype == c.dtype:
            held = c.clone()
            c.copy_(a)
            a.copy_(held)
        elif putting_in:
            kept.append(c.clone())
            c.copy_(a)
        else:
            c.copy_(next(stashed))
    return kept if putting_in and kept else None


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
    if averaging is None or (isinstance(averaging, EMAWeightAveraging) and not averaging._updated()):
        return False  # (our callback leaves the training weights in while it has no update)
    callbacks = list(trainer.callbacks)
    return callbacks.index(averaging) > callbacks.index(caller)


@contextmanager
def averaged_weights(
    trainer: "pl.Trainer", pl_module: "pl.LightningModule", *, enabled: bool = True, already_in: bool = False
) -> Iterator[bool]:
    """Run the body with the EMA weights in ``pl_module`` (if any); restore the training weights after.

    Yields whether EMA weights are in use: not while ``EMAWeightAveraging`` has no update yet (the training
    weights stand in then, with a warning once training has started). ``already_in``: the caller knows they are
    swapped in.
    """
    averaging = find_weight_averaging(trainer) if enabled else None
    if isinstance(averaging, EMAWeightAveraging) and not averaging._updated():
        averaging._warn_not_updated(trainer)
        averaging = None
    if averaging is None or already_in:
        yield averaging is not None
        return
    _check_pairing(averaging, pl_module)
    averaging._swap_models(pl_module)  # Lightning's swap around validation; no public equivalent
    try:
        yield True
    finally:
        averaging._swap_models(pl_module)


@contextmanager
def training_weights(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Iterator[None]:
    """Run the body with the training weights in ``pl_module``; put back what it held after.

    A no-op except once ``EMAWeightAveraging.on_train_end`` has copied the average into the module: then the
    training weights it kept for checkpoints go in for the body (an exchange of values, lossless both ways).
    Lightning's own callback keeps no copy of them: see ``check_training_weights_kept``.
    """
    averaging = find_weight_averaging(trainer)
    kept: list[Tensor] | None = None
    if isinstance(averaging, EMAWeightAveraging) and averaging._updated():  # no update: no copy was made
        if averaging._training_shards is not None:
            kept, current = averaging._training_shards, averaging._held(pl_module)
        elif averaging._training_state is not None:
            state = pl_module.state_dict()  # tensors sharing the module's storage
            kept = list(averaging._training_state.values())
            current = [state[name] for name in averaging._training_state]
    if kept is None:
        yield
        return
    with torch.no_grad():
        _swap_in_or_out(kept, current, None)
    try:
        yield
    finally:
        with torch.no_grad():
            _swap_in_or_out(kept, current, None)


def check_training_weights_kept(trainer: "pl.Trainer", caller: "pl.Callback") -> None:
    """Refuse, at setup, ``caller`` measuring the training weights at train end after Lightning's own EMA callback.

    That callback copies its average into the module in its ``on_train_end`` and keeps no copy of the training
    weights; callbacks run in ``trainer.callbacks`` order, so one listed before ``caller`` would have replaced them.
    """
    callbacks = list(trainer.callbacks)
    for callback in callbacks[: callbacks.index(caller)] if caller in callbacks else []:
        if isinstance(callback, WeightAveraging) and not isinstance(callback, EMAWeightAveraging):
            name = type(caller).__name__
            raise ValueError(
                f"{name}(use_ema=False) evaluates the training weights at train end, but {type(callback).__name__} "
                f"comes before it in the trainer's callbacks: it copies its average into the module when training "
                f"ends and keeps no copy of the training weights, so {name} would measure the average. Use "
                f"lightning_speed.callbacks.EMAWeightAveraging (it keeps them), list {name} before "
                f"{type(callback).__name__}, or set on_train_end=False."
            )


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
