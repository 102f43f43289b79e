"""EMAWeightAveraging as a run meets it: diffusers' warm-up step by step, gradient accumulation, resuming (in 64-true
and bf16-true, from Lightning's own checkpoints), and taking the average out of a checkpoint."""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMA
from _fixtures import cpu_trainer
from test_ema import Regressor, _averaged
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, TensorDataset

from lightning_speed.callbacks import EMAWeightAveraging

torch.set_num_threads(2)


def _data(batch_size: int = 8) -> DataLoader:
    torch.manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=batch_size)


def _trainer(callbacks, steps: int, tmp_path, **kwargs) -> pl.Trainer:
    return cpu_trainer(max_steps=steps, callbacks=callbacks, default_root_dir=tmp_path, **kwargs)


def _diffusers_decay(step: int, decay: float, inv_gamma: float, power: float, update_after_step: int) -> float:
    """diffusers' ``EMAModel.get_decay(optimization_step)`` with ``use_ema_warmup=True`` and ``min_decay=0``."""
    step = max(0, step - update_after_step - 1)
    if step <= 0:
        return 0.0
    return min(1 - (1 + step / inv_gamma) ** -power, decay)


@pytest.mark.parametrize(("decay", "inv_gamma", "power", "after"), [
    (0.999, 1.0, 0.75, 0), (0.9999, 1.0, 2 / 3, 3), (0.99, 5.0, 1.0, 0), (0.9, 0.5, 0.5, 2), (0.5, 1.0, 1.0, 0)])
def test_warmup_follows_diffusers_ema_model_step_for_step(decay, inv_gamma, power, after):
    """diffusers' EMAModel, stepped after every optimizer step from the initial weights, with update_after_step=s:
    the same average after every step from step s + 1 on as ours with update_starting_at_step=s (its first update
    copies, as diffusers' decay 0 does). fp64, a dozen lerps of values of order 1: 1e-12 is far above the rounding."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    shadow = [p.detach().clone() for p in model.parameters()]
    ours = EMAWeightAveraging(decay=decay, warmup=True, inv_gamma=inv_gamma, power=power,
                              update_starting_at_step=after or None)
    ours._average_model = AveragedModel(model, use_buffers=True)
    for step in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = _diffusers_decay(step + 1, decay, inv_gamma, power, after)
        shadow = [s - (1 - d) * (s - p.detach()) for s, p in zip(shadow, model.parameters())]
        if ours.should_update(step_idx=step):
            ours.update(model)
        if step >= after:
            for a, s in zip(ours._average_model.module.parameters(), shadow, strict=True):
                torch.testing.assert_close(a, s, rtol=0, atol=1e-12)
    assert ours.n_averaged == 12 - after


class _OptimizerSteps(pl.Callback):
    """The weights after each optimizer step (the batch ends at which global_step moved)."""

    def __init__(self) -> None:
        self.seen, self.step = [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.step:
            self.step = trainer.global_step
            self.seen.append([t.detach().clone() for t in pl_module.parameters()])


def test_gradient_accumulation_averages_once_per_optimizer_step(tmp_path):
    """Accumulating 2 micro-batches: 3 optimizer steps are 3 updates, of the weights after each step."""
    ema, record = EMAWeightAveraging(decay=0.5), _OptimizerSteps()
    torch.manual_seed(0)
    _trainer([ema, record], 3, tmp_path, accumulate_grad_batches=2).fit(Regressor(), _data())
    assert ema.n_averaged == len(record.seen) == 3
    expected = record.seen[0]
    for weights in record.seen[1:]:
        expected = [e.lerp(w, 0.5) for e, w in zip(expected, weights)]
    for a, e in zip(_averaged(ema), expected):  # parameters first
        torch.testing.assert_close(a, e)


class _AverageAtStart(pl.Callback):
    def __init__(self, ema) -> None:
        self.ema = ema

    def on_train_start(self, trainer, pl_module):
        self.average = {k: v.clone() for k, v in self.ema._average_model.module.state_dict().items()}


@pytest.mark.parametrize(("precision", "init_module"), [("64-true", False), ("bf16-true", True)])
def test_resume_keeps_a_wide_average_exact(tmp_path, precision, init_module):
    """Under 64-true the average is fp64, under bf16-true fp32, while the copy made at setup has the dtype the module
    has then (fp32 before the precision plugin converts it, or bf16 for a module created in
    ``trainer.init_module()``): loading a checkpoint must not round the average to it. The resumed average is the
    saved one, bit for bit, in its dtype."""

    def fit(steps, callbacks, ckpt_path=None):
        trainer = _trainer(callbacks, steps, tmp_path, precision=precision)
        torch.manual_seed(0)
        with trainer.init_module() if init_module else nullcontext():
            model = Regressor()
        trainer.fit(model, _data(), ckpt_path=ckpt_path)
        return trainer

    fit(3, [EMAWeightAveraging(decay=0.9)]).save_checkpoint(tmp_path / "part.ckpt")
    saved = torch.load(tmp_path / "part.ckpt", weights_only=True)["state_dict"]
    resumed = EMAWeightAveraging(decay=0.9)
    probe = _AverageAtStart(resumed)
    fit(5, [resumed, probe], str(tmp_path / "part.ckpt"))
    assert resumed.n_averaged == 5
    wide = torch.float64 if precision == "64-true" else torch.float32
    assert saved["net.0.weight"].dtype == wide
    assert probe.average.keys() == saved.keys()
    for name, value in saved.items():
        assert probe.average[name].dtype == value.dtype and torch.equal(probe.average[name], value), name


def test_resume_from_lightnings_checkpoint_after_fit_warns_it_holds_the_average(tmp_path):
    """Lightning's callback copies the average into the model at train end, so its checkpoint written after fit has
    the average as training weights too: a fit resumed from it would train on from the average, silently."""
    torch.manual_seed(0)
    trainer = _trainer([LightningEMA(decay=0.9)], 3, tmp_path)
    trainer.fit(Regressor(), _data())
    trainer.save_checkpoint(tmp_path / "lightning.ckpt")
    with pytest.warns(UserWarning, match=r"training weights are its EMA average \(3 updates\).*every_n_train_steps"):
        _trainer([EMAWeightAveraging(decay=0.9)], 4, tmp_path).fit(
            Regressor(), _data(), ckpt_path=str(tmp_path / "lightning.ckpt"))
    ours = _trainer([EMAWeightAveraging(decay=0.9)], 3, tmp_path)  # ours keeps the training weights: no warning
    ours.fit(Regressor(), _data())
    ours.save_checkpoint(tmp_path / "ours.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer([EMAWeightAveraging(decay=0.9)], 4, tmp_path).fit(
            Regressor(), _data(), ckpt_path=str(tmp_path / "ours.ckpt"))
    assert not [w for w in caught if "training weights are its EMA average" in str(w.message)]


def test_resume_from_a_checkpoint_without_ema_starts_a_new_average(tmp_path):
    """A run that adds the EMA on resume: the average starts at the loaded run's next weights (its first update
    copies them), the warm-up from its start, and Lightning says so."""
    torch.manual_seed(0)
    trainer = _trainer([], 3, tmp_path)
    trainer.fit(Regressor(), _data())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    ema, record = EMAWeightAveraging(decay=0.99, warmup=True, power=1.0), _OptimizerSteps()
    record.step = 3
    with pytest.warns(UserWarning, match="not created with WeightAveraging"):
        _trainer([ema, record], 6, tmp_path).fit(Regressor(), _data(), ckpt_path=str(tmp_path / "plain.ckpt"))
    assert ema.n_averaged == len(record.seen) == 3
    means = [torch.stack(step).mean(0) for step in zip(*record.seen)]  # power 1: the running mean
    for a, m in zip(_averaged(ema), means):
        torch.testing.assert_close(a, m)


def test_the_checkpoint_average_for_inference_and_for_use_elsewhere(tmp_path):
    """``load_from_checkpoint`` gives the average; so does the checkpoint's ``state_dict`` with the module's attribute
    prefix removed, loaded into the bare network (as docs/callbacks.md shows). Under bf16-true it is saved in fp32."""
    ema = EMAWeightAveraging(decay=0.5)
    trainer = _trainer([ema], 5, tmp_path, precision="bf16-true")
    torch.manual_seed(0)
    model = Regressor()
    trainer.fit(model, _data())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    average = _averaged(ema)
    loaded = Regressor.load_from_checkpoint(tmp_path / "run.ckpt")
    for a, b in zip([*loaded.parameters(), *loaded.buffers()], average, strict=True):
        assert torch.equal(a, b)
    state = torch.load(tmp_path / "run.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state["net.0.weight"].dtype == torch.float32
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    for a, b in zip([*net.parameters(), *net.buffers()], average, strict=True):
        assert torch.equal(a, b)


def test_a_parameter_added_after_setup_is_refused_with_where_to_create_it(tmp_path):
    class Added(Regressor):
        def on_fit_start(self):
            self.head = nn.Linear(1, 1)

    with pytest.raises(RuntimeError, match=r"has 9 tensors but the module has 11.*__init__ or configure_model"):
        _trainer([EMAWeightAveraging(decay=0.9)], 3, tmp_path).fit(Added(), _data())
