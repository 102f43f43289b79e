"""TimestepMonitor writes its summaries at the logger step Lightning gives the same batches' ``train/loss``.

A tiny module logs ``train/loss`` with ``self.log`` (on_step) and the Trainer's ``log_every_n_steps`` equals the
monitor's, so both write after the same optimizer steps: their TensorBoard steps must be the same list, under
gradient accumulation (an epoch of 8 micro-batches ends inside a window of 3, where Lightning steps early) and after
a resume from a checkpoint saved mid-epoch.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_speed.callbacks import TimestepCallback, TimestepMonitor
from lightning_speed.timesteps import SpeeD

from _fixtures import cpu_trainer
from test_strategy_callbacks import TinyDiffusion, loader  # pytest puts tests/ on sys.path


class LoggedDiffusion(TinyDiffusion):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss, on_step=True)
        return loss


def steps_of(logger: TensorBoardLogger) -> tuple[list[int], list[int], list[int]]:
    """The TensorBoard steps of train/loss, of a monitor scalar and of the monitor's histogram."""
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    loss = [e.step for e in events.Scalars("train/loss")]
    monitor = [e.step for e in events.Scalars("timesteps/share/convergence")]
    return loss, monitor, [h.step for h in events.Histograms("timesteps/t")]


def run(tmp_path, name: str, max_steps: int, every: int, accumulate: int, ckpt_path=None, checkpoint=None):
    monitor = TimestepMonitor(log_every_n_steps=every, tau=700)
    logger = TensorBoardLogger(tmp_path, name=name)
    callbacks = [TimestepCallback(SpeeD(tau=700), seed=0), monitor, *([checkpoint] if checkpoint else [])]
    trainer = cpu_trainer(max_steps=max_steps, callbacks=callbacks, logger=logger, log_every_n_steps=every,
                          accumulate_grad_batches=accumulate, enable_checkpointing=checkpoint is not None)
    trainer.fit(LoggedDiffusion(), loader(n=64, batch_size=8), ckpt_path=ckpt_path)
    return monitor, logger


@pytest.mark.parametrize("accumulate", [1, 3])
def test_monitor_summaries_share_the_steps_of_train_loss(tmp_path, accumulate):
    monitor, logger = run(tmp_path, "tb", max_steps=6, every=2, accumulate=accumulate)
    loss_steps, monitor_steps, histogram_steps = steps_of(logger)
    assert loss_steps == monitor_steps == histogram_steps == [1, 3, 5]
    assert [h["step"] for h in monitor.history] == [2.0, 4.0, 6.0]  # optimizer steps trained


@pytest.mark.parametrize("accumulate", [1, 2])
def test_after_a_resume_the_summaries_still_share_the_steps_of_train_loss(tmp_path, accumulate):
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)  # saved mid-epoch
    run(tmp_path, "first", max_steps=3, every=2, accumulate=accumulate, checkpoint=checkpoint)
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    monitor, logger = run(tmp_path, "second", max_steps=8, every=2, accumulate=accumulate, ckpt_path=path)
    loss_steps, monitor_steps, histogram_steps = steps_of(logger)
    assert loss_steps == monitor_steps == histogram_steps == [3, 5, 7]
    assert [h["step"] for h in monitor.history] == [4.0, 6.0, 8.0]


def test_a_resume_continues_the_window_in_progress(tmp_path):
    """Steps 1-3, a checkpoint, step 4 after the resume: the summary at 4 covers all four steps, as an uninterrupted
    run's does. Its share and weight per area depend only on the sampled t, whose generator the checkpoint restores;
    without the monitor's state they would describe step 4's 8 samples alone."""
    straight, _ = run(tmp_path, "straight", max_steps=4, every=4, accumulate=1)
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first, _ = run(tmp_path, "first", max_steps=3, every=4, accumulate=1, checkpoint=checkpoint)
    assert first.history == []  # no summary before step 4
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    assert torch.load(path, weights_only=False)["callbacks"]["TimestepMonitor"]["sums"][0].sum() == 3 * 8
    resumed, _ = run(tmp_path, "second", max_steps=4, every=4, accumulate=1, ckpt_path=path)
    (expected,), (got,) = straight.history, resumed.history
    keys = [k for k in expected if k.startswith(("timesteps/share/", "timesteps/weight/"))]
    assert set(got) == set(expected) and len(keys) >= 4  # an area SpeeD rarely draws may have no weight
    assert {k: got[k] for k in keys} == pytest.approx({k: expected[k] for k in keys}, abs=1e-6)


def test_under_ddp_a_checkpoint_holds_the_window_summed_over_the_ranks(tmp_path):
    """Every rank saves; rank 0 alone restores the window, so what it saves is the sum over the ranks (here a strategy
    whose reduce stands for two ranks with the same sums), while one process keeps its own sums as they are."""
    from types import SimpleNamespace

    monitor, _ = run(tmp_path, "tb", max_steps=3, every=4, accumulate=1)
    local = monitor.state_dict()
    assert local["sums"][0].sum() == 3 * 8
    two_ranks = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=lambda x, reduce_op: 2 * x))
    for trainer, factor in ((two_ranks, 2), (SimpleNamespace(world_size=1), 1)):
        checkpoint = {"callbacks": {monitor.state_key: monitor.state_dict()}}
        monitor.on_save_checkpoint(trainer, None, checkpoint)
        saved = checkpoint["callbacks"][monitor.state_key]
        assert torch.equal(saved["sums"], factor * local["sums"]) and torch.equal(saved["t_counts"], factor * local["t_counts"])


def test_a_window_split_at_other_areas_is_not_continued(tmp_path):
    """A checkpoint's window summed at other area bounds (another tau) would mix areas: it starts afresh."""
    monitor = TimestepMonitor(log_every_n_steps=4, tau=700)
    monitor.load_state_dict({"area_of_t": torch.zeros(1000, dtype=torch.long), "sums": torch.ones(3, 3),
                             "t_counts": torch.ones(1000)})
    trainer = cpu_trainer(max_steps=1, callbacks=[TimestepCallback(SpeeD(tau=700), seed=0), monitor], logger=False,
                          enable_checkpointing=False)
    trainer.fit(LoggedDiffusion(), loader(n=64, batch_size=8))
    assert monitor._sums[0].sum() == 8  # only this fit's step: the restored window was refused


class SkippingDiffusion(TinyDiffusion):
    """Skips every second micro-batch (training_step returns None) before drawing its time steps."""

    def training_step(self, batch, batch_idx):
        return None if batch_idx % 2 else super().training_step(batch, batch_idx)


def test_a_skipped_batch_is_not_counted_and_does_not_stop_training():
    """Lightning passes {} for a batch whose training_step returned None; with accumulation 2 the optimizer steps on
    each skipped micro-batch, so every window of 2 steps holds exactly 2 trained batches of 8."""

    class CountingMonitor(TimestepMonitor):
        counted: list[float] = []

        def _flush(self, trainer, pl_module, step):
            self.counted.append(float(self._sums[0].sum()))
            super()._flush(trainer, pl_module, step)

    monitor = CountingMonitor(log_every_n_steps=2, tau=700)
    trainer = cpu_trainer(max_steps=4, callbacks=[TimestepCallback(SpeeD(tau=700), seed=0), monitor], logger=False,
                          accumulate_grad_batches=2)
    trainer.fit(SkippingDiffusion(), loader(n=64, batch_size=8))
    assert [h["step"] for h in monitor.history] == [2.0, 4.0]
    assert monitor.counted == [16.0, 16.0]
