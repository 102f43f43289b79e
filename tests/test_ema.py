"""EMAWeightAveraging: same averages and checkpoints as Lightning's, without host syncs per update."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMA
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_speed.callbacks import EMAWeightAveraging
from lightning_speed.callbacks.ema import ShardAverage

torch.set_num_threads(2)


class ShardEMA(EMAWeightAveraging):
    """The FSDP path (each rank averages the tensors it holds, checkpoints gathered through the strategy) on one
    CPU process, where Lightning refuses FSDP: the module's whole tensors stand in for the rank's shard."""

    def averages_shards(self, strategy):
        return True


BOTH = pytest.mark.parametrize("make", [EMAWeightAveraging, ShardEMA], ids=["full_copy", "shards"])


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
    if getattr(callback, "_shards", None) is not None:
        return [t.clone() for t in callback._shards.tensors]
    module = callback._average_model.module
    return [t.detach().clone() for t in [*module.parameters(), *module.buffers()]]


@BOTH
@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_same_average_as_lightning(decay, make):
    ours, theirs = make(decay=decay), LightningEMA(decay=decay)
    _, model = _fit(ours)
    _fit(theirs)
    pairs = list(zip(_averaged(ours), _averaged(theirs), strict=True))
    for a, b in pairs:
        if a.is_floating_point():
            torch.testing.assert_close(a, b)
    # Integer buffers (BatchNorm's step counter) are copied, not truncated averages as in AveragedModel.
    assert [int(a) for a, _ in pairs if not a.is_floating_point()] == [int(model.net[1].num_batches_tracked)] == [7]
    assert ours.n_averaged == int(theirs._average_model.n_averaged) == 7


@BOTH
def test_without_buffer_averaging_buffers_follow_the_model(tmp_path, make):
    """use_buffers=False: parameters are averaged as Lightning's are, buffers are the model's."""
    ours, theirs = make(decay=0.9, use_buffers=False), LightningEMA(decay=0.9, use_buffers=False)
    trainer, model = _fit(ours)
    _fit(theirs)
    trainer.save_checkpoint(tmp_path / "ours.ckpt")
    saved = torch.load(tmp_path / "ours.ckpt", weights_only=False)["state_dict"]
    averaged = dict(theirs._average_model.module.named_parameters())
    for name, value in model.named_buffers():
        torch.testing.assert_close(saved[name], value)
    for name, value in averaged.items():
        torch.testing.assert_close(saved[name], value)


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


@pytest.mark.parametrize("shards", [False, True], ids=["full_copy", "shards"])
def test_update_reads_nothing_back_from_the_device(monkeypatch, shards):
    """After the first update, no tensor is converted to a Python value (a host sync on CUDA)."""
    callback = EMAWeightAveraging(decay=0.9)
    model = Regressor()
    if shards:
        callback._shards = ShardAverage(0.9)
    else:
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


@pytest.mark.parametrize(("first", "then"), [(EMAWeightAveraging, EMAWeightAveraging), (ShardEMA, ShardEMA),
                                             (ShardEMA, EMAWeightAveraging), (EMAWeightAveraging, ShardEMA)],
                         ids=["full_copy", "shards", "shards_to_full_copy", "full_copy_to_shards"])
def test_resume_after_fit_equals_an_uninterrupted_run(tmp_path, first, then):
    """Fit 4 steps, save after fit, resume to 7: the same weights and average as 7 steps in one go.

    After fit the module holds the average (Lightning copies it in at train end); the checkpoint must
    still resume from the training weights. Lightning's own callback resumes from the average here.
    One batch is the whole data set, so every step sees the same batch whatever Lightning's epoch
    bookkeeping does on resume (from a checkpoint written at an epoch's end it replays a batch).
    A checkpoint of either path (a full copy; shards, as under FSDP) resumes in the other.
    """
    straight = EMAWeightAveraging(decay=0.8)
    _, straight_model = _fit(straight, steps=7, tmp_path=tmp_path, batch_size=32)
    trainer, _ = _fit(first(decay=0.8), steps=4, tmp_path=tmp_path, batch_size=32)
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")
    resumed = then(decay=0.8)
    _, resumed_model = _fit(resumed, steps=7, ckpt_path=str(tmp_path / "after_fit.ckpt"), tmp_path=tmp_path,
                            batch_size=32)
    assert resumed.n_averaged == 7
    _assert_same(_averaged(resumed), _averaged(straight))
    _assert_same(_weights(resumed_model), _weights(straight_model))  # both hold the average after fit


@pytest.mark.parametrize("when", ["during_fit", "after_fit"])
def test_shard_checkpoints_equal_full_copy_checkpoints(tmp_path, when):
    """The same run writes the same checkpoint (average, training weights, counter) on either path."""

    class SaveAtStep3(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                trainer.save_checkpoint(trainer.default_root_dir + "/during_fit.ckpt")

    saved = {}
    for make in (EMAWeightAveraging, ShardEMA):
        root = tmp_path / make.__name__
        torch.manual_seed(0)
        model = Regressor()
        data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
        trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                             callbacks=[make(decay=0.7), SaveAtStep3()])
        trainer.fit(model, DataLoader(data, batch_size=8))
        if when == "after_fit":
            trainer.save_checkpoint(root / "after_fit.ckpt")
        saved[make] = torch.load(root / f"{when}.ckpt", weights_only=False)
    full, shards = saved[EMAWeightAveraging], saved[ShardEMA]
    for key in ("state_dict", "current_model_state", "averaging_state"):
        assert full[key].keys() == shards[key].keys()
        _assert_same(list(shards[key].values()), list(full[key].values()))
    assert int(shards["averaging_state"]["n_averaged"]) == (3 if when == "during_fit" else 5)
    assert not torch.equal(shards["state_dict"]["net.0.weight"], shards["current_model_state"]["net.0.weight"])


def test_a_shard_average_equals_the_whole_average():
    """Elementwise: averaging two halves of a tensor on their own (two ranks' shards) equals averaging it whole."""
    torch.manual_seed(0)
    whole, halves = ShardAverage(0.9), [ShardAverage(0.9), ShardAverage(0.9)]
    for _ in range(4):
        weights = torch.randn(10)
        whole.update([weights])
        for shard, part in zip(halves, weights.chunk(2)):
            shard.update([part])
    assert torch.equal(torch.cat([h.tensors[0] for h in halves]), whole.tensors[0])
    assert whole.n_averaged == 4


@BOTH
def test_last_checkpoint_at_max_steps_keeps_the_training_weights(tmp_path, make):
    """ModelCheckpoint(save_last=True) writes last.ckpt after the EMA callback's on_train_end."""

    class TrainingWeights(pl.Callback):  # runs before the EMA callback: sees the weights before the copy
        def on_train_end(self, trainer, pl_module):
            self.weights = _weights(pl_module)

    probe, ema = TrainingWeights(), make(decay=0.5)
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


@BOTH
def test_lightning_checkpoint_resumes_in_ours(tmp_path, make):
    """Checkpoints are interchangeable with Lightning's callback."""
    trainer, _ = _fit(LightningEMA(decay=0.8), steps=4, tmp_path=tmp_path)
    trainer.save_checkpoint(tmp_path / "lightning.ckpt")
    ours = make(decay=0.8)
    _fit(ours, steps=7, ckpt_path=str(tmp_path / "lightning.ckpt"), tmp_path=tmp_path)
    assert ours.n_averaged == 7


@pytest.mark.parametrize(("decay", "error", "match"), [
    (1.5, ValueError, r"decay must be a number in \[0, 1\), got 1.5"),
    (1.0, ValueError, r"decay must be a number in \[0, 1\), got 1.0.*1 never moves the average"),
    ("0.9", TypeError, r"decay must be a number, got '0.9' \(str\)"),
])
def test_bad_decay(decay, error, match):
    with pytest.raises(error, match=match):
        EMAWeightAveraging(decay=decay)
    assert EMAWeightAveraging(decay=0).decay == 0.0  # no averaging: the latest weights


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


@pytest.mark.parametrize("make", [lambda: EMAWeightAveraging(decay=0.5), lambda: ShardEMA(decay=0.5),
                                  lambda: LightningEMA(decay=0.5)], ids=["ours", "ours_shards", "lightning"])
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


@pytest.mark.parametrize(("strategy", "kwargs", "match"), [
    ("ModelParallelStrategy", {}, r"cannot average the weights under ModelParallelStrategy.*FSDPStrategy.*ema: null"),
    ("FSDPStrategy", {"state_dict_type": "sharded"}, r"needs FSDPStrategy\(state_dict_type='full'\), got 'sharded'"),
    ("FSDPStrategy", {"device": "cpu"}, r"device=device\(type='cpu'\)\) under FSDP.*Leave device unset"),
])
def test_ema_refuses_what_it_cannot_average_with_a_clear_error(strategy, kwargs, match) -> None:
    """Stop at setup, before any step, and say what to change."""
    from types import SimpleNamespace

    from lightning.pytorch import strategies

    strategy_kwargs = {k: v for k, v in kwargs.items() if k != "device"}
    trainer = SimpleNamespace(strategy=getattr(strategies, strategy)(**strategy_kwargs))
    ema = EMAWeightAveraging(decay=0.9, **({"device": kwargs["device"]} if "device" in kwargs else {}))
    with pytest.raises(ValueError, match=match):
        ema.setup(trainer, torch.nn.Linear(2, 2), "fit")


def test_ema_under_fsdp_averages_shards_and_keeps_no_full_copy() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    ema = EMAWeightAveraging(decay=0.9)
    ema.setup(SimpleNamespace(strategy=FSDPStrategy()), torch.nn.Linear(2, 2), "fit")
    assert ema._average_model is None and isinstance(ema._shards, ShardAverage) and ema.holds_average


def test_shard_swap_refuses_a_module_that_changed():
    from lightning_speed.callbacks.ema import averaged_weights

    class Trainer:
        callbacks = [ShardEMA(decay=0.5)]

    model = Regressor()
    Trainer.callbacks[0]._shards = ShardAverage(0.5)
    Trainer.callbacks[0].update(model)
    model.extra = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match=r"EMA holds \d+ parameters\+buffers but the module has \d+.*use_ema=False"):
        with averaged_weights(Trainer(), model):
            pass
