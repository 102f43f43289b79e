"""What StepProgressBar shows of a resumed run: the rate and the time left count only the steps of this fit."""

from lightning_speed import DiffusionModule
from lightning_speed.callbacks import StepProgressBar

from _fixtures import blob_loader as loader  # pytest puts tests/ on sys.path
from _fixtures import cpu_trainer, one_conv


def fit(bar, ckpt_path=None, **trainer_args):
    trainer = cpu_trainer(enable_progress_bar=True, callbacks=[bar], **trainer_args)
    trainer.fit(DiffusionModule(one_conv(), image_shape=(1, 8, 8)), loader(n=8, batch_size=4), ckpt_path=ckpt_path)
    return trainer


def test_a_resumed_bar_rates_only_the_steps_of_this_fit(tmp_path) -> None:
    """tqdm's rate is (n - initial) / elapsed: resumed at 3 of 6, n - initial must be the 3 steps run here, not 6
    (which would double the rate and halve the time left; resumed at 4,000 of 5,000 it shows 5x the speed)."""
    first = fit(StepProgressBar(refresh_rate=1), max_steps=3)
    assert first.progress_bar_callback.train_progress_bar.format_dict["initial"] == 0
    path = tmp_path / "three.ckpt"
    first.save_checkpoint(path)
    bar = StepProgressBar(refresh_rate=1)
    fit(bar, ckpt_path=str(path), max_steps=6)
    shown = bar.train_progress_bar.format_dict
    assert (shown["n"], shown["total"], shown["initial"]) == (6, 6, 3)
