"""TimestepMonitor: what the time-step strategies actually do, per area, in the logger.

Every training batch it adds the batch's time steps, per-sample losses and weights (read from
the ``training_step`` output dict: ``t``, ``per_sample_loss``, ``weight``) into small device
accumulators with ``index_add_`` (no sync, no bincount). Every ``log_every_n_steps`` optimizer
steps it reads them once (the only sync), logs and resets:

* ``timesteps/loss/<area>``: mean unweighted per-sample loss of the batches' samples in the area;
* ``timesteps/weight/<area>``: mean applied weight (loss weighting x importance weight);
* ``timesteps/share/<area>``: share of the sampled time steps that fell in the area;
* ``timesteps/p/<area>``: the sampler's current probability mass on the area
  (moves over training for CLTS and loss-aware sampling);
* a histogram ``timesteps/t`` of the sampled t (TensorBoard only).

Areas (acceleration / deceleration / convergence) come from ``lightning_speed.analysis`` for
the module's own schedule, split at ``tau``. Under DDP the sums are reduced over ranks before
logging. The summaries are also kept in ``monitor.history`` (a list of dicts) for notebooks.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_speed.analysis import AREA_NAMES, TimestepAreas, check_tau_spec, timestep_areas
from lightning_speed.callbacks.strategies import find_schedule

_REQUIRED_KEYS = ("t", "per_sample_loss")


class TimestepMonitor(Callback):
    """Log the sampled time steps and the loss / weight per time-step area.

    Args:
        log_every_n_steps: optimizer steps between two summaries (the accumulators are read then).
        tau: where the convergence area starts; an int or "auto" (the schedule's pivot).
        histogram: also log a histogram of the sampled t when the logger is TensorBoard.
    """

    def __init__(self, log_every_n_steps: int = 100, tau: int | str = 700, histogram: bool = True) -> None:
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be a positive integer, got {log_every_n_steps!r}.")
        self.log_every_n_steps = log_every_n_steps
        self.tau = check_tau_spec(tau)
        self.histogram = bool(histogram)
        self.areas: TimestepAreas | None = None
        self.history: list[dict[str, float]] = []
        self._last_logged_step = -1

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.areas = timestep_areas(find_schedule(pl_module), self.tau)
        T = self.areas.num_timesteps
        self._area_of_t = self.areas.labels()
        self._t_counts = torch.zeros(T)
        # rows: count, loss sum, weight sum; columns: the three areas
        self._sums = torch.zeros(3, len(AREA_NAMES))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        self._area_of_t = self._area_of_t.to(device)
        self._t_counts = self._t_counts.to(device)
        self._sums = self._sums.to(device)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.areas is None:
            return
        t, loss, weight = self._read(outputs, pl_module)
        self._accumulate(t, loss, weight)
        step = trainer.global_step
        if step % self.log_every_n_steps == 0 and step != self._last_logged_step:
            self._last_logged_step = step
            self._flush(trainer, pl_module, step)

    # -- per step (device only) --------------------------------------------------------------
    def _read(self, outputs: Any, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(outputs, dict) or any(key not in outputs for key in _REQUIRED_KEYS):
            raise ValueError(
                f"TimestepMonitor reads `t` and `per_sample_loss` (and `weight`) from the dict that "
                f"{type(pl_module).__name__}.training_step returns, but got "
                f"{sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__}. Return "
                '{"loss": loss, "t": t, "per_sample_loss": per_sample_loss.detach(), "weight": w.detach()}.'
            )
        t = outputs["t"].reshape(-1)
        loss = outputs["per_sample_loss"].detach().reshape(-1).float()
        weight = outputs.get("weight")
        weight = torch.ones_like(loss) if weight is None else weight.detach().reshape(-1).float()
        return t, loss, weight

    def _accumulate(self, t: Tensor, loss: Tensor, weight: Tensor) -> None:
        t = t.to(self._area_of_t.device)
        area = self._area_of_t[t]
        ones = torch.ones_like(loss)
        self._t_counts.index_add_(0, t, ones)
        self._sums.index_add_(1, area, torch.stack([ones, loss, weight]))

    # -- every N steps (one sync) -------------------------------------------------------------
    def _sampler_mass(self, pl_module: pl.LightningModule) -> Tensor | None:
        sampler = getattr(pl_module, "timestep_sampler", None)
        try:
            probs = sampler.probabilities() if sampler is not None else None
        except NotImplementedError:
            return None
        if probs is None or probs.numel() != self._area_of_t.numel():
            return None
        mass = torch.zeros(len(AREA_NAMES), device=self._area_of_t.device)
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
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if self.histogram and isinstance(logger, TensorBoardLogger) and total > 0:
                counts_per_t = t_counts.round().long().cpu()
                values = torch.repeat_interleave(torch.arange(counts_per_t.numel()), counts_per_t)
                logger.experiment.add_histogram("timesteps/t", values.numpy(), global_step=step, bins="auto")
        self._t_counts.zero_()
        self._sums.zero_()
