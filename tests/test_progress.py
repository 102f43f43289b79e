"""StepProgressBar: one training bar from 0 to max_steps across epochs (a resumed run starts at its step), named
after the epoch; Lightning's per-epoch bar when only max_epochs bounds the run; the CLI installs it."""

from pathlib import Path


from lightning_speed import DiffusionModule
from lightning_speed.callbacks import StepProgressBar

from _fixtures import blob_loader as loader  # pytest puts tests/ on sys.path
from _fixtures import cpu_trainer, one_conv

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class Shown(StepProgressBar):
    """Records every position and description the training bar shows."""

    def __init__(self) -> None:
        super().__init__(refresh_rate=1)
        self.positions: list[int] = []
        self.descriptions: list[str] = []

    def _show(self, n: int) -> None:
        super()._show(n)
        self.positions.append(self.train_progress_bar.n)
        self.descriptions.append(self.train_progress_bar.desc)


def fit(bar, ckpt_path=None, **trainer_args):
    trainer = cpu_trainer(enable_progress_bar=True, callbacks=[bar], **trainer_args)
    trainer.fit(DiffusionModule(one_conv(), image_shape=(1, 8, 8)), loader(n=8, batch_size=4), ckpt_path=ckpt_path)
    return trainer


def test_one_bar_counts_steps_to_max_steps_across_epochs() -> None:
    """2 batches an epoch, 5 steps: 0 .. 5 of 5 on one bar through epochs 0, 1 and 2 (Lightning's restarts at 2)."""
    bar = Shown()
    fit(bar, max_steps=5)
    assert bar.train_progress_bar.total == 5
    assert bar.positions == [0, 1, 2, 3, 4, 5]
    assert bar.descriptions[-1].startswith("Epoch 2")


def test_a_resumed_run_starts_at_its_step(tmp_path) -> None:
    first = fit(Shown(), max_steps=3)
    path = tmp_path / "three.ckpt"
    first.save_checkpoint(path)
    bar = Shown()
    fit(bar, ckpt_path=str(path), max_steps=6)
    assert bar.positions[0] == 3 and bar.positions[-1] == 6 and bar.train_progress_bar.total == 6


def test_a_run_bounded_by_epochs_keeps_lightnings_bar() -> None:
    bar = Shown()
    fit(bar, max_steps=-1, max_epochs=2)
    assert bar.positions == [] and bar.train_progress_bar.total == 2  # batches per epoch


def test_the_cli_replaces_lightnings_default_bar(cli_env) -> None:
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lightning_speed.cli import main

    args = ["--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_steps", "1", "--trainer.accelerator", "cpu"]
    cli = main(args, run=False)
    bars = [c for c in cli.trainer.callbacks if isinstance(c, TQDMProgressBar)]
    assert [type(b) for b in bars] == [StepProgressBar] and cli.trainer.progress_bar_callback is bars[0]
    quiet = main([*args, "--trainer.enable_progress_bar", "false"], run=False)
    assert not any(isinstance(c, TQDMProgressBar) for c in quiet.trainer.callbacks)
