"""Callbacks that keep a run's work safe: stop on divergence, save a checkpoint on a stop signal.

``DivergenceGuard`` stops a run whose loss or gradients become non-finite and refuses to save a
checkpoint of non-finite weights, so good checkpoints are never overwritten. The check itself
makes no host-device synchronisation in the training step: a flag, the first bad step and its
time steps are accumulated on the device with ``torch.where`` and read on the host only at
checkpoints, every ``check_every_n_steps`` steps and at the end of training.

``CheckpointOnSignal`` makes SIGTERM (sent by schedulers) and SIGINT (Ctrl+C) stop a run after
the current step with a resumable checkpoint and an exit status of 128 + the signal number. It
works with Lightning's own handling: Lightning's SIGTERM handler sets ``trainer.received_sigterm``
and its loops then raise ``SIGTERMException`` at the next batch boundary; this callback sends
SIGINT through the same handler, saves the checkpoint when that exception arrives and sets the
exception's exit status (Lightning's own is 0, which tells a scheduler the run finished).

The ``lightning-speed`` command adds both to every run; in your own Trainer, put them first in
``callbacks`` so the divergence check runs before evaluation callbacks at the end of training.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_speed.callbacks.ema import find_weight_averaging
from lightning_speed.checkpoints import load_checkpoint
from lightning_speed.distributed import received_stop_signal


class DivergenceError(RuntimeError):
    """Training produced non-finite values (loss, gradients or weights); raised by ``DivergenceGuard``."""


_LOSS, _GRADIENT = 1, 2  # what was non-finite first
_SHOWN_TIMESTEPS = 16


def _batch_timesteps(pl_module: pl.LightningModule, outputs: Any) -> Tensor | None:
    """The time steps of the batch just trained on: the strategy's record, else ``outputs["t"]``."""
    record = getattr(getattr(pl_module, "timesteps", None), "last", None)
    t = getattr(record, "t", None)
    if t is None and isinstance(outputs, Mapping):
        t = outputs.get("t")
    if not isinstance(t, Tensor):
        return None
    # a DDPM's steps as integers; a flow's times in [0, 1] as floats (an integer cast would make them all 0)
    return t.detach().reshape(-1).float() if t.is_floating_point() else t.detach().reshape(-1).long()


def _nonfinite_inputs(batch: Any, device: torch.device) -> Tensor | None:
    """How many NaN/inf values the floating tensors of ``batch`` (in any collection Lightning's
    ``apply_to_collection`` walks) on ``device`` hold, as a device scalar (no host read); None when it has none.

    Tensors on another device (e.g. CPU metadata next to a CUDA batch) are skipped: moving them would sync.
    """
    counts: list[Tensor] = []

    def count(value: Tensor) -> None:
        if (value.is_floating_point() or value.is_complex()) and value.device == device:
            counts.append((~torch.isfinite(value.detach())).sum())

    apply_to_collection(batch, Tensor, count)
    if not counts:
        return None
    return torch.stack(counts).sum() if len(counts) > 1 else counts[0]


def _batch_loss(outputs: Any) -> Tensor | None:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return loss.detach() if isinstance(loss, Tensor) else None


def _checkpoint_step(path: str) -> int | None:
    """The global step stored in a checkpoint (loaded lazily with mmap), or None if unreadable."""
    try:
        return int(load_checkpoint(path)["global_step"])
    except Exception:  # noqa: BLE001 - only used to annotate a message
        return None


class DivergenceGuard(Callback):
    """Stop training when the loss or the gradients become non-finite; never save non-finite weights.

    Raises :class:`DivergenceError` with the step, the time steps of the first bad batch, the last
    good checkpoint and what to change. Checkpoints are checked before they are written (the flag
    and the weights themselves), so a checkpoint of a diverged model never replaces a good one.

    Args:
        check_gradients: also flag non-finite gradients (their total norm, computed on the device
            before each optimizer step). Not under fp16 mixed precision, whose gradient scaler
            expects overflowing steps and skips them itself.
        check_every_n_steps: how often the device flag is read on the host during training (None:
            the trainer's ``log_every_n_steps``; on a CPU every step, which costs nothing there).
            On CUDA the flag is copied without blocking and read one period later, so the check
            never waits for the device.
    """

    def __init__(self, check_gradients: bool = True, check_every_n_steps: int | None = None) -> None:
        super().__init__()
        if check_every_n_steps is not None and (isinstance(check_every_n_steps, bool) or check_every_n_steps < 1):
            raise ValueError(f"check_every_n_steps must be a positive int or None, got {check_every_n_steps!r}.")
        self.check_gradients = bool(check_gradients)
        self.check_every_n_steps = check_every_n_steps
        self.last_good_step: int | None = None  # step of the last checkpoint this guard let through
        self._state: dict[str, Tensor] | None = None
        self._grad_ok: Tensor | None = None
        self._pending: tuple[Tensor, Any] | None = None  # (pinned host copy of the flag, CUDA event)

    # ------------------------------------------------------------------ device-side record (no sync)
    def _reset(self, device: torch.device) -> None:
        self._state = {
            "bad": torch.zeros((), dtype=torch.bool, device=device),
            "step": torch.full((), -1, dtype=torch.long, device=device),
            "kind": torch.zeros((), dtype=torch.long, device=device),
            "loss": torch.zeros((), dtype=torch.float32, device=device),
            # the first bad step's input batch: its non-finite values and where it was (a NaN in the data is
            # not a divergence: lowering the learning rate cannot fix it, so the message must say so)
            "data_nonfinite": torch.zeros((), dtype=torch.long, device=device),
            "batch_idx": torch.full((), -1, dtype=torch.long, device=device),
            "epoch": torch.full((), -1, dtype=torch.long, device=device),
        }
        self._grad_ok, self._pending = None, None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(pl_module.device)

    @staticmethod
    def _uses_grad_scaler(trainer: pl.Trainer) -> bool:
        return getattr(trainer.precision_plugin, "scaler", None) is not None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.check_gradients or self._uses_grad_scaler(trainer):
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        total_norm = getattr(torch.nn.utils, "get_total_norm", None)
        if total_norm is not None:
            norm = total_norm(grads, error_if_nonfinite=False)
        else:  # torch < 2.6
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self._grad_ok = torch.isfinite(norm)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._state is None:
            self._reset(pl_module.device)
        state = self._state
        assert state is not None
        loss = _batch_loss(outputs)
        with torch.no_grad():
            bad_loss = (
                ~torch.isfinite(loss).all() if loss is not None else torch.zeros_like(state["bad"])
            ).to(state["bad"].device)
            bad = bad_loss if self._grad_ok is None else bad_loss | ~self._grad_ok
            self._grad_ok = None
            newly = bad & ~state["bad"]
            step = trainer.global_step
            state["step"] = torch.where(newly, step, state["step"])
            state["kind"] = torch.where(newly, torch.where(bad_loss, _LOSS, _GRADIENT), state["kind"])
            if loss is not None:
                state["loss"] = torch.where(newly, loss.float().sum().to(state["loss"].device), state["loss"])
            # One reduction over the batch on the device per step (no host read): kept for the first bad step only.
            inputs = _nonfinite_inputs(batch, state["bad"].device)
            if inputs is not None:
                state["data_nonfinite"] = torch.where(newly, inputs, state["data_nonfinite"])
            state["batch_idx"] = torch.where(newly, int(batch_idx), state["batch_idx"])
            state["epoch"] = torch.where(newly, int(getattr(trainer, "current_epoch", -1)), state["epoch"])
            t = _batch_timesteps(pl_module, outputs)
            if t is not None:
                t = t.to(state["bad"].device)
                if "t" not in state:  # sized by the first batch; later batches are cut or padded with -1
                    state["t"] = torch.full((t.numel(),), -1, dtype=t.dtype, device=t.device)
                size = state["t"].numel()
                t = torch.nn.functional.pad(t[:size], (0, size - min(size, t.numel())), value=-1)
                state["t"] = torch.where(newly, t, state["t"])
            state["bad"] = state["bad"] | bad
        if step % self._period(trainer) == 0:
            self._poll(trainer)

    # ------------------------------------------------------------------ reading the flag on the host
    def _period(self, trainer: pl.Trainer) -> int:
        if self.check_every_n_steps is not None:
            return self.check_every_n_steps
        if self._state is not None and self._state["bad"].device.type == "cpu" and trainer.world_size == 1:
            return 1
        return max(1, int(trainer.log_every_n_steps or 1))

    @staticmethod
    def _all_ranks(flag: Tensor, trainer: pl.Trainer) -> Tensor:
        """The flag OR-ed over ranks (all ranks call this at the same step, so they stop together)."""
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = flag.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.bool()

    def _poll(self, trainer: pl.Trainer) -> None:
        """Periodic check: on CUDA, read the flag copied one period ago and start the next copy."""
        assert self._state is not None
        flag = self._all_ranks(self._state["bad"], trainer)
        if flag.device.type != "cuda":
            if bool(flag):
                self._raise(trainer)
            return
        previous = self._pending
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (host, event)
        if previous is not None:
            previous_host, previous_event = previous
            if not previous_event.query():  # a period later it has all but certainly arrived
                previous_event.synchronize()
            if bool(previous_host):
                self._raise(trainer)

    def diverged(self, trainer: pl.Trainer) -> bool:
        """Read the flag now (one host-device synchronisation): has any step been non-finite?"""
        return self._state is not None and bool(self._all_ranks(self._state["bad"], trainer))

    def check(self, trainer: pl.Trainer) -> None:
        """Raise :class:`DivergenceError` if any step so far was non-finite (synchronises once)."""
        if self.diverged(trainer):
            self._raise(trainer)

    def _raise(self, trainer: pl.Trainer) -> None:
        """Raise :class:`DivergenceError`; every rank calls this at the same point (after reading the same
        reduced flag), so the count of non-finite input values can be summed over ranks here."""
        assert self._state is not None
        data = self._state["data_nonfinite"]
        total = data
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            total = data.clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        raise DivergenceError(self.message(trainer, nonfinite_inputs_all_ranks=int(total)))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)  # before evaluation callbacks sample from a diverged model

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse to write a checkpoint after a non-finite step or with non-finite weights."""
        if trainer.state.fn != TrainerFn.FITTING:
            return
        self.check(trainer)
        weights = {
            name: value
            for name, value in checkpoint.get("state_dict", {}).items()
            if isinstance(value, Tensor) and value.is_floating_point()
        }
        finite = torch.stack([torch.isfinite(v).all() for v in weights.values()]) if weights else None
        here = finite is None or bool(finite.all())  # one synchronisation per checkpoint
        # Every process decides together: under FSDP only rank 0 holds the gathered weights, and a rank that raised
        # alone would leave the others waiting at the checkpoint's barrier.
        if not trainer.strategy.reduce_boolean_decision(here, all=True):
            bad = [name for name, ok in zip(weights, finite.tolist()) if not ok] if not here else []
            listed = (", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")) if bad else \
                "on another process"
            raise DivergenceError(
                f"Training diverged: the weights contain non-finite values at step {trainer.global_step} "
                f"({listed}); the checkpoint was not written.\n{self._advice(trainer)}"
            )
        self.last_good_step = trainer.global_step

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pending = None

    # ------------------------------------------------------------------ the message
    def _last_good_checkpoints(self, trainer: pl.Trainer) -> list[str]:
        paths: list[str] = []
        for callback in trainer.checkpoint_callbacks:
            for attr in ("last_model_path", "best_model_path"):
                path = getattr(callback, attr, "")
                if path and os.path.isfile(path) and path not in paths:
                    paths.append(path)
        return sorted(paths, key=os.path.getmtime, reverse=True)

    def _advice(self, trainer: pl.Trainer, data: bool = False) -> str:
        paths = self._last_good_checkpoints(trainer)
        if paths and self.last_good_step is not None:
            step = _checkpoint_step(paths[0])
            at = f" (step {step})" if step is not None else ""
            good = f"The last good checkpoint is {paths[0]}{at}; no checkpoint with non-finite weights was written."
            resume = f" with --ckpt_path {paths[0]}"
        elif trainer.ckpt_path:
            good = f"This run wrote no checkpoint before diverging; it started from {trainer.ckpt_path} (unchanged)."
            resume = f" with --ckpt_path {trainer.ckpt_path}"
        else:
            good = "This run wrote no checkpoint before diverging (earlier checkpoints on disk are unchanged)."
            resume = ""
        lrs = sorted({group["lr"] for opt in trainer.optimizers for group in opt.param_groups if "lr" in group})
        now = f"now {', '.join(f'{v:g}' for v in lrs)}; " if lrs else ""
        then = (
            f" To go on from the last good state, resume{resume} (trainer.fit(..., ckpt_path=...) in Python; "
            "resuming also restores the optimizer's learning rate from the checkpoint)."
            if resume
            else ""
        )
        if data:  # the inputs held NaN/inf: the optimizer settings are not the cause
            return (
                f"{good}\nTo fix it: repair or drop the non-finite samples in the training data (the dataset or "
                "datamodule that produced this batch, or its preprocessing: e.g. a division by zero in normalisation, "
                "a corrupt file, NaN in precomputed latents); checking torch.isfinite(x).all() on each sample finds "
                "them. Lowering the learning rate or clipping gradients will not help: the non-finite values come "
                f"from the input, not from the optimizer.{then}"
            )
        # The flags are lightning-speed's CLI; a module of your own takes the same settings in Python.
        return (
            f"{good}\nTo fix it: lower the learning rate ({now}--model.optimizer.init_args.lr, or the lr your "
            "configure_optimizers sets), clip gradients (--trainer.gradient_clip_val 1.0, "
            f"Trainer(gradient_clip_val=1.0)) or train in 32-true / bf16-mixed precision.{then}"
        )

    def message(self, trainer: pl.Trainer, nonfinite_inputs_all_ranks: int | None = None) -> str:
        """What went wrong, where, and what to do (reads the device record: one synchronisation).

        ``nonfinite_inputs_all_ranks``: NaN/inf values in the first bad step's input batches summed over ranks
        (None: this rank's record only), so a rank that saw only the effect still names the cause.
        """
        assert self._state is not None
        state = {k: v.cpu() for k, v in self._state.items()}
        step, kind, loss = int(state["step"]), int(state["kind"]), float(state["loss"])
        local_inputs = int(state.get("data_nonfinite", 0))
        all_inputs = local_inputs if nonfinite_inputs_all_ranks is None else nonfinite_inputs_all_ranks
        if kind == _LOSS:
            what = f"the loss became {loss} at step {step}"
        elif kind == _GRADIENT:
            what = f"the gradients became non-finite at step {step} (loss {loss:.4g})"
        else:  # flagged on another rank
            what = "a non-finite loss or gradient appeared on another rank"
        timesteps = ""
        if "t" in state:
            times = state["t"].is_floating_point()  # a flow's times in [0, 1], else a DDPM's steps
            t = [v for v in state["t"].tolist() if v >= 0]
            text = (lambda v: f"{v:.4f}") if times else str
            shown = ", ".join(map(text, t[:_SHOWN_TIMESTEPS])) + (", ..." if len(t) > _SHOWN_TIMESTEPS else "")
            if t:
                name = "Flow times" if times else "Time steps"
                timesteps = f"\n{name} of that batch ({len(t)}): [{shown}], min {text(min(t))}, max {text(max(t))}."
        if all_inputs > 0:
            rank = getattr(trainer, "global_rank", 0)
            if local_inputs > 0:
                where = f"step {step} (epoch {int(state['epoch'])}, batch_idx {int(state['batch_idx'])})"
                found = f"{local_inputs} NaN/inf value{'s' * (local_inputs != 1)} in the input batch of {where}"
                if trainer.world_size > 1:
                    found += f" on rank {rank}"
            else:
                found = f"{all_inputs} NaN/inf value{'s' * (all_inputs != 1)} in the input batch of another rank"
            return (
                f"Training stopped: the training data holds non-finite values: {found}, so {what}; the model did "
                f"not diverge by itself.{timesteps}\n{self._advice(trainer, data=True)}"
            )
        return f"Training diverged: {what}.{timesteps}\n{self._advice(trainer)}"


class CheckpointOnSignal(Callback):
    """On SIGTERM or SIGINT: finish the current step, save a resumable checkpoint, exit with 128 + signal.

    Lightning stops at the next batch boundary (or, in ``FIDCallback``, after the current sampling
    batch) by raising ``SIGTERMException``; this callback then writes ``<dirpath>/<filename>.ckpt``
    and sets the exit status: 143 for SIGTERM, 130 for SIGINT. A second Ctrl+C stops at once
    (Lightning's KeyboardInterrupt handling: status 1, no checkpoint).

    Args:
        dirpath: folder of the checkpoint (None: the ModelCheckpoint's folder, else ``<log_dir>/checkpoints``).
        filename: checkpoint name without ``.ckpt``.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "interrupted") -> None:
        super().__init__()
        self.dirpath = dirpath
        self.filename = filename
        self.received: int | None = None  # the first stop signal of this run
        self.checkpoint_path: str | None = None  # where the checkpoint was saved, once it was
        self._lightning_handler: Any = None
        self._rank, self._world_size = 0, 1

    # ------------------------------------------------------------------ handlers
    def _install(self) -> None:
        """Route SIGTERM and SIGINT through Lightning's SIGTERM handler (registered when fit starts)."""
        if self._lightning_handler is not None or not sys.platform.startswith(("linux", "darwin")):
            return
        import threading

        current = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is not threading.main_thread() or not callable(current):
            return  # Lightning did not register its handler here: leave signals alone
        self._lightning_handler = current
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        # Lightning's teardown restores the handlers that were in place before fit, ours included.

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl+C: stop now, without a checkpoint
        if self.received is None:
            self.received = signum
            # Ctrl+C reaches every rank of the terminal's process group: rank 0 says it once. A SIGTERM may reach
            # some ranks only, so each rank that gets one says so, with its rank.
            if signum != signal.SIGINT or self._rank == 0:
                where = f" on rank {self._rank}" if self._world_size > 1 and signum != signal.SIGINT else ""
                print(
                    f"Received {signal.Signals(signum).name}{where}: stopping after the current step with a checkpoint"
                    + (" (press Ctrl+C again to stop at once, without one)." if signum == signal.SIGINT else "."),
                    file=sys.stderr,
                    flush=True,
                )
        self._lightning_handler(signum, frame)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit (e.g. the resume of a stopped one with this callback) has no signal yet
            self.received, self.checkpoint_path = None, None
            self._rank, self._world_size = int(trainer.global_rank), int(trainer.world_size)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.received is not None and not received_stop_signal(trainer):
            raise SIGTERMException  # Lightning's handler was not reached (e.g. replaced by the user's)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._lightning_handler = None

    # ------------------------------------------------------------------ the checkpoint
    def _checkpoint_dir(self, trainer: pl.Trainer) -> str:
        if self.dirpath is not None:
            return self.dirpath
        callback = trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            return str(callback.dirpath)
        return os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")

    @staticmethod
    def _undo_validation_swap(trainer: pl.Trainer, pl_module: pl.LightningModule, stop: SIGTERMException) -> None:
        """Stopped inside a validation epoch: put the training weights back before saving them.

        ``WeightAveraging`` swaps the averaged weights in at validation-epoch start and out at its
        end, which a stop between validation batches skipped. A stop raised in a later callback's
        ``on_validation_epoch_end`` (``FIDCallback``) says whether the average is still in: after the
        averaging callback's own epoch end, swapping again would save the average as the training weights.
        """
        if trainer.state.stage not in (RunningStage.VALIDATING, RunningStage.SANITY_CHECKING):
            return
        if not getattr(stop, "averaged_weights_in", True):
            return
        averaging = find_weight_averaging(trainer)
        if averaging is not None:
            averaging.on_validation_epoch_end(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        signum = self.received or int(signal.SIGTERM)
        name = signal.Signals(signum).name
        exception.code = 128 + signum  # Lightning's own status is 0: "finished" to a scheduler
        self._undo_validation_swap(trainer, pl_module, exception)
        path = os.path.join(self._checkpoint_dir(trainer), f"{self.filename}.ckpt")
        try:
            trainer.save_checkpoint(path)
        except DivergenceError as err:
            if trainer.is_global_zero:
                print(f"Stopped by {name}; no checkpoint saved: {err}", file=sys.stderr, flush=True)
            return
        self.checkpoint_path = path
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank reads it, or rank 0 would wait alone
        if not trainer.is_global_zero:
            return
        config = Path(log_dir or trainer.default_root_dir) / "config.yaml"
        resume = (
            f"lightning-speed fit --config {config} --ckpt_path {path}"
            if config.is_file()
            else f"the same configuration with --ckpt_path {path} (or trainer.fit(..., ckpt_path={path!r}))"
        )
        message = (
            f"Stopped by {name} at step {trainer.global_step}; saved a resumable checkpoint: {path}\n"
            f"Resume with: {resume}\n"
            f"Exit status {exception.code} (128 + {name} {signum})."
        )
        print(message, file=sys.stderr, flush=True)
