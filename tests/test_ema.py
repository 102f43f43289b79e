"""EMAWeightAveraging: same averages and checkpoints as Lightning's, without host syncs per update."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMA
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_speed.callbacks import EMAWeightAveraging

torch.set_num_threads(2)


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))  # has an int buffer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(callback, steps: int = 7, ckpt_path=None, tmp_path=None, batch_size: int = 8) -> tuple[pl.Trainer, Regressor]:
    torch.manual_seed(0)
    model = Regressor()
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))  # 4 batches: step 4 ends an epoch
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(data, batch_size=batch_size), ckpt_path=ckpt_path)
    return trainer, model


def _averaged(callback) -> list[torch.Tensor]:
    module = callback._average_model.module
    return [t.detach().clone() for t in [*module.parameters(), *module.buffers()]]


@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_same_average_as_lightning(decay):
    ours, theirs = EMAWeightAveraging(decay=decay), LightningEMA(decay=decay)
    _, model = _fit(ours)
    _fit(theirs)
    pairs = list(zip(_averaged(ours), _averaged(theirs), strict=True))
    for a, b in pairs:
        if a.is_floating_point():
            torch.testing.assert_close(a, b)
    # Integer buffers (BatchNorm's step counter) are copied, not truncated averages as in AveragedModel.
    assert [int(a) for a, _ in pairs if not a.is_floating_point()] == [int(model.net[1].num_batches_tracked)] == [7]
    assert int(ours._average_model.n_averaged) == int(theirs._average_model.n_averaged) == 7


def test_without_buffer_averaging_buffers_follow_the_model():
    """use_buffers=False: parameters are averaged as Lightning's are, buffers are the model's."""
    ours, theirs = EMAWeightAveraging(decay=0.9, use_buffers=False), LightningEMA(decay=0.9, use_buffers=False)
    _, model = _fit(ours)
    _fit(theirs)
    for a, b in zip(ours._average_model.module.parameters(), theirs._average_model.module.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(ours._average_model.module.buffers(), model.buffers(), strict=True):
        torch.testing.assert_close(a, b)


def test_closed_form_three_updates():
    """ema_1 = w_1, ema_n = d * ema_{n-1} + (1 - d) * w_n."""
    decay = 0.75
    callback = EMAWeightAveraging(decay=decay)
    model = nn.Linear(2, 1, bias=False)
    callback._average_model = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    history = []
    for value in (1.0, 3.0, -2.0):
        with torch.no_grad():
            model.weight.fill_(value)
        history.append(value)
        callback.update(model)
    expected = (decay * 1.0 + (1 - decay) * 3.0) * decay + (1 - decay) * -2.0
    torch.testing.assert_close(callback._average_model.module.weight, torch.full((1, 2), expected))


def test_update_reads_nothing_back_from_the_device(monkeypatch):
    """After the first update, no tensor is converted to a Python value (a host sync on CUDA)."""
    callback = EMAWeightAveraging(decay=0.9)
    model = Regressor()
    callback._average_model = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    callback.update(model)  # the first update may read the counter once

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor during an EMA update")

    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    for _ in range(3):
        callback.update(model)
    with pytest.raises(AssertionError, match="host read"):  # the test can tell: Lightning's update does read
        torch.optim.swa_utils.AveragedModel(model).update_parameters(model)


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in module.state_dict().values()]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


def test_resume_after_fit_equals_an_uninterrupted_run(tmp_path):
    """Fit 4 steps, save after fit, resume to 7: the same weights and average as 7 steps in one go.

    After fit the module holds the average (Lightning copies it in at train end); the checkpoint must
    still resume from the training weights. Lightning's own callback resumes from the average here.
    One batch is the whole data set, so every step sees the same batch whatever Lightning's epoch
    bookkeeping does on resume (from a checkpoint written at an epoch's end it replays a batch).
    """
    straight = EMAWeightAveraging(decay=0.8)
    _, straight_model = _fit(straight, steps=7, tmp_path=tmp_path, batch_size=32)
    first, _ = _fit(EMAWeightAveraging(decay=0.8), steps=4, tmp_path=tmp_path, batch_size=32)
    first.save_checkpoint(tmp_path / "after_fit.ckpt")
    resumed = EMAWeightAveraging(decay=0.8)
    _, resumed_model = _fit(resumed, steps=7, ckpt_path=str(tmp_path / "after_fit.ckpt"), tmp_path=tmp_path,
                            batch_size=32)
    assert int(resumed._average_model.n_averaged) == 7
    _assert_same(_averaged(resumed), _averaged(straight))
    _assert_same(_weights(resumed_model), _weights(straight_model))  # both hold the average after fit


def test_last_checkpoint_at_max_steps_keeps_the_training_weights(tmp_path):
    """ModelCheckpoint(save_last=True) writes last.ckpt after the EMA callback's on_train_end."""

    class TrainingWeights(pl.Callback):  # runs before the EMA callback: sees the weights before the copy
        def on_train_end(self, trainer, pl_module):
            self.weights = _weights(pl_module)

    probe, ema = TrainingWeights(), EMAWeightAveraging(decay=0.5)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=100)
    torch.manual_seed(0)
    model = Regressor()
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[probe, ema, checkpoint])
    trainer.fit(model, DataLoader(data, batch_size=8))  # stops mid-epoch: last.ckpt comes from on_train_end
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    _assert_same(list(saved["current_model_state"].values()), probe.weights)
    _assert_same(list(saved["state_dict"].values()), _weights(model))  # the module now holds the average
    assert not torch.equal(probe.weights[0], _weights(model)[0])  # so the two can be told apart


def test_lightning_checkpoint_resumes_in_ours(tmp_path):
    """Checkpoints are interchangeable with Lightning's callback."""
    trainer, _ = _fit(LightningEMA(decay=0.8), steps=4, tmp_path=tmp_path)
    trainer.save_checkpoint(tmp_path / "lightning.ckpt")
    ours = EMAWeightAveraging(decay=0.8)
    _fit(ours, steps=7, ckpt_path=str(tmp_path / "lightning.ckpt"), tmp_path=tmp_path)
    assert int(ours._average_model.n_averaged) == 7


@pytest.mark.parametrize(("decay", "error", "match"), [
    (1.5, ValueError, r"decay must be a number in \[0, 1\], got 1.5"),
    ("0.9", TypeError, r"decay must be a number, got '0.9' \(str\)"),
])
def test_bad_decay(decay, error, match):
    with pytest.raises(error, match=match):
        EMAWeightAveraging(decay=decay)


class _Evaluate(pl.Callback):
    """Records the module's weights inside and after ``averaged_weights`` at train end (before the copy)."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def on_train_end(self, trainer, pl_module):
        from lightning_speed.callbacks.ema import averaged_weights

        self.before = _all(pl_module)
        with averaged_weights(trainer, pl_module, **self.kwargs) as self.used:
            self.inside = _all(pl_module)
        self.after = _all(pl_module)


def _all(module: nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers: the order in which the averaged model pairs them."""
    return [t.detach().clone() for t in [*module.parameters(), *module.buffers()]]


@pytest.mark.parametrize("make", [lambda: EMAWeightAveraging(decay=0.5), lambda: LightningEMA(decay=0.5)],
                         ids=["ours", "lightning"])
def test_averaged_weights_swaps_the_average_in_and_back(make):
    ema, probe = make(), _Evaluate()
    torch.manual_seed(0)
    model = Regressor()
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[probe, ema]).fit(model, DataLoader(data, batch_size=8))
    assert probe.used is True
    _assert_same(probe.inside, _averaged(ema))  # exactly the average: a swap copies, it does not compute
    _assert_same(probe.after, probe.before)  # and the training weights come back unchanged
    assert not torch.equal(probe.inside[0], probe.before[0])


def test_averaged_weights_without_ema_or_disabled_leaves_the_module_alone():
    for callbacks, kwargs in (([], {}), ([EMAWeightAveraging(decay=0.5)], {"enabled": False})):
        probe = _Evaluate(**kwargs)
        torch.manual_seed(0)
        model = Regressor()
        data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
        pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[probe, *callbacks]).fit(model, DataLoader(data, batch_size=8))
        assert probe.used is False
        _assert_same(probe.inside, probe.before)


def test_averaged_weights_refuses_a_module_that_changed():
    from lightning_speed.callbacks.ema import averaged_weights

    class Trainer:
        callbacks = [EMAWeightAveraging(decay=0.5)]

    model = Regressor()
    Trainer.callbacks[0]._average_model = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    model.extra = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match=r"EMA model has \d+ parameters\+buffers but the module has \d+.*use_ema=False"):
        with averaged_weights(Trainer(), model):
            pass


def test_ema_refuses_a_sharded_strategy_with_a_clear_error() -> None:
    """FSDP shards the parameters the EMA would pair with its full copy by position: stop at setup, say why."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_speed.callbacks import EMAWeightAveraging

    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match=r"cannot average the weights under FSDPStrategy.*DDP.*ema: null"):
        EMAWeightAveraging(decay=0.9).setup(trainer, torch.nn.Linear(2, 2), "fit")
