"""EMAWeightAveraging: same averages and checkpoints as Lightning's, without host syncs per update."""

from __future__ import annotations

from contextlib import nullcontext

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


@pytest.mark.parametrize("warmup", [False, True], ids=["constant", "warmup"])
@pytest.mark.parametrize("shards", [False, True], ids=["full_copy", "shards"])
def test_update_reads_nothing_back_from_the_device(monkeypatch, shards, warmup):
    """After the first update, no tensor is converted to a Python value (a host sync on CUDA); the warm-up's
    decay comes from a count kept on the host."""
    callback = EMAWeightAveraging(decay=0.9, warmup=warmup)
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


class _EvaluateTraining(pl.Callback):
    """Records the module's weights before, inside and after ``training_weights`` at train end."""

    def on_train_end(self, trainer, pl_module):
        from lightning_speed.callbacks.ema import training_weights

        self.before = _all(pl_module)
        with training_weights(trainer, pl_module):
            self.inside = _all(pl_module)
        self.after = _all(pl_module)


@BOTH
@pytest.mark.parametrize("ema_first", [True, False], ids=["after_the_copy", "before_the_copy"])
def test_training_weights_at_train_end_in_either_callback_order(make, ema_first):
    ema, first, probe = make(decay=0.5), _EvaluateTraining(), _EvaluateTraining()
    torch.manual_seed(0)
    model = Regressor()
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    callbacks = [first, ema, probe] if ema_first else [first, probe, ema]  # first: before the EMA's copy
    pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=callbacks).fit(model, DataLoader(data, batch_size=8))
    _assert_same(first.inside, first.before)  # nothing copied yet: the module is left alone
    _assert_same(probe.inside, first.before)  # the training weights, exactly
    _assert_same(probe.after, probe.before)  # and what the module held comes back
    assert torch.equal(probe.before[0], _averaged(ema)[0]) == ema_first
    _assert_same(_all(model), _averaged(ema))  # the module ends with the average
    assert not torch.equal(probe.inside[0], _averaged(ema)[0])


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
    Trainer.callbacks[0].update(model)  # an average to swap in: before its first update the module keeps its own
    model.extra = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match=r"EMA model has \d+ parameters\+buffers but the module has \d+.*use_ema=False"):
        with averaged_weights(Trainer(), model):
            pass


_UNLIMITED = {"max_steps": -1, "max_epochs": None, "fast_dev_run": False}  # the trainer limits setup reads


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
    trainer = SimpleNamespace(strategy=getattr(strategies, strategy)(**strategy_kwargs), **_UNLIMITED)
    ema = EMAWeightAveraging(decay=0.9, **({"device": kwargs["device"]} if "device" in kwargs else {}))
    with pytest.raises(ValueError, match=match):
        ema.setup(trainer, torch.nn.Linear(2, 2), "fit")


def test_ema_under_fsdp_averages_shards_and_keeps_no_full_copy() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    ema = EMAWeightAveraging(decay=0.9)
    ema.setup(SimpleNamespace(strategy=FSDPStrategy(), **_UNLIMITED), torch.nn.Linear(2, 2), "fit")
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


# ------------------------------------------------------------------ precision
class Validated(Regressor):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).pow(2).mean()


class _Record(pl.Callback):
    """The training weights after every step, and the module's weights during and after each validation (after
    the EMA callback, listed before this one, has swapped the training weights back)."""

    def __init__(self) -> None:
        self.steps, self.validated, self.after_validation = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(_all(pl_module))

    def on_validation_epoch_start(self, trainer, pl_module):
        self.validated.append((len(self.steps), _all(pl_module)))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.after_validation.append((len(self.steps), _all(pl_module)))


@BOTH
@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.float32), ("64-true", torch.float64)])
def test_ema_averages_in_bf16_true_and_64_true(precision, dtype, make):
    """The average of bf16 weights is held in fp32 (a bf16 one would not move: (1 - decay) * (w - ema) is below
    its resolution), that of fp64 weights in fp64. Validating every 2 steps swaps it in and out: the module sees
    the average rounded to its dtype, the average itself stays exact."""
    decay, ema, record = 0.8, make(decay=0.8), _Record()
    torch.manual_seed(0)
    model = Validated()
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    pl.Trainer(max_steps=5, accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, val_check_interval=2, limit_val_batches=1,
               num_sanity_val_steps=0, callbacks=[ema, record]).fit(
        model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    expected, averages = None, []  # the EMA of the recorded training weights, by hand, after each step
    for weights in record.steps:
        if expected is None:
            expected = [w.to(dtype) if w.is_floating_point() else w for w in weights]
        else:
            expected = [e.lerp(w.to(dtype), 1 - decay) if w.is_floating_point() else w
                        for e, w in zip(expected, weights, strict=True)]
        averages.append(expected)
    assert ema.n_averaged == len(record.steps) == 5
    averaged = _averaged(ema)
    assert [t.dtype for t in averaged if t.is_floating_point()] == [dtype] * 8  # 6 parameters, 2 BatchNorm statistics
    _assert_same(averaged, expected)
    assert [step for step, _ in record.validated] == [2, 4]
    for step, seen in record.validated:
        _assert_same(seen, [e.to(w.dtype) for e, w in zip(averages[step - 1], record.steps[0], strict=True)])
    for step, restored in record.after_validation:  # training goes on from its own weights, exactly
        assert all(torch.equal(r, w) for r, w in zip(restored, record.steps[step - 1], strict=True)), step
        assert not all(torch.equal(r, v) for r, v in zip(restored, dict(record.validated)[step], strict=True))
    assert not torch.equal(record.steps[-1][0], record.steps[0][0])  # the weights did train


# ------------------------------------------------------------------ schedules that never update
@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"update_every_n_steps": 0}, ValueError,
     r"update_every_n_steps must be an integer of at least 1, got 0; .*0 never does.*update_starting_at_epoch"),
    ({"update_every_n_steps": -2, "update_starting_at_epoch": 0}, ValueError,
     r"update_every_n_steps must be an integer of at least 0, got -2"),
    ({"update_every_n_steps": 1.5}, TypeError, r"update_every_n_steps must be an integer, got 1.5 \(float\)"),
    ({"update_starting_at_step": -1}, ValueError, r"update_starting_at_step must be an integer of at least 0, got -1"),
    ({"update_starting_at_epoch": "1"}, TypeError, r"update_starting_at_epoch must be an integer, got '1' \(str\)"),
])
def test_bad_update_schedule_is_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        EMAWeightAveraging(decay=0.9, **kwargs)
    # 0 with update_starting_at_epoch: updates after epochs only, as in Lightning
    assert EMAWeightAveraging(update_every_n_steps=0, update_starting_at_epoch=0).update_every_n_steps == 0


@pytest.mark.parametrize(("kwargs", "max_steps", "refused"), [
    ({"update_starting_at_step": 5}, 5, True),  # step indices 0..4: the last one is 4
    ({"update_starting_at_step": 1000}, 5, True),
    ({"update_starting_at_step": 4, "update_every_n_steps": 3}, 5, True),  # first update at index 6
    ({"update_every_n_steps": 0, "update_starting_at_epoch": 2}, 5, True),  # max_epochs 1
    ({"update_starting_at_step": 4}, 5, False),
    ({"update_every_n_steps": 10}, 5, False),  # updates at index 0
    ({"update_starting_at_step": 1000}, -1, False),  # no step limit (max_epochs=1 is left to the train-end warning)
])
def test_schedule_that_cannot_update_before_max_steps_is_refused_at_setup(kwargs, max_steps, refused):
    torch.manual_seed(0)
    model = Regressor()
    initial = _weights(model)
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[EMAWeightAveraging(decay=0.9, **kwargs)])
    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=4)  # 8 steps an epoch
    if not refused:
        with pytest.warns(UserWarning, match="never updated its average") if max_steps < 0 else nullcontext():
            trainer.fit(model, data)
        return
    match = (r"EMAWeightAveraging would never update its average: with update_every_n_steps=.* its first update "
             r"comes after (optimizer step|epoch) \d+, but the run stops at trainer.max_steps=5( and max_epochs=1)? "
             r"before that.*Start the updates earlier.*or drop the EMA \(ema: null\)")
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, data)
    assert trainer.global_step == 0
    _assert_same(_weights(model), initial)  # refused before the first step


@pytest.mark.parametrize("decay, kwargs, limits, share", [
    (0.9, {}, {"max_steps": 40}, 0.9**39),  # 1.6 % left: warned
    (0.9, {"update_every_n_steps": 2}, {"max_steps": 40}, 0.9**19),  # 20 updates at steps 0, 2, ..., 38
    (0.9, {"update_starting_at_step": 3}, {"max_steps": 40}, 0.9**36),
    (0.9, {"update_every_n_steps": 2, "update_starting_at_step": 3}, {"max_steps": 40}, 0.9**17),  # 4, 6, ..., 38
    (0.9, {}, {"max_steps": 44}, 0.9**43),  # 1.08 %: warned
    (0.9, {}, {"max_steps": 45}, None),  # 0.9**44 = 0.97 %: quiet
    (0.9, {"warmup": True}, {"max_steps": 40}, None),  # the warm-up's average follows the weights
    (0.9, {"update_every_n_steps": 0, "update_starting_at_epoch": 0}, {"max_epochs": 40}, 0.9**39),  # epochs only
    (0.9, {"update_every_n_steps": 0, "update_starting_at_epoch": 2}, {"max_epochs": 46}, 0.9**43),  # epochs 2..45
    (0.9, {"update_starting_at_epoch": 0}, {"max_steps": 40, "max_epochs": 3}, 0.9**42),  # 40 steps + 3 epochs
    (0.9, {"update_starting_at_epoch": 0}, {"max_steps": 42, "max_epochs": 3}, None),  # 45 updates at most: quiet
    (0.9, {"update_starting_at_epoch": 0}, {"max_steps": 40}, None),  # epochs unbounded: the count is unknown
    (0.9, {}, {"max_epochs": 2}, None),  # steps unbounded (an epoch's length is not known at setup)
])
def test_an_average_left_holding_the_first_weights_is_warned_at_setup(decay, kwargs, limits, share):
    """Without warm-up the average keeps decay**(n - 1) of the first weights after n updates, the first of which
    copies them (the recipe's 0.9999 over 30k steps: 5 %): setup warns above 1 %, with the share and the fix, before
    any step. n counts the steps and epoch ends at which Lightning's ``should_update`` updates, at most: no warning
    while one kind of update has no limit."""
    import warnings

    trainer = pl.Trainer(**limits, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    callback = EMAWeightAveraging(decay=decay, **kwargs)
    updates = sum(callback.should_update(step_idx=step) for step in range(max(trainer.max_steps, 0)))
    updates += sum(callback.should_update(epoch_idx=epoch) for epoch in range(max(trainer.max_epochs or 0, 0)))
    average = ShardAverage(decay)
    for i in range(updates):  # the first weights 1, every later one 0: the average is their share
        average.update([torch.tensor([1.0 if i == 0 else 0.0])])
    if share is not None:
        assert average.tensors[0].item() == pytest.approx(decay ** (updates - 1), rel=1e-5)
        assert share == pytest.approx(decay ** (updates - 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback._check_schedule(trainer)
    said = [str(w.message) for w in caught if "first (untrained) weights" in str(w.message)]
    if share is None:
        assert said == []
    else:
        assert len(said) == 1 and f"{share:.1%}" in said[0] and "warmup: true" in said[0]


def test_fast_dev_run_is_not_refused():
    """A smoke test stops after a batch whatever the schedule: it runs, and says the average was never updated."""
    torch.manual_seed(0)
    trainer = pl.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[EMAWeightAveraging(update_starting_at_step=1000)])
    with pytest.warns(UserWarning, match="never updated its average in 2 steps"):
        trainer.fit(Regressor(), DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=8))


class _TrainingWeights(pl.Callback):
    """Before the EMA callback: the training weights at train end and where averaged_weights leaves the module;
    after it: the weights validation sees."""

    def __init__(self) -> None:
        self.validated = []

    def on_validation_epoch_start(self, trainer, pl_module):
        self.validated.append(_all(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.latest = _all(pl_module)

    def on_train_end(self, trainer, pl_module):
        from lightning_speed.callbacks.ema import averaged_weights

        self.before = _all(pl_module)
        with averaged_weights(trainer, pl_module) as self.used:
            self.inside = _all(pl_module)


@BOTH
def test_an_average_never_updated_stands_for_the_training_weights(tmp_path, make):
    """Stopped by max_epochs before update_starting_at_step: validation, averaged_weights, the model after fit and
    the checkpoint all hold the training weights (Lightning's callback: the initial ones), with warnings."""
    ema, before, after = make(decay=0.5, update_starting_at_step=100), _TrainingWeights(), _TrainingWeights()
    torch.manual_seed(0)
    model = Validated()
    initial = _all(model)
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         default_root_dir=tmp_path, callbacks=[before, ema, after])
    with pytest.warns(UserWarning) as warned:
        trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    messages = [str(w.message) for w in warned]
    assert any("has not updated its average yet at step 4" in m for m in messages)
    assert any("never updated its average in 4 steps (update_every_n_steps=1, update_starting_at_step=100)" in m
               for m in messages)
    assert ema.n_averaged == 0 and trainer.global_step == 4
    trained = before.latest
    assert not torch.equal(trained[0], initial[0])
    _assert_same(after.validated[-1], trained)  # the end-of-epoch validation (the sanity check saw the initial)
    assert before.used is False
    _assert_same(before.inside, trained)
    _assert_same(_all(model), trained)  # train end copied nothing in
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")
    saved = torch.load(tmp_path / "after_fit.ckpt", weights_only=False)
    _assert_same(list(saved["state_dict"].values()), _weights(model))
    _assert_same(list(saved["current_model_state"].values()), _weights(model))
    assert int(saved["averaging_state"]["n_averaged"]) == 0


# ------------------------------------------------------------------------------------------ warm-up
class _TrainingWeightsAfterEachStep(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append([p.detach().clone() for p in pl_module.parameters()])


@BOTH
def test_warmup_with_power_one_is_the_running_mean_of_the_weights(make):
    """decay_n = 1 - 1 / (1 + n) = n / (n + 1): the (n + 1)-th weights count 1 / (n + 1), so the average is the plain
    mean of the weights after every step (the cap, 0.9999, is not reached in 7 updates)."""
    ema, record = make(decay=0.9999, warmup=True, inv_gamma=1.0, power=1.0), _TrainingWeightsAfterEachStep()
    torch.manual_seed(0)
    model = Regressor()
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    pl.Trainer(max_steps=7, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[ema, record]).fit(model, DataLoader(data, batch_size=8))
    assert len(record.seen) == 7
    means = [torch.stack(step).mean(0) for step in zip(*record.seen)]
    averaged = _averaged(ema)[:len(means)]  # parameters first, then buffers
    for a, m in zip(averaged, means, strict=True):
        torch.testing.assert_close(a, m)
    assert not torch.allclose(averaged[0], record.seen[-1][0])  # not simply the last weights


def test_warmup_decay_follows_diffusers_formula_and_its_milestones():
    ema = EMAWeightAveraging(decay=0.999, warmup=True, inv_gamma=1.0, power=0.75)
    assert [ema.decay_at(n) for n in (1, 9, 99)] == [pytest.approx(1 - (1 + n) ** -0.75, rel=1e-15) for n in (1, 9, 99)]
    # (1 + n)^(-3/4) = 1e-3 at 1 + n = 1e4: the cap 0.999 is reached after 9,999 updates and kept after
    assert ema.decay_at(9_998) < 0.999 and ema.decay_at(9_999) == pytest.approx(0.999, abs=1e-15)
    assert ema.decay_at(10**6) == 0.999
    slow = EMAWeightAveraging(decay=0.9999, warmup=True, power=2 / 3)  # 1 + n = 10^4.5 for 0.999
    assert slow.decay_at(31_621) < 0.999 < slow.decay_at(31_622)
    assert EMAWeightAveraging(decay=0.9, inv_gamma=5.0, power=1.0).decay_at(1) == 0.9  # warm-up off: the constant
    assert EMAWeightAveraging(decay=0.99, warmup=True, inv_gamma=10.0, power=1.0).decay_at(10) == pytest.approx(0.5)


@pytest.mark.parametrize(("first", "then"), [(EMAWeightAveraging, EMAWeightAveraging), (ShardEMA, EMAWeightAveraging)],
                         ids=["full_copy", "shards_to_full_copy"])
def test_warmup_resumes_where_it_stopped(tmp_path, first, then):
    """The decay depends on the number of updates, restored from the checkpoint: 4 + 3 steps equal 7 in one go."""
    kwargs = {"decay": 0.99, "warmup": True, "power": 1.0}
    straight = EMAWeightAveraging(**kwargs)
    _fit(straight, steps=7, tmp_path=tmp_path, batch_size=32)
    trainer, _ = _fit(first(**kwargs), steps=4, tmp_path=tmp_path, batch_size=32)
    trainer.save_checkpoint(tmp_path / "part.ckpt")
    resumed = then(**kwargs)
    _fit(resumed, steps=7, ckpt_path=str(tmp_path / "part.ckpt"), tmp_path=tmp_path, batch_size=32)
    assert resumed.n_averaged == 7
    _assert_same(_averaged(resumed), _averaged(straight))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"warmup": "yes"}, TypeError, "warmup must be"),
    ({"inv_gamma": 0.0}, ValueError, "inv_gamma must be a positive number"),
    ({"power": -0.5}, ValueError, "power must be a positive number"),
])
def test_bad_warmup_settings_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        EMAWeightAveraging(**kwargs)
