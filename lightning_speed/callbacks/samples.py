"""SampleGridCallback: a grid of generated images every N steps, from the same noise each time.

The fixed seed makes successive grids show how the same starting noise is denoised as training
progresses. Grids go to TensorBoard (``add_image("samples", ...)``) when a TensorBoardLogger is
attached, and to ``samples_step{N}.png`` in ``save_dir`` (every time) or, without ``save_dir``,
in the trainer's log dir once at the end of training. EMA weights are used when an
``EMAWeightAveraging`` callback keeps them, as in ``FIDCallback``. Under ``trainer.fast_dev_run``
no grid is made (as Lightning suppresses logging and checkpointing there).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import make_grid

from lightning_speed.callbacks.fid import SolverSettings
from lightning_speed.module_checks import AnySolver
from lightning_speed.metrics.features import count_nonfinite, to_uint8
from lightning_speed.callbacks.ema import averaged_weights, check_training_weights_kept, training_weights
from lightning_speed.validation import check_int


class SampleGridCallback(SolverSettings, pl.Callback):
    """Log and save a grid of ``num_samples`` generated images every ``every_n_steps`` steps.

    Args:
        every_n_steps: steps between grids (``trainer.global_step`` multiples).
        num_samples: images in the grid.
        solver / solver_steps / eta: how images are generated, passed to ``pl_module.sample``:
            "ddim", "ddpm" or "dpmpp_2m" (a flow model: "euler" or "heun"; None: the model's own, ddim for a
            DDPM and euler for a flow, chosen at setup), its number of steps, and eta (None: the solver's
            default; ddim only).
        seed: noise seed, the same for every grid.
        save_dir: write ``samples_step{N}.png`` here at every grid; None: only at train end, in the log dir.
        nrow: images per grid row (default: about the square root of ``num_samples``).
        use_ema: sample with the EMA weights of a ``WeightAveraging`` callback when present.
        at_train_end: also make a grid when training ends.
        sample_kwargs: extra keyword arguments for ``pl_module.sample``.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 64,
        solver: AnySolver | None = None,
        solver_steps: int = 50,
        eta: float | None = None,
        seed: int = 0,
        save_dir: str | None = None,
        nrow: int | None = None,
        use_ema: bool = True,
        at_train_end: bool = True,
        sample_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._set_solver(solver, solver_steps, eta, use_ema, sample_kwargs)
        every_n_steps = check_int(every_n_steps, "every_n_steps", minimum=1, hint="steps between grids")
        num_samples = check_int(num_samples, "num_samples", minimum=1, hint="it is the number of images in the grid")
        seed = check_int(seed, "seed")
        if nrow is not None:
            nrow = check_int(
                nrow, "nrow", minimum=1, hint="it is the images per grid row; null: about the square root of num_samples"
            )
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        self.save_dir = save_dir
        self.nrow = nrow if nrow is not None else max(1, math.isqrt(num_samples - 1) + 1)
        self.at_train_end = at_train_end
        self.last_grid: Tensor | None = None  # uint8 (3, H, W) on the CPU
        self.saved_paths: list[Path] = []
        self._last_step = -1
        self._warned_channels = False

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._check_strategy(trainer)
            self._check_module(pl_module)
            if not self.use_ema and self.at_train_end:
                check_training_weights_kept(trainer, self)

    def make_grid(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Tensor:
        """Sample with the fixed seed (EMA weights if present) and return the grid as uint8 (3, H, W) on the CPU."""
        # without use_ema at train end, the training weights go back in if the EMA has already copied its average in
        with averaged_weights(trainer, pl_module) if self.use_ema else training_weights(trainer, pl_module):
            batches = self._generate(pl_module, self.num_samples, batch_size=self.num_samples, seed=self.seed)
            images = torch.cat(list(batches))  # checked by generate_batches: float (N, C, H, W)
        bad = int(count_nonfinite(images))  # one sync per grid
        if bad:
            rank_zero_warn(
                f"SampleGridCallback: {bad} of {len(images)} generated images contain NaN or inf values at step "
                f"{trainer.global_step} (shown black): the model has diverged."
            )
        images, nrow = to_uint8(images).cpu(), self.nrow
        if images.shape[1] not in (1, 3):
            # A PNG holds 1 or 3 channels: other counts (e.g. 4-channel latents without a decode method) are shown
            # one grey tile per channel, each sample's channels side by side.
            channels = images.shape[1]
            if not self._warned_channels:
                rank_zero_warn(
                    f"SampleGridCallback: {type(pl_module).__name__}.sample returns {channels}-channel images, so the "
                    f"grid shows each channel as a grey tile, {channels} per sample. Give the module a decode method "
                    "(latent diffusion) to see images."
                )
                self._warned_channels = True
            images, nrow = images.reshape(-1, 1, *images.shape[2:]), nrow * channels
        return make_grid(images, nrow=nrow, padding=2, pad_value=0)

    def _output_dir(self, trainer: "pl.Trainer") -> Path:
        return Path(self.save_dir or trainer.log_dir or trainer.default_root_dir)

    def _emit(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", out: Path | None) -> None:
        """Log a grid to TensorBoard and, with ``out``, write it there as a PNG."""
        step = trainer.global_step
        grid = self.make_grid(trainer, pl_module)
        self.last_grid = grid
        self._last_step = step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, global_step=step)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"samples_step{step}.png"
            write_png(grid, str(path))
            self.saved_paths.append(path)

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.fast_dev_run:  # a one-batch check: no grids (Lightning suppresses logging there too)
            return
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step and trainer.is_global_zero:
            self._emit(trainer, pl_module, Path(self.save_dir) if self.save_dir is not None else None)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.at_train_end or trainer.fast_dev_run:
            return
        out = self._output_dir(trainer)  # on every rank: under DDP trainer.log_dir is a broadcast from rank 0
        if not trainer.is_global_zero:
            return
        if trainer.global_step != self._last_step:
            self._emit(trainer, pl_module, out)
        elif self.save_dir is None and self.last_grid is not None:  # grid exists but was never written
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"samples_step{trainer.global_step}.png"
            write_png(self.last_grid, str(path))
            self.saved_paths.append(path)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
