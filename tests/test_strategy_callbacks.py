"""The Lightning callbacks that install time-step strategies, and TimestepMonitor.

Most tests use a tiny LightningModule of their own that follows the integration protocol
(noise_schedule or alphas_cumprod, timestep_sampler, loss_weighting, weighted_loss), so
they exercise exactly what a user's module sees. Its noise is drawn from a generator seeded
by the global step, so a resumed run computes the same losses as an uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from lightning_speed.callbacks.monitor import TimestepMonitor
from lightning_speed.callbacks.strategies import (
    AsymmetricTimestepSampling,
    ChangeAwareWeighting,
    CLTSSampling,
    LogitNormalSampling,
    LossAwareSampling,
    MinSNRWeighting,
    P2Weighting,
    find_schedule,
    schedule_from_alphas_cumprod,
)
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.timesteps import (
    AsymmetricSampler,
    ChangeAwareWeights,
    CLTSSampler,
    ConstantWeighting,
    LogitNormalSampler,
    LossAwareSampler,
    MinSNRWeights,
    P2Weights,
    UniformSampler,
    weighted_loss,
)

TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------ helpers
class TinyDiffusion(pl.LightningModule):
    """A protocol-following module on 4-D vectors; deterministic noise per global step."""

    def __init__(self, num_timesteps: int = 1000, schedule: str = "linear", use_alphas_cumprod: bool = False,
                 prediction: str | None = None) -> None:
        super().__init__()
        self.net = nn.Linear(5, 4)
        schedule_obj = NoiseSchedule.from_name(schedule, num_timesteps)
        if use_alphas_cumprod:
            self.register_buffer("alphas_cumprod", schedule_obj.alpha_bar.float())
        else:
            self.noise_schedule = schedule_obj
        self.register_buffer("_ab", schedule_obj.alpha_bar.float(), persistent=False)
        if prediction is not None:
            self.prediction = prediction
        self.timestep_sampler = UniformSampler(num_timesteps)
        self.loss_weighting = ConstantWeighting()

    def on_fit_start(self) -> None:
        self.timestep_sampler.to(self.device)
        self.loss_weighting.to(self.device)

    def training_step(self, batch, batch_idx):
        x0 = batch[0]
        t = self.timestep_sampler.sample(x0.shape[0])
        gen = torch.Generator(device=x0.device).manual_seed(1000 + self.global_step)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        ab = self._ab[t].unsqueeze(1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = self.net(torch.cat([x_t, t.unsqueeze(1).float() / len(self._ab)], dim=1))
        per_sample = (pred - noise).pow(2).mean(dim=1)
        loss, w = weighted_loss(self.timestep_sampler, self.loss_weighting, t, per_sample)
        return {"loss": loss, "t": t, "per_sample_loss": per_sample.detach(), "weight": w.detach()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Recorder(pl.Callback):
    """Keeps each step's time steps, losses and weights."""

    def __init__(self) -> None:
        self.t: list[torch.Tensor] = []
        self.loss: list[torch.Tensor] = []
        self.weight: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.t.append(outputs["t"].cpu().clone())
        self.loss.append(outputs["per_sample_loss"].cpu().clone())
        self.weight.append(outputs["weight"].cpu().clone())


def loader(n: int = 32, batch_size: int = 32) -> torch.utils.data.DataLoader:
    data = torch.linspace(-1, 1, n * 4).reshape(n, 4)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=batch_size)


def trainer(max_steps: int, callbacks: list, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)
    options.update(kwargs)
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, **options)


def fit(module: pl.LightningModule, callbacks: list, steps: int = 2, **kwargs) -> Recorder:
    recorder = Recorder()
    trainer(steps, [*callbacks, recorder], **kwargs).fit(module, loader())
    return recorder


# ------------------------------------------------------------------------------ install
def test_speed_callbacks_install_and_weight_the_loss():
    module = TinyDiffusion()
    sampling = AsymmetricTimestepSampling(tau="auto", k=5, seed=0)
    weighting = ChangeAwareWeighting(lam=0.6, tau="auto")
    rec = fit(module, [sampling, weighting], steps=3)
    assert module.timestep_sampler is sampling.strategy and isinstance(module.timestep_sampler, AsymmetricSampler)
    assert module.timestep_sampler.tau == 642 and module.timestep_sampler.pivot == 642
    assert module.timestep_sampler.seed == 0
    table = ChangeAwareWeights(module.noise_schedule, 0.6, 642).table
    for t, w in zip(rec.t, rec.weight):
        torch.testing.assert_close(w, table[t])
        half = t.numel() // 2 + 1  # dual pairs around the pivot
        torch.testing.assert_close(t[half:], torch.where(t[:half] < 642, 642 - t[:half], t[:half] - 642)[: t.numel() - half])
    assert len(rec.t) == 3


@pytest.mark.parametrize(
    ("sampling", "weighting", "sampler_type"),
    [
        (lambda: LogitNormalSampling(seed=1), lambda: P2Weighting(), "LogitNormalSampler"),
        (lambda: CLTSSampling(total_steps=10, seed=1), lambda: MinSNRWeighting(), "CLTSSampler"),
        (lambda: LossAwareSampling(seed=1), lambda: ChangeAwareWeighting(), "LossAwareSampler"),
        (lambda: AsymmetricTimestepSampling(dual=False, seed=1), lambda: MinSNRWeighting(gamma=2), "AsymmetricSampler"),
    ],
)
def test_a_sampler_combines_with_a_weighting(sampling, weighting, sampler_type):
    module = TinyDiffusion()
    w_cb = weighting()
    rec = fit(module, [sampling(), w_cb], steps=2)
    assert type(module.timestep_sampler).__name__ == sampler_type
    assert module.loss_weighting is w_cb.strategy
    for t, w in zip(rec.t, rec.weight):  # loss-aware is uniform (importance 1) this early
        torch.testing.assert_close(w, module.loss_weighting.weight(t))


def test_alphas_cumprod_is_wrapped_in_a_schedule():
    module = TinyDiffusion(use_alphas_cumprod=True)
    schedule = find_schedule(module)
    np.testing.assert_allclose(schedule.alpha_bar.numpy(), module.alphas_cumprod.double().numpy(), rtol=1e-6)
    fit(module, [AsymmetricTimestepSampling(tau="auto")], steps=1)
    assert module.timestep_sampler.tau == 642  # float32 alphas_cumprod gives the same pivot
    with pytest.raises(ValueError, match="strictly decreasing"):
        schedule_from_alphas_cumprod(torch.tensor([0.9, 0.95, 0.5]))


def test_clts_follows_the_global_step():
    module = TinyDiffusion()
    cb = CLTSSampling(total_steps=4, seed=0)
    fit(module, [cb], steps=3)
    assert cb.strategy.step == 2  # set at the start of the third step from trainer.global_step
    assert cb.strategy.progress == pytest.approx(0.5)


def test_min_snr_reads_the_module_prediction():
    module = TinyDiffusion(prediction="v")
    rec = fit(module, [MinSNRWeighting()], steps=1)
    snr = module.noise_schedule.snr
    expected = (snr.clamp(max=5) / (snr + 1)).float()
    torch.testing.assert_close(rec.weight[0], expected[rec.t[0]])
    with pytest.raises(ValueError, match="trains with prediction='v'"):
        fit(TinyDiffusion(prediction="v"), [MinSNRWeighting(prediction="epsilon")], steps=1)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: AsymmetricTimestepSampling(tau=0), "at least 1"),
        (lambda: AsymmetricTimestepSampling(tau="never"), "'auto'"),
        (lambda: AsymmetricTimestepSampling(k=0), "positive"),
        (lambda: AsymmetricTimestepSampling(k=-2.0), "positive"),
        (lambda: AsymmetricTimestepSampling(seed="x"), "seed"),
        (lambda: ChangeAwareWeighting(lam=0.3), r"\[0.5, 1\]"),
        (lambda: ChangeAwareWeighting(lam=1.5), r"\[0.5, 1\]"),
        (lambda: ChangeAwareWeighting(tau="late"), "'auto'"),
        (lambda: P2Weighting(k=-1), "non-negative"),
        (lambda: MinSNRWeighting(prediction="noise"), "Unknown prediction"),
        (lambda: MinSNRWeighting(gamma=0), "positive"),
        (lambda: LogitNormalSampling(std=0), "positive"),
        (lambda: CLTSSampling(total_steps=0), "positive integer"),
        (lambda: LossAwareSampling(history=0), "positive integer"),
        (lambda: TimestepMonitor(log_every_n_steps=0), "positive integer"),
        (lambda: TimestepMonitor(tau="x"), "'auto'"),
    ],
)
def test_bad_arguments_fail_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("module", "callbacks", "match"),
    [
        (lambda: TinyDiffusion(num_timesteps=100), lambda: [AsymmetricTimestepSampling(tau=700)], "smaller than"),
        (lambda: TinyDiffusion(num_timesteps=100), lambda: [ChangeAwareWeighting(tau=100)], "smaller than"),
        (lambda: TinyDiffusion(), lambda: [AsymmetricTimestepSampling(), LossAwareSampling()], "Only one time-step sampling"),
        (lambda: TinyDiffusion(), lambda: [P2Weighting(), ChangeAwareWeighting()], "Only one loss weighting"),
    ],
)
def test_bad_setups_fail_before_any_step(module, callbacks, match):
    rec = Recorder()
    with pytest.raises(ValueError, match=match):
        trainer(2, [*callbacks(), rec]).fit(module(), loader())
    assert rec.t == []


def test_module_without_schedule_gets_a_clear_error():
    module = TinyDiffusion()
    del module.noise_schedule
    rec = Recorder()
    with pytest.raises(ValueError, match="noise_schedule.*alphas_cumprod"):
        trainer(2, [AsymmetricTimestepSampling(), rec]).fit(module, loader())
    assert rec.t == []


def test_module_without_the_protocol_attribute_gets_a_clear_error():
    module = TinyDiffusion()
    del module.loss_weighting
    with pytest.raises(ValueError, match="has no such attribute.*weighted_loss"):
        trainer(2, [ChangeAwareWeighting()]).fit(module, loader())


# ------------------------------------------------------------------------------ checkpointing
RESUMABLE = {
    "asymmetric": lambda: AsymmetricTimestepSampling(tau=12, k=5),
    "loss_aware": lambda: LossAwareSampling(history=2),
    "clts": lambda: CLTSSampling(total_steps=6),
    "logit_normal": lambda: LogitNormalSampling(),
}


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=cuda)])
@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_resume_continues_the_same_time_steps(name, accelerator, tmp_path):
    total, stop = 10, 5
    make = RESUMABLE[name]

    pl.seed_everything(0)
    full_module = TinyDiffusion(num_timesteps=20, schedule="cosine")
    full = fit(full_module, [make()], steps=total, accelerator=accelerator)

    pl.seed_everything(0)
    first = Recorder()
    first_trainer = trainer(stop, [make(), first], accelerator=accelerator)
    first_trainer.fit(TinyDiffusion(num_timesteps=20, schedule="cosine"), loader())
    ckpt = tmp_path / "stop.ckpt"
    first_trainer.save_checkpoint(ckpt)

    pl.seed_everything(123)  # a different global seed: the sampler state must come from the checkpoint
    resumed_module = TinyDiffusion(num_timesteps=20, schedule="cosine")
    second = Recorder()
    trainer(total, [make(), second], accelerator=accelerator).fit(resumed_module, loader(), ckpt_path=ckpt)

    assert len(second.t) == total - stop
    for step, (a, b) in enumerate(zip(full.t[:stop], first.t)):
        assert torch.equal(a, b), f"step {step} differs before the interruption"
    for step, (a, b) in enumerate(zip(full.t[stop:], second.t), start=stop):
        assert torch.equal(a, b), f"step {step} differs after resuming"
    if name == "loss_aware":
        assert bool(full_module.timestep_sampler.warm)  # the history mattered for these draws
        torch.testing.assert_close(resumed_module.timestep_sampler.history, full_module.timestep_sampler.history)


def test_state_dict_round_trip_before_setup():
    module = TinyDiffusion(num_timesteps=20, schedule="cosine")
    cb = LossAwareSampling(history=2, seed=4)
    fit(module, [cb], steps=3)
    state = cb.state_dict()
    assert set(state["strategy"]) >= {"seed", "rng", "history", "counts"}
    assert state["strategy"]["rng"]["device_type"] == "cpu"
    expected = module.timestep_sampler.sample(16)

    fresh = LossAwareSampling(history=2)
    fresh.load_state_dict(state)  # before setup: kept until the sampler exists
    assert fresh.state_dict() == {"strategy": state["strategy"]}
    other = TinyDiffusion(num_timesteps=20, schedule="cosine")
    fresh.setup(_FakeTrainer(), other, "fit")
    assert torch.equal(other.timestep_sampler.sample(16), expected)


class _FakeTrainer:
    """Just what the callbacks' setup reads."""

    callbacks: list = []
    global_rank = 0


# ------------------------------------------------------------------------------ the external example
def test_external_module_example_runs():
    spec = importlib.util.spec_from_file_location("external_module_example", TESTS / "external_module_example.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules["external_module_example"] = example
    spec.loader.exec_module(example)
    pl.seed_everything(0)
    model = example.main(max_steps=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    assert isinstance(model.timestep_sampler, AsymmetricSampler) and model.timestep_sampler.tau == 700
    assert isinstance(model.loss_weighting, ChangeAwareWeights)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------ YAML
def test_callbacks_are_configurable_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[pl.Callback])
    prefix = "lightning_speed.callbacks.strategies"
    config = f"""
callbacks:
  - class_path: {prefix}.AsymmetricTimestepSampling
    init_args: {{tau: auto, k: 5, dual: true, seed: 3}}
  - class_path: {prefix}.ChangeAwareWeighting
    init_args: {{lam: 0.6, tau: 700}}
  - class_path: {prefix}.CLTSSampling
    init_args: {{mu: 300, sigma: 200, total_steps: 50000}}
  - class_path: {prefix}.LossAwareSampling
  - class_path: {prefix}.LogitNormalSampling
    init_args: {{mean: 0.0, std: 1.0}}
  - class_path: {prefix}.P2Weighting
    init_args: {{k: 1, gamma: 1}}
  - class_path: {prefix}.MinSNRWeighting
    init_args: {{gamma: 5, prediction: v}}
  - class_path: lightning_speed.callbacks.monitor.TimestepMonitor
    init_args: {{log_every_n_steps: 50, tau: auto}}
"""
    callbacks = parser.instantiate_classes(parser.parse_string(config)).callbacks
    assert [type(c).__name__ for c in callbacks] == [
        "AsymmetricTimestepSampling", "ChangeAwareWeighting", "CLTSSampling", "LossAwareSampling",
        "LogitNormalSampling", "P2Weighting", "MinSNRWeighting", "TimestepMonitor",
    ]
    assert callbacks[0].tau == "auto" and callbacks[0].seed == 3 and callbacks[1].tau == 700
    assert callbacks[6].prediction == "v"
    bad = config.replace("k: 5,", "k: five,")
    with pytest.raises(Exception, match="k"):
        parser.parse_string(bad)


# ------------------------------------------------------------------------------ monitor
def test_monitor_logs_per_area_means_at_the_interval(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = TinyDiffusion()
    monitor = TimestepMonitor(log_every_n_steps=2, tau=700)
    logger = TensorBoardLogger(tmp_path, name="tb")
    rec = fit(module, [AsymmetricTimestepSampling(seed=0), ChangeAwareWeighting(), monitor], steps=6, logger=logger)
    assert [h["step"] for h in monitor.history] == [2.0, 4.0, 6.0]
    for index, summary in enumerate(monitor.history):
        t = torch.cat(rec.t[2 * index : 2 * index + 2])
        loss = torch.cat(rec.loss[2 * index : 2 * index + 2])
        weight = torch.cat(rec.weight[2 * index : 2 * index + 2])
        for name, lo, hi in (("acceleration", 0, 219), ("deceleration", 219, 700), ("convergence", 700, 1000)):
            inside = (t >= lo) & (t < hi)
            assert summary[f"timesteps/share/{name}"] == pytest.approx(inside.float().mean().item(), abs=1e-6)
            if inside.any():
                assert summary[f"timesteps/loss/{name}"] == pytest.approx(loss[inside].mean().item(), rel=1e-5)
                assert summary[f"timesteps/weight/{name}"] == pytest.approx(weight[inside].mean().item(), rel=1e-5)
        assert summary["timesteps/p/convergence"] == pytest.approx(300 / 3800, rel=1e-5)
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    assert "timesteps/t" in events.Tags()["histograms"]
    assert "timesteps/loss/acceleration" in events.Tags()["scalars"]
    histogram = events.Histograms("timesteps/t")
    assert [h.step for h in histogram] == [2, 4, 6]
    assert histogram[0].histogram_value.num == sum(x.numel() for x in rec.t[:2])


class _LossOnly(TinyDiffusion):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx)["loss"]


def test_monitor_explains_what_it_needs():
    with pytest.raises(ValueError, match="TimestepMonitor reads `t` and `per_sample_loss`"):
        trainer(1, [TimestepMonitor(log_every_n_steps=1)]).fit(_LossOnly(), loader())


# ------------------------------------------------------------------------------ DiffusionModule
class _ConvBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t, y=None):
        return self.conv(x) + t.float().view(-1, 1, 1, 1) / 1000


def test_with_diffusion_module():
    module_lib = pytest.importorskip("lightning_speed.module")
    module = module_lib.DiffusionModule(_ConvBackbone(), schedule="linear", num_timesteps=1000, prediction="v",
                                        image_shape=(1, 8, 8))
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(16, dtype=torch.long)), batch_size=8)
    rec = Recorder()
    monitor = TimestepMonitor(log_every_n_steps=1)
    trainer(3, [AsymmetricTimestepSampling(seed=0), MinSNRWeighting(), monitor, rec],
            limit_val_batches=0).fit(module, data)
    snr = module.noise_schedule.snr
    table = (snr.clamp(max=5) / (snr + 1)).float()  # picked from module.prediction == "v"
    for t, w in zip(rec.t, rec.weight):
        torch.testing.assert_close(w, table[t])
    assert len(monitor.history) == 3


# ------------------------------------------------------------------------------ CUDA (skipped on CPU)


@cuda
def test_strategies_live_on_the_gpu_and_never_sync():
    module = TinyDiffusion(num_timesteps=20, schedule="cosine")
    cbs = [LossAwareSampling(history=2, seed=0), ChangeAwareWeighting(tau="auto")]
    rec = fit(module, [*cbs, TimestepMonitor(log_every_n_steps=5, tau="auto")], steps=12, accelerator="gpu", devices=1)
    assert module.timestep_sampler.history.is_cuda and module.timestep_sampler.generator.device.type == "cuda"
    assert bool(module.timestep_sampler.warm)
    assert len(rec.t) == 12
    schedule = NoiseSchedule.from_name("linear", 1000)
    samplers = [AsymmetricSampler(schedule, 700, 5, True), LossAwareSampler(1000, history=1), CLTSSampler(1000),
                LogitNormalSampler(1000), UniformSampler(1000)]
    weightings = [ChangeAwareWeights(schedule, 0.6, 700), P2Weights(schedule), MinSNRWeights(schedule), ConstantWeighting()]
    for s in samplers:
        s.to("cuda")
        s.manual_seed(0)
        s.sample(4)  # build the generator outside the checked region
    for w in weightings:
        w.to("cuda")
    gpu_module = TinyDiffusion().cuda()
    monitor = TimestepMonitor(log_every_n_steps=100)
    monitor.setup(_FakeTrainer(), gpu_module, "fit")
    monitor.on_fit_start(None, gpu_module)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            for s in samplers:
                if isinstance(s, CLTSSampler):
                    s.set_step(step * 1000)
                for w in weightings:
                    t = s.sample(256)
                    per_sample = torch.rand(256, device="cuda", requires_grad=True)
                    loss, weights = weighted_loss(s, w, t, per_sample)
                    monitor._accumulate(t, per_sample.detach(), weights)
                    assert loss.is_cuda and weights.is_cuda and t.is_cuda
    finally:
        torch.cuda.set_sync_debug_mode(0)
