"""EMAWeightAveraging and checkpoints: per-epoch updates resumed at an epoch's end, and evaluating a checkpoint
with the trainer that fitted (the average left from the fit must not change which weights are evaluated)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_ema import BOTH, Regressor, _averaged
from torch.utils.data import DataLoader, TensorDataset

from lightning_speed.callbacks import EMAWeightAveraging

torch.set_num_threads(2)


def _data() -> DataLoader:
    # three equal batches: every step sees the same batch, whichever batch a resumed epoch starts from
    torch.manual_seed(1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    return DataLoader(TensorDataset(x.repeat(3, 1), y.repeat(3, 1)), batch_size=8)


def _trainer(callbacks, steps: int, tmp_path) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path)


@BOTH
def test_per_epoch_updates_resume_from_an_epoch_end_checkpoint_exactly(tmp_path, make):
    """Lightning runs the end of the checkpoint's epoch again on resume; that epoch was averaged in before the
    checkpoint was written, so averaging it again would count it twice. 6 + 3 steps equal 9 in one go, bit for bit."""
    kwargs = {"decay": 0.7, "update_every_n_steps": 0, "update_starting_at_epoch": 0}
    straight = make(**kwargs)
    torch.manual_seed(0)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    _trainer([straight, saver], 9, tmp_path).fit(Regressor(), _data())
    assert straight.n_averaged == 3  # one update per epoch
    resumed = make(**kwargs)
    torch.manual_seed(0)
    _trainer([resumed], 9, tmp_path).fit(Regressor(), _data(), ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert resumed.n_averaged == 3
    for a, b in zip(_averaged(resumed), _averaged(straight), strict=True):
        assert torch.equal(a, b)


def test_epoch_of_the_last_update_is_saved_and_restored():
    saved = EMAWeightAveraging(update_every_n_steps=0, update_starting_at_epoch=0)
    saved._latest_update_epoch, saved._latest_update_step = 4, 12
    restored = EMAWeightAveraging(update_every_n_steps=0, update_starting_at_epoch=0)
    restored.load_state_dict(saved.state_dict())
    assert (restored._latest_update_epoch, restored._latest_update_step) == (4, 12)
    restored.load_state_dict({"latest_update_step": 3})  # Lightning's callback saves no epoch
    assert (restored._latest_update_epoch, restored._latest_update_step) == (-1, 3)


class _Seen(Regressor):
    def validation_step(self, batch, batch_idx):
        self.seen = {k: v.detach().clone() for k, v in self.state_dict().items()}

    test_step = validation_step


@BOTH
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_evaluating_a_checkpoint_after_fit_uses_its_average(tmp_path, make, stage):
    """``trainer.test(ckpt_path=...)`` after ``trainer.fit`` (e.g. the best checkpoint): the checkpoint's average is
    evaluated and stays in the module, as with a new Trainer; a checkpoint written then has the same layout."""
    torch.manual_seed(0)
    model, data = _Seen(), _data()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = _trainer([make(decay=0.5), saver], 6, tmp_path)
    trainer.fit(model, data)
    path = tmp_path / "step=3.ckpt"
    written = torch.load(path, weights_only=False)
    average, current = written["state_dict"], written["current_model_state"]
    assert any(not torch.equal(average[k], current[k]) for k in average)  # the two differ: the test can tell
    getattr(trainer, stage)(model, data, ckpt_path=str(path), verbose=False)
    for name, value in model.seen.items():
        assert torch.equal(value, average[name]), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, average[name]), name
    trainer.save_checkpoint(tmp_path / "again.ckpt")
    again = torch.load(tmp_path / "again.ckpt", weights_only=False)
    for key in ("state_dict", "current_model_state"):
        for name, value in written[key].items():
            assert torch.equal(again[key][name], value), (key, name)


@pytest.mark.parametrize("kwargs", [{"decay_rate": 0.99}, {"multi_avg_fn": lambda *args: None}])
def test_unknown_arguments_are_refused_at_construction(kwargs):
    """A misspelt argument, or an averaging function the update would never call, is refused by name."""
    with pytest.raises(TypeError, match=f"unknown argument\\(s\\) {next(iter(kwargs))}"):
        EMAWeightAveraging(**kwargs)
