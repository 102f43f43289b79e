"""TimestepMonitor: what the time-step strategies actually do, per area, in the logger.

Every training batch it adds the step's time steps, per-sample losses and applied weights
(``pl_module.timesteps.last``, recorded by ``TimestepStrategy.loss``) into small device
accumulators with ``index_add_`` (no sync, no bincount). Every ``log_every_n_steps`` optimizer
steps it reads them once (the only sync), logs and resets; with gradient accumulation a window holds
every micro-batch of its optimizer steps:

* ``timesteps/loss/<area>``: mean unweighted per-sample loss of the batches' samples in the area;
* ``timesteps/weight/<area>``: mean applied weight (loss weight x importance weight);
* ``timesteps/share/<area>``: share of the sampled time steps that fell in the area;
* ``timesteps/p/<area>``: the sampler's current probability mass on the area
  (moves over training for CLTS and loss-aware sampling);
* a histogram ``timesteps/t`` of the sampled t (TensorBoard only).

Areas (acceleration / deceleration / convergence) come from ``lightning_speed.schedules`` for
the module's own schedule, split at the tau of the installed strategies (``timesteps.tau``: SpeeD's,
or a curriculum's early SpeeD's), or at the schedule's pivot when none has one. On a flow schedule they
come from ``lightning_speed.flow.flow_areas``, and the continuous t are counted in ``PROBABILITY_BINS``
equal bins of [0, 1] (the bins of the samplers' ``probabilities``). Under
DDP the sums are reduced over ranks before logging.

The summaries describe the batches just trained, so they go to the logger at the step Lightning writes those
batches' ``self.log(..., on_step=True)`` values (such as ``train/loss``): one below the optimizer steps trained.
They are also kept in ``monitor.history`` (a list of dicts) for notebooks, with ``step`` the optimizer steps
trained, as in ``FIDCallback.history``.

A checkpoint keeps the window in progress (``state_dict``), so the first summary after a resume covers the whole window,
not only the steps since the resume; under DDP it holds the window summed over the ranks, which rank 0 restores.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_speed import flow
from lightning_speed.callbacks.strategies import TIMESTEP_LINES, find_strategy
from lightning_speed.schedules import AREA_NAMES, TimestepAreas, resolve_tau, timestep_areas
from lightning_speed.timesteps.base import PROBABILITY_BINS, StepRecord, TimestepStrategy
from lightning_speed.timesteps.speed import check_speed_tau
from lightning_speed.validation import check_bool, check_int


class TimestepMonitor(Callback):
    """Log the sampled time steps and the loss / weight per time-step area.

    Args:
        log_every_n_steps: optimizer steps between two summaries (the accumulators are read then).
        tau: where the convergence area starts. ``None`` (default): the installed strategy's tau
            (``pl_module.timesteps.tau``), or the schedule's pivot when no strategy set one. An int
            (a flow time in (0, 1) on a flow schedule) or "auto" must agree with the installed strategy's tau.
        histogram: also log a histogram of the sampled t when the logger is TensorBoard.
    """

    def __init__(
        self, log_every_n_steps: int = 100, tau: Union[int, float, Literal["auto"], None] = None, histogram: bool = True
    ) -> None:
        self.log_every_n_steps = check_int(log_every_n_steps, "log_every_n_steps", minimum=1)
        self.tau = check_speed_tau(tau)  # a time step, a flow time, "auto" or None; checked against the schedule later
        self.histogram = check_bool(histogram, "histogram")
        self.areas: TimestepAreas | flow.FlowAreas | None = None
        self._bins: int | None = None  # on a flow: t counted in this many equal bins of [0, 1]
        self.history: list[dict[str, float]] = []
        self._last_logged_step = -1
        self._strategy: TimestepStrategy | None = None
        self._seen: StepRecord | None = None
        self._restored: dict[str, Tensor] | None = None  # a checkpoint's window, applied once the areas are known

    # -- lifecycle -------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every callback's setup: the strategy's tau is final here.
        strategy = find_strategy(pl_module, "TimestepMonitor")
        self._strategy = strategy
        self._seen = strategy.last  # a record from before this fit is not this fit's step
        device = pl_module.device
        if isinstance(strategy.schedule, flow.FlowSchedule):
            self.areas = flow.flow_areas(self._tau(strategy))
            self._bins = PROBABILITY_BINS
            centres = (torch.arange(self._bins, dtype=torch.float64) + 0.5) / self._bins
            self._area_of_t = self.areas.labels(centres).to(device)
        else:
            self.areas = timestep_areas(strategy.schedule, self._tau(strategy))
            self._bins = None
            self._area_of_t = self.areas.labels().to(device)
        # float32 whatever the default dtype: bf16 counts stop at 256, and index_add_ needs the float32 records' dtype
        self._t_counts = torch.zeros(self._area_of_t.numel(), device=device, dtype=torch.float32)
        # rows: count, loss sum, weight sum; columns: the three areas
        self._sums = torch.zeros(3, len(AREA_NAMES), device=device, dtype=torch.float32)
        restored, self._restored = self._restored, None
        # a window summed at other area bounds (another tau) is not continued; under DDP rank 0 holds the saved part
        same_areas = restored is not None and torch.equal(restored["area_of_t"], self._area_of_t.cpu())
        if same_areas and trainer.global_rank == 0:
            self._sums.copy_(restored["sums"])
            self._t_counts.copy_(restored["t_counts"])

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.areas is None:  # not fitted yet: no window
            return {}
        return {"area_of_t": self._area_of_t.cpu(), "sums": self._sums.cpu(), "t_counts": self._t_counts.cpu()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict else None

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Every rank saves (Lightning writes rank 0's file); under DDP the window in progress is the sum over the
        # ranks, which rank 0 restores alone: it saves that sum (one synchronisation per checkpoint), not its share.
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state and trainer.world_size > 1:
            state["sums"] = trainer.strategy.reduce(self._sums.clone(), reduce_op="sum").cpu()
            state["t_counts"] = trainer.strategy.reduce(self._t_counts.clone(), reduce_op="sum").cpu()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The step the run starts from (0, or a resumed checkpoint's) has no window of this fit behind it: with
        # gradient accumulation its first micro-batches end at that global_step and must not flush alone.
        self._last_logged_step = trainer.global_step
        try:  # max_steps, or the epochs' optimizer steps; inf when unbounded
            total = trainer.estimated_stepping_batches
        except MisconfigurationException:  # accumulation that changes between epochs: no estimate
            total = math.inf
        every = self.log_every_n_steps
        if math.isfinite(total) and int(total) // every <= trainer.global_step // every:
            rank_zero_warn(
                f"TimestepMonitor(log_every_n_steps={every}) writes its summaries every {every} optimizer steps, but "
                f"this fit trains from step {trainer.global_step} to {int(total)}, so it will write none: lower "
                "log_every_n_steps (on the command line, --monitor.init_args.log_every_n_steps)."
            )

    def _tau(self, strategy: TimestepStrategy) -> int | float | str:
        if self.tau is None:
            return "auto" if strategy.tau is None else strategy.tau
        if isinstance(strategy.schedule, flow.FlowSchedule):
            if isinstance(self.tau, int):
                raise ValueError(f"TimestepMonitor(tau={self.tau}) is a DDPM time step, but the module trains a flow: "
                                 "give a flow time in (0, 1) or 'auto'.")
            tau = flow.resolve_tau(self.tau)
        else:
            if isinstance(self.tau, float):
                raise ValueError(f"TimestepMonitor(tau={self.tau}) is a flow time, but the module trains a DDPM "
                                 "schedule: give a time step or 'auto'.")
            tau = resolve_tau(self.tau, strategy.schedule)
        if strategy.tau is not None and tau != strategy.tau:
            raise ValueError(
                f"TimestepMonitor(tau={self.tau!r}) splits the areas at {tau}, but the installed time-step "
                f"strategy uses tau={strategy.tau}: leave the monitor's tau unset (it reads the strategy's) or "
                "make them equal."
            )
        return tau

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._strategy is None:
            return
        record = self._strategy.last
        # outputs is None or {} when training_step returned None: a skipped batch, not trained on, is not counted
        # (under gradient accumulation the optimizer may still step on it, so the window can end here).
        if outputs is not None and not (isinstance(outputs, dict) and not outputs):
            if record is None or record is self._seen:
                raise ValueError(
                    f"TimestepMonitor reads each step's time steps, losses and weights from "
                    f"{type(pl_module).__name__}.timesteps.last, which TimestepStrategy.loss records, but this "
                    "training_step did not call it. Compute the loss with:\n" + TIMESTEP_LINES
                )
            self._accumulate(record.t, record.loss.float(), record.weight.float())
        self._seen = record
        step = trainer.global_step
        if step % self.log_every_n_steps == 0 and step != self._last_logged_step:
            self._last_logged_step = step
            self._flush(trainer, pl_module, step)

    # -- per step (device only) --------------------------------------------------------------
    def _accumulate(self, t: Tensor, loss: Tensor, weight: Tensor) -> None:
        t = t.to(self._area_of_t.device)
        if self._bins is not None:  # flow time in [0, 1] -> its bin
            t = (t * self._bins).long().clamp_(0, self._bins - 1)
        area = self._area_of_t[t]
        ones = torch.ones_like(loss)
        self._t_counts.index_add_(0, t, ones)
        self._sums.index_add_(1, area, torch.stack([ones, loss, weight]))

    # -- every N steps (one sync) -------------------------------------------------------------
    def _sampler_mass(self, pl_module: pl.LightningModule) -> Tensor | None:
        probs = self._strategy.sampler.probabilities() if self._strategy is not None else None
        if probs is None or probs.numel() != self._area_of_t.numel():
            return None
        mass = torch.zeros(len(AREA_NAMES), device=self._area_of_t.device, dtype=torch.float32)
        return mass.index_add_(0, self._area_of_t, probs.to(mass.device, torch.float32))

    def _flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        sums = trainer.strategy.reduce(self._sums.clone(), reduce_op="sum")
        t_counts = trainer.strategy.reduce(self._t_counts.clone(), reduce_op="sum")
        mass = self._sampler_mass(pl_module)
        counts, loss_sums, weight_sums = sums.tolist()
        total = sum(counts)
        metrics: dict[str, float] = {}
        for index, name in enumerate(AREA_NAMES):
            if counts[index] > 0:
                metrics[f"timesteps/loss/{name}"] = loss_sums[index] / counts[index]
                metrics[f"timesteps/weight/{name}"] = weight_sums[index] / counts[index]
            if total > 0:
                metrics[f"timesteps/share/{name}"] = counts[index] / total
        if mass is not None:
            for name, value in zip(AREA_NAMES, mass.tolist()):
                metrics[f"timesteps/p/{name}"] = value
        self.history.append({"step": float(step), **metrics})
        # The step Lightning logs this batch's self.log values at (the batches that stepped before it), read as its
        # own LearningRateMonitor reads it: it follows Lightning's counting under accumulation and on resume.
        log_step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=log_step)
            if self.histogram and isinstance(logger, TensorBoardLogger) and total > 0:
                counts_per_t = t_counts.round().long().cpu()
                values = torch.repeat_interleave(torch.arange(counts_per_t.numel()), counts_per_t)
                if self._bins is not None:  # bin centres in flow time
                    values = (values.double() + 0.5) / self._bins
                logger.experiment.add_histogram("timesteps/t", values.numpy(), global_step=log_step, bins="auto")
        self._t_counts.zero_()
        self._sums.zero_()
