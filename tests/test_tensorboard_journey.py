"""What a run's logs show: a monitor that would write nothing says so, and two FID curves never share a tag."""

from __future__ import annotations

import warnings

import pytest

from lightning_speed.callbacks import TimestepCallback, TimestepMonitor
from lightning_speed.timesteps import SpeeD

from _fixtures import cpu_trainer
from test_fid_callback import TinyGenerator, datamodule, fid_callback, make_trainer  # tests/ on sys.path
from test_strategy_callbacks import TinyDiffusion, loader


def monitored_fit(max_steps: int, every: int, accumulate: int = 1) -> list[str]:
    """The monitor's warnings of one fit."""
    monitor = TimestepMonitor(log_every_n_steps=every, tau=700)
    trainer = cpu_trainer(max_steps=max_steps, callbacks=[TimestepCallback(SpeeD(tau=700), seed=0), monitor],
                          accumulate_grad_batches=accumulate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyDiffusion(), loader(n=64, batch_size=8))
    return [str(w.message) for w in caught if "TimestepMonitor(log_every_n_steps" in str(w.message)]


def test_a_monitor_interval_longer_than_the_fit_says_no_summary_will_be_written() -> None:
    """The quickstart's monitor logs every 50 steps: with --trainer.max_steps 40 it wrote no timesteps/ tag at all,
    silently. Optimizer steps count, not micro-batches: 4 steps of 2 micro-batches reach a summary at step 4."""
    (message,) = monitored_fit(max_steps=3, every=4)
    assert "from step 0 to 3, so it will write none" in message and "--monitor.init_args.log_every_n_steps" in message
    assert monitored_fit(max_steps=4, every=4, accumulate=2) == []


def test_two_fid_callbacks_of_one_name_are_refused_before_training(tmp_path) -> None:
    """`fid` and `final_fid` both named `fid` logged two values of `fid` at the last step, mixing their curves."""
    model = TinyGenerator()
    every = fid_callback(tmp_path, every_n_steps=2)
    final = fid_callback(tmp_path, num_samples=40, on_train_end=True)
    with pytest.raises(ValueError, match=r"Two FIDCallbacks are named 'fid'.*--final_fid.init_args.name"):
        make_trainer(tmp_path, [every, final]).fit(model, datamodule=datamodule())
    assert model.steps_run == 0
