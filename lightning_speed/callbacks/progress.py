"""A training bar that counts optimizer steps against ``trainer.max_steps``.

Diffusion runs are budgeted in steps (every shipped config sets ``max_steps`` and leaves ``max_epochs`` open),
but Lightning's bar restarts at every epoch, so it never says how far the run is. ``StepProgressBar`` keeps
Lightning's TQDM bar and its metrics, with one bar for the whole run: ``Epoch 9: 24%| 1200/5000``. A run
bounded by epochs only keeps Lightning's per-epoch bar. The CLI uses it in place of Lightning's default bar.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override


class StepProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose training bar runs from 0 to ``trainer.max_steps`` (a resumed run starts where it
    stopped) and is named after the current epoch; without ``max_steps`` it is Lightning's bar."""

    @staticmethod
    def _by_steps(trainer: pl.Trainer) -> bool:
        return isinstance(trainer.max_steps, int) and trainer.max_steps > 0

    def _show(self, n: int) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = n
            bar.refresh()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self._by_steps(trainer):
            super().on_train_epoch_start(trainer, *args)
            return
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # the first epoch of this fit: one bar for all of them
            bar.reset(total=trainer.max_steps)
            # tqdm's rate and time left count from `initial`: a resumed run's earlier steps took no time here
            bar.initial = trainer.global_step
            self._show(trainer.global_step)
        bar.set_description(f"Epoch {trainer.current_epoch}")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._by_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, *args)
            return
        step, total = trainer.global_step, trainer.max_steps
        if self.refresh_rate and (step % self.refresh_rate == 0 or step >= total):
            self._show(step)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._by_steps(trainer):
            super().on_train_epoch_end(trainer, pl_module)
        elif not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
