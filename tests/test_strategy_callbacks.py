"""TimestepCallback, which installs time-step strategies, its one-line form SpeeD, and TimestepMonitor.

Most tests use a tiny LightningModule of their own that adopts the strategies with the three
lines of the protocol (``self.timesteps = TimestepStrategy(...)``, ``self.timesteps.sample``,
``self.timesteps.loss``), so they exercise exactly what a user's module sees. Its noise is drawn from a generator seeded
by the global step, so a resumed run computes the same losses as an uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from lightning_speed import callbacks
from lightning_speed.callbacks import TimestepCallback
from lightning_speed.callbacks.monitor import TimestepMonitor
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.timesteps import (
    CLTSSampling,
    ConstantWeighting,
    CurriculumSampling,
    LogitNormalSampling,
    LossAwareSampling,
    MinSNRWeighting,
    P2Weighting,
    SpeeD,
    TimestepStrategy,
    UniformSampling,
)

from _fixtures import cpu_trainer  # pytest puts tests/ on sys.path

TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------ helpers
class TinyDiffusion(pl.LightningModule):
    """A protocol-following module on 4-D vectors; deterministic noise per global step."""

    def __init__(self, num_timesteps: int = 1000, schedule: str = "linear", use_alphas_cumprod: bool = False,
                 prediction: str = "epsilon") -> None:
        super().__init__()
        self.net = nn.Linear(5, 4)
        schedule_obj = NoiseSchedule.from_name(schedule, num_timesteps)
        self.register_buffer("_ab", schedule_obj.alpha_bar.float(), persistent=False)
        self.timesteps = TimestepStrategy(self._ab if use_alphas_cumprod else schedule_obj, prediction)

    def training_step(self, batch, batch_idx):
        x0 = batch[0]
        t = self.timesteps.sample(x0.shape[0], x0.device)
        gen = torch.Generator(device=x0.device).manual_seed(1000 + self.global_step)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        ab = self._ab[t].unsqueeze(1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = self.net(torch.cat([x_t, t.unsqueeze(1).float() / len(self._ab)], dim=1))
        per_sample = (pred - noise).pow(2).mean(dim=1)
        return self.timesteps.loss(t, per_sample)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Recorder(pl.Callback):
    """Keeps each step's time steps, losses and weights (``pl_module.timesteps.last``)."""

    def __init__(self) -> None:
        self.t: list[torch.Tensor] = []
        self.loss: list[torch.Tensor] = []
        self.weight: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        last = pl_module.timesteps.last
        self.t.append(last.t.cpu().clone())
        self.loss.append(last.loss.cpu().clone())
        self.weight.append(last.weight.cpu().clone())


def loader(n: int = 32, batch_size: int = 32) -> torch.utils.data.DataLoader:
    data = torch.linspace(-1, 1, n * 4).reshape(n, 4)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=batch_size)


def trainer(max_steps: int, callbacks: list, **kwargs) -> pl.Trainer:
    return cpu_trainer(max_steps=max_steps, callbacks=callbacks, **kwargs)


def fit(module: pl.LightningModule, callbacks: list, steps: int = 2, **kwargs) -> Recorder:
    recorder = Recorder()
    trainer(steps, [*callbacks, recorder], **kwargs).fit(module, loader())
    return recorder


def install(*strategies, seed: int | None = None) -> TimestepCallback:
    return TimestepCallback(list(strategies), seed=seed)


def asymmetric(tau=700, k=5.0, dual=True) -> SpeeD:
    """SpeeD's sampling alone."""
    return SpeeD(tau, k, dual, lam=None)


def change_aware(lam=0.6, tau=700) -> SpeeD:
    """SpeeD's weighting alone (uniform t)."""
    return SpeeD(tau, k=1.0, dual=False, lam=lam)


# ------------------------------------------------------------------------------ install
def test_speed_installs_and_weights_the_loss():
    module = TinyDiffusion()
    speed = SpeeD(tau="auto", k=5, lam=0.6)
    callback = TimestepCallback(speed, seed=0)
    rec = fit(module, [callback], steps=3)
    assert module.timesteps.sampler is module.timesteps.weights is speed
    assert module.timesteps.tau == speed.resolved_tau == 642 and speed.pivot == 642 and speed.tau == "auto"
    assert speed.seed == 0 and callback.sampling is callback.weighting is speed
    table = change_aware(lam=0.6, tau=642).bind(module.timesteps.schedule).table
    for t, w in zip(rec.t, rec.weight):
        torch.testing.assert_close(w, table[t])
        half = t.numel() // 2 + 1  # dual pairs around the pivot
        torch.testing.assert_close(t[half:], torch.where(t[:half] < 642, 642 - t[:half], t[:half] - 642)[: t.numel() - half])
    assert len(rec.t) == 3


@pytest.mark.parametrize(
    ("sampling", "weighting"),
    [
        (lambda: LogitNormalSampling(), lambda: P2Weighting()),
        (lambda: CLTSSampling(total_steps=10), lambda: MinSNRWeighting()),
        (lambda: LossAwareSampling(), lambda: change_aware()),
        (lambda: asymmetric(dual=False), lambda: MinSNRWeighting(gamma=2)),
    ],
)
def test_a_sampling_strategy_combines_with_a_weighting(sampling, weighting):
    module = TinyDiffusion()
    sampling, weighting = sampling(), weighting()
    rec = fit(module, [install(weighting, sampling, seed=1)], steps=2)  # in any order
    assert module.timesteps.sampler is sampling and module.timesteps.weights is weighting
    for t, w in zip(rec.t, rec.weight):  # loss-aware is uniform (importance 1) this early
        torch.testing.assert_close(w, module.timesteps.weights.weight(t))


def test_alphas_cumprod_is_wrapped_in_a_schedule():
    module = TinyDiffusion(use_alphas_cumprod=True)
    schedule = module.timesteps.schedule
    np.testing.assert_allclose(schedule.alpha_bar.numpy(), module._ab.double().numpy(), rtol=1e-6)
    fit(module, [install(asymmetric(tau="auto"))], steps=1)
    assert module.timesteps.sampler.resolved_tau == 642 == module.timesteps.tau  # float32 alphas_cumprod: the same pivot


def test_clts_follows_the_global_step():
    module = TinyDiffusion()
    clts = CLTSSampling(total_steps=4)
    fit(module, [install(clts, seed=0)], steps=3)
    assert clts.step == 2  # set at the start of the third step from trainer.global_step
    assert clts.progress == pytest.approx(0.5)


def test_clts_without_total_steps_anneals_over_the_trainers_max_steps():
    clts = CLTSSampling()
    fit(TinyDiffusion(), [install(clts, seed=0)], steps=4)
    assert clts.anneal_steps == 4 and clts.progress == pytest.approx(0.75)  # the fourth step of four
    rec = Recorder()
    with pytest.raises(ValueError, match=r"CLTSSampling anneals over trainer.max_steps .* set trainer.max_steps"):
        cpu_trainer(max_steps=-1, max_epochs=1, callbacks=[install(CLTSSampling()), rec]).fit(TinyDiffusion(), loader())
    assert rec.t == []


def test_a_curriculum_warns_about_the_run_length_on_rank_0_only():
    """Every rank follows the same run, so a CLTS that outlasts max_steps (or a resume with another length) warns once,
    on rank 0; another rank stays quiet yet moves the curriculum the same way, and errors still reach every rank."""
    for rank in (0, 1):
        fake, callback = _FakeTrainer(), install(CLTSSampling(total_steps=50))
        fake.global_rank = rank
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            callback.setup(fake, TinyDiffusion(), "fit")
            fake.global_step = 5
            callback.on_train_batch_start(fake, None, None, 0)
        said = [w for w in caught if "anneals past trainer.max_steps=10" in str(w.message)]
        assert len(said) == (1 if rank == 0 else 0) and callback.sampling.progress == 5 / 50
    fake = _FakeTrainer()
    fake.global_rank, fake.max_steps = 1, -1
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        install(CLTSSampling()).setup(fake, TinyDiffusion(), "fit")


def test_min_snr_reads_the_strategy_prediction():
    module = TinyDiffusion(prediction="v")
    rec = fit(module, [install(MinSNRWeighting())], steps=1)
    snr = module.timesteps.schedule.snr
    expected = (snr.clamp(max=5) / (snr + 1)).float()
    torch.testing.assert_close(rec.weight[0], expected[rec.t[0]])


@pytest.mark.parametrize("weighting", [MinSNRWeighting, P2Weighting])
def test_weights_of_the_prediction_refuse_predictions_that_disagree(weighting):
    rec = Recorder()
    module = _with_attribute(TinyDiffusion(), "prediction", "v")
    with pytest.raises(ValueError, match=rf"{weighting.__name__}: its weights depend on what the network predicts.*"
                                         r"pl_module.timesteps.prediction = 'epsilon', TinyDiffusion.prediction = 'v'.*"
                                         r"TimestepStrategy\(schedule, prediction=...\)"):
        trainer(1, [install(weighting()), rec]).fit(module, loader())
    assert rec.t == []
    fit(_with_attribute(TinyDiffusion(), "prediction", "v"), [install(change_aware())], steps=1)  # not depending on it


def _with_attribute(obj, name, value):
    setattr(obj, name, value)
    return obj


def test_the_one_line_speed_is_the_callback_of_the_speed_strategy_and_draws_like_its_halves():
    pl.seed_everything(0)
    together = TinyDiffusion()
    speed_cb = callbacks.SpeeD(tau="auto", k=5, lam=0.6)
    assert type(speed_cb) is TimestepCallback and repr(speed_cb.strategies) == "[SpeeD(tau='auto', k=5.0, dual=True, lam=0.6)]"
    rec_together = fit(together, [speed_cb], steps=3)
    pl.seed_everything(0)
    apart = TinyDiffusion()
    rec_apart = fit(apart, [install(asymmetric(tau="auto"), change_aware(lam=0.6, tau="auto"))], steps=3)
    assert together.timesteps.tau == apart.timesteps.tau == 642
    assert together.timesteps.sampler is together.timesteps.weights is speed_cb.sampling
    for a, b in zip(rec_together.t + rec_together.weight, rec_apart.t + rec_apart.weight):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: callbacks.SpeeD(dual="false"), TypeError, r"dual must be true or false \(a boolean\), got 'false'"),
        (lambda: callbacks.SpeeD(lam=0.4), ValueError, r"lam must be a number in \[0.5, 1\], got 0.4"),
        (lambda: callbacks.SpeeD(tau=700.5), TypeError, r"tau must be 'auto', a time step .* got 700.5"),
        (lambda: callbacks.SpeeD(seed="x"), TypeError, "seed must be an integer, got 'x'"),
        (lambda: install(LogitNormalSampling(), seed=True), TypeError, r"seed must be an integer, got True \(bool\)"),
        (lambda: install(asymmetric(), LossAwareSampling()), ValueError,
         "Only one sampling strategy can be active, but 2 are given: SpeeD, LossAwareSampling"),
        (lambda: install(P2Weighting(), change_aware()), ValueError, "Only one weighting strategy can be active"),
        (lambda: install(SpeeD(), P2Weighting()), ValueError, "Only one weighting strategy.*SpeeD, P2Weighting"),
        (lambda: TimestepCallback(P2Weighting), TypeError, "come from lightning_speed.timesteps.*got the class P2Weighting"),
        (lambda: TimestepMonitor(log_every_n_steps=0), ValueError, "log_every_n_steps must be an integer of at least 1"),
        (lambda: TimestepMonitor(tau="x"), ValueError, "'auto'"),
        (lambda: TimestepMonitor(tau=700.0), TypeError, r"a time step \(a positive integer, on a DDPM schedule\)"),
        (lambda: TimestepMonitor(histogram="no"), TypeError, "histogram must be true or false"),
    ],
)
def test_bad_arguments_fail_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    ("module", "make_callbacks", "match"),
    [
        (lambda: TinyDiffusion(num_timesteps=100), lambda: [install(asymmetric(tau=700))], "smaller than"),
        (lambda: TinyDiffusion(num_timesteps=100), lambda: [install(change_aware(tau=100))], "smaller than"),
        (lambda: TinyDiffusion(), lambda: [install(asymmetric()), install(LossAwareSampling())],
         r"trainer.callbacks has 2 TimestepCallbacks \(SpeeD, LossAwareSampling\).*TimestepCallback\(\[sampling, weighting\]\)"),
        (lambda: TinyDiffusion(), lambda: [install(asymmetric(tau="auto"), change_aware(tau=700))],
         r"disagree on tau \(SpeeD samples with tau=642, SpeeD weights with tau=700\).*SpeeD\(tau=...\)"),
        (lambda: TinyDiffusion(), lambda: [callbacks.SpeeD(tau=700), TimestepMonitor(tau="auto")],
         r"TimestepMonitor\(tau='auto'\) splits the areas at 642, but the installed time-step strategy uses tau=700"),
        (lambda: _with_attribute(TinyDiffusion(), "num_timesteps", 100), lambda: [callbacks.SpeeD()],
         r"SpeeD draws t from TinyDiffusion.timesteps, built for T = 1000 time steps, but TinyDiffusion.num_timesteps is "
         r"100.*TimestepStrategy\(self.alphas_cumprod\)"),
        (lambda: _with_attribute(TinyDiffusion(), "alphas_cumprod", torch.ones(100)), lambda: [install(P2Weighting())],
         r"but len\(TinyDiffusion.alphas_cumprod\) is 100: the training step would use t up to 999"),
        (lambda: _with_attribute(TinyDiffusion(), "noise_scheduler", _Scheduler("cosine")),
         lambda: [callbacks.SpeeD(tau="auto")],
         r"SpeeD draws t from TinyDiffusion.timesteps, whose linear schedule is not the one in "
         r"TinyDiffusion.noise_scheduler.alphas_cumprod: alpha_bar at t = \d+ is .*"
         r"TimestepStrategy\(self.noise_scheduler\)"),
        (lambda: _with_attribute(TinyDiffusion(), "alphas_cumprod", _Scheduler("cosine").alphas_cumprod),
         lambda: [install(P2Weighting())], r"not the one in TinyDiffusion.alphas_cumprod.*TimestepStrategy\(self.alphas_cumprod\)"),
        (lambda: _RebuildsInSetup(), lambda: [callbacks.SpeeD()],
         r"_RebuildsInSetup.timesteps was replaced after SpeeD was installed into it.*Create self.timesteps once, in __init__"),
    ],
)
def test_bad_setups_fail_before_any_step(module, make_callbacks, match):
    rec = Recorder()
    with pytest.raises(ValueError, match=match):
        trainer(2, [*make_callbacks(), rec]).fit(module(), loader())
    assert rec.t == []


class _Scheduler:
    """What a diffusers scheduler offers the checks: a float32 ``alphas_cumprod``."""

    def __init__(self, name: str, num_timesteps: int = 1000) -> None:
        self.alphas_cumprod = NoiseSchedule.from_name(name, num_timesteps).alpha_bar.float()


def test_the_same_schedule_held_by_the_module_passes_the_check():
    """The schedule check compares values with a tolerance: diffusers' own float32 linear schedule, and a bf16 copy
    of the module's alpha_bar, are the strategy's linear schedule (both differ from it by more than float64 noise)."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    module = _with_attribute(TinyDiffusion(), "noise_scheduler", scheduler)
    bf16 = NoiseSchedule.from_name("linear", 1000).alpha_bar.to(torch.bfloat16)
    module = _with_attribute(module, "alphas_cumprod", bf16)
    linear = NoiseSchedule.from_name("linear", 1000).alpha_bar
    assert 0 < float((scheduler.alphas_cumprod.double() - linear).abs().max()) < 1e-5
    assert 1e-3 < float((bf16.double() - linear).abs().max())  # beyond the float tolerance: bf16's own resolution
    assert len(fit(module, [callbacks.SpeeD(seed=0)], steps=1).t) == 1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_prediction_of_a_held_scheduler_must_be_the_strategys(prediction_type):
    """A module that keeps a v-prediction diffusers scheduler but builds its strategy from alphas_cumprod (epsilon
    by default) would get epsilon's Min-SNR weights; diffusers' names for a prediction are ours (v_prediction is v)."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(beta_schedule="linear", prediction_type=prediction_type)  # T = 1000
    ours = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}[prediction_type]
    for stated in ("epsilon", "v", "x0"):
        module = _with_attribute(TinyDiffusion(prediction=stated), "noise_scheduler", scheduler)
        if stated == ours:
            assert len(fit(module, [install(MinSNRWeighting())], steps=1).t) == 1
            continue
        rec = Recorder()
        with pytest.raises(ValueError, match=(
            rf"MinSNRWeighting: TinyDiffusion.timesteps has prediction '{stated}', but TinyDiffusion.noise_scheduler."
            rf"config.prediction_type is '{prediction_type}'.*TimestepStrategy\(self.noise_scheduler\).*"
            rf"TimestepStrategy\(..., prediction='{ours}'\)"
        )):  # fmt: skip
            trainer(2, [install(MinSNRWeighting()), rec]).fit(module, loader())
        assert rec.t == []


class _RebuildsInSetup(TinyDiffusion):
    """Builds a new strategy in its own setup(), which runs after the callbacks' setup."""

    def setup(self, stage):
        self.timesteps = TimestepStrategy(self.timesteps.schedule)


class _PlainModule(pl.LightningModule):
    """A module that has not adopted the protocol (optionally with something else as ``timesteps``)."""

    def __init__(self, timesteps: object = None) -> None:
        super().__init__()
        self.net = nn.Linear(4, 4)
        if timesteps is not None:
            self.timesteps = timesteps

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("module", "callback", "match"),
    [
        (lambda: _PlainModule(), lambda: callbacks.SpeeD(),
         r"SpeeD works on _PlainModule.timesteps .*, but _PlainModule has no `timesteps`"),
        (lambda: _PlainModule(timesteps=SpeeD()), lambda: install(asymmetric()),
         r"SpeeD needs _PlainModule.timesteps to be a lightning_speed.timesteps.TimestepStrategy, got SpeeD"),
        (lambda: _PlainModule(), lambda: TimestepMonitor(), r"TimestepMonitor works on _PlainModule.timesteps"),
    ],
)
def test_module_without_the_protocol_gets_the_three_lines(module, callback, match):
    with pytest.raises(TypeError, match=match) as info:
        trainer(2, [callback()]).fit(module(), loader())
    message = str(info.value)
    for line in ("self.timesteps = TimestepStrategy(schedule)", "t = self.timesteps.sample(len(x), x.device)",
                 "loss = self.timesteps.loss(t, per_sample_loss)"):
        assert line in message


# ------------------------------------------------------------------------------ checkpointing
RESUMABLE = {
    "asymmetric": lambda: install(asymmetric(tau=12, k=5)),
    "speed": lambda: callbacks.SpeeD(tau=12),
    "loss_aware": lambda: install(LossAwareSampling(history=2), P2Weighting()),
    "clts": lambda: install(CLTSSampling(total_steps=6)),
    "logit_normal": lambda: install(LogitNormalSampling()),
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
        assert bool(full_module.timesteps.sampler.warm)  # the history mattered for these draws
        torch.testing.assert_close(resumed_module.timesteps.sampler.loss_history, full_module.timesteps.sampler.loss_history)


def test_state_dict_round_trip_before_setup():
    module = TinyDiffusion(num_timesteps=20, schedule="cosine")
    cb = install(LossAwareSampling(history=2), seed=4)
    fit(module, [cb], steps=3)
    state = cb.state_dict()
    assert set(state["sampling"]) >= {"seed", "rng", "history", "counts"}
    assert state["sampling"]["rng"]["device_type"] == "cpu"
    expected = module.timesteps.sampler.sample(16)

    fresh = install(LossAwareSampling(history=2))
    fresh.load_state_dict(state)  # before setup: kept until the strategy is bound
    assert fresh.state_dict() == state and state["rank"] == 0
    other = TinyDiffusion(num_timesteps=20, schedule="cosine")
    fresh.setup(_FakeTrainer(), other, "fit")
    assert torch.equal(other.timesteps.sampler.sample(16), expected)


@pytest.mark.parametrize("strategy", [lambda: LossAwareSampling(history=2),
                                      lambda: CurriculumSampling(LogitNormalSampling(), switch=1.0, shape="step")])
def test_every_rank_resuming_from_rank_0s_state_draws_its_own_time_steps(strategy):
    """Lightning writes the callback state of rank 0 only and every rank loads it. Rank 0 continues its stream;
    rank 1 keeps rank 0's statistics but not its stream (or both ranks would draw the same t from the resume on),
    and draws the same t again when resumed again from the same state (a curriculum at a = 1 draws with its early
    strategy's generator alone)."""
    module = TinyDiffusion(num_timesteps=20, schedule="cosine")
    saved = install(strategy(), seed=4)
    fit(module, [saved], steps=3)
    state = saved.state_dict()
    expected = module.timesteps.sampler.sample(64)
    draws = []
    for rank in (0, 1, 1, 2):
        resumed, fake = TinyDiffusion(num_timesteps=20, schedule="cosine"), _FakeTrainer()
        fake.global_rank = rank
        callback = install(strategy())
        callback.setup(fake, resumed, "fit")
        callback.load_state_dict(state)
        draws.append(resumed.timesteps.sample(64))
        if isinstance(callback.sampling, LossAwareSampling):
            assert torch.equal(callback.sampling.loss_history, saved.sampling.loss_history)
    assert torch.equal(draws[0], expected) and torch.equal(draws[1], draws[2])
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[3], draws[0])
    assert not torch.equal(draws[3], draws[1]) and state["rank"] == 0


class _FakeTrainer:
    """Just what the callbacks' setup reads."""

    callbacks: list = []
    global_rank = 0
    world_size = 1
    global_step = 0
    max_steps = 10


# ------------------------------------------------------------------------------ the external example
def test_external_module_example_runs():
    spec = importlib.util.spec_from_file_location("external_module_example", TESTS / "external_module_example.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules["external_module_example"] = example
    spec.loader.exec_module(example)
    pl.seed_everything(0)
    model = example.main(max_steps=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    assert isinstance(model.timesteps.sampler, SpeeD) and model.timesteps.weights is model.timesteps.sampler
    assert model.timesteps.tau == 700
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------ YAML
YAML_STRATEGIES = """
timesteps:
  - class_path: lightning_speed.timesteps.SpeeD
    init_args: {tau: auto, k: 5, dual: true, lam: null}
  - class_path: lightning_speed.timesteps.SpeeD
    init_args: {tau: 700, k: 1, dual: false, lam: 0.6}
  - class_path: lightning_speed.timesteps.CLTSSampling
    init_args: {mu: 300, sigma: 200, total_steps: 50000}
  - class_path: lightning_speed.timesteps.LossAwareSampling
  - class_path: lightning_speed.timesteps.LogitNormalSampling
    init_args: {mean: 0.0, std: 1.0}
  - class_path: lightning_speed.timesteps.P2Weighting
    init_args: {k: 1, gamma: 1}
  - class_path: lightning_speed.timesteps.MinSNRWeighting
    init_args: {gamma: 5}
  - class_path: lightning_speed.timesteps.CurriculumSampling
    init_args: {early: {class_path: LogitNormalSampling}, switch: 0.5, shape: step}
  - class_path: lightning_speed.timesteps.StratifiedSampling
    init_args: {inner: {class_path: SpeeD, init_args: {lam: null}}}
callbacks:
  - class_path: lightning_speed.callbacks.TimestepCallback
    init_args:
      strategies: {class_path: lightning_speed.timesteps.SpeeD, init_args: {tau: 650, dual: false}}
      seed: 3
  - class_path: lightning_speed.callbacks.monitor.TimestepMonitor
    init_args: {log_every_n_steps: 50}
"""


def yaml_parser():
    from jsonargparse import ArgumentParser

    from lightning_speed.timesteps import Strategy

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--timesteps", type=list[Strategy])
    parser.add_argument("--callbacks", type=list[pl.Callback])
    return parser


def test_strategies_and_their_callback_are_configurable_from_yaml():
    parser = yaml_parser()
    config = parser.instantiate_classes(parser.parse_string(YAML_STRATEGIES))
    strategies, (callback, monitor) = config.timesteps, config.callbacks
    assert [type(s).__name__ for s in strategies] == [
        "SpeeD", "SpeeD", "CLTSSampling", "LossAwareSampling", "LogitNormalSampling", "P2Weighting", "MinSNRWeighting",
        "CurriculumSampling", "StratifiedSampling",
    ]
    assert strategies[0].tau == "auto" and strategies[0].roles == ("sampling",) and strategies[1].roles == ("weighting",)
    assert strategies[6].gamma == 5 and strategies[7].early.mean == 0.0 and strategies[7].shape == "step"
    assert type(strategies[8].inner).__name__ == "SpeeD" and strategies[8].inner.roles == ("sampling",)
    assert isinstance(callback, TimestepCallback) and callback.seed == 3 and isinstance(monitor, TimestepMonitor)
    (speed,) = callback.strategies
    assert speed.tau == 650 and speed.dual is False and speed.lam == 0.6


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ("tau: auto, k: 5,", "tau: auto, k: five,", "k"),
        ("tau: auto, k: 5", "tau: late, k: 5", "late"),  # Literal['auto']: the allowed value is named
        ("shape: step", "shape: cosine", "linear"),
        ("dual: true, lam: null", "dual: maybe, lam: null", "dual"),
        ("{early: {class_path: LogitNormalSampling}", "{early: {class_path: P2Weighting}", "P2Weighting"),
    ],
)
def test_yaml_rejects_bad_values_naming_the_allowed_ones(old, new, match):
    parser = yaml_parser()
    bad = YAML_STRATEGIES.replace(old, new)
    assert bad != YAML_STRATEGIES
    with pytest.raises(Exception, match=match):
        parser.instantiate_classes(parser.parse_string(bad))


# ------------------------------------------------------------------------------ monitor
def test_monitor_logs_per_area_means_at_the_interval(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = TinyDiffusion()
    monitor = TimestepMonitor(log_every_n_steps=2, tau=700)
    logger = TensorBoardLogger(tmp_path, name="tb")
    rec = fit(module, [install(asymmetric(), change_aware(), seed=0), monitor], steps=6, logger=logger)
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
        # dual sampling: half of each batch are partners, and no partner lies at t >= the pivot 642
        assert summary["timesteps/p/convergence"] == pytest.approx(300 / 3800 / 2, rel=1e-5)
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    assert "timesteps/t" in events.Tags()["histograms"]
    assert "timesteps/loss/acceleration" in events.Tags()["scalars"]
    histogram = events.Histograms("timesteps/t")
    assert [h.step for h in histogram] == [1, 3, 5]  # the logger steps of train/loss for the same batches
    assert histogram[0].histogram_value.num == sum(x.numel() for x in rec.t[:2])


def _assert_window(summary, t_batches, tau=700):
    """A monitor summary's per-area shares are those of exactly these micro-batches' time steps."""
    t = torch.cat(t_batches)
    for name, lo, hi in (("acceleration", 0, 219), ("deceleration", 219, tau), ("convergence", tau, 1000)):
        inside = ((t >= lo) & (t < hi)).float().mean().item()
        assert summary[f"timesteps/share/{name}"] == pytest.approx(inside, abs=1e-6)


def test_monitor_windows_hold_whole_optimizer_steps_under_accumulation(tmp_path):
    # 8 micro-batches of 8 per epoch, two per optimizer step: a summary every 3 optimizer steps covers 6 of them,
    # from the first window on (the first micro-batches end at global_step 0, which has no window behind it)
    data = loader(n=64, batch_size=8)
    monitor, rec = TimestepMonitor(log_every_n_steps=3, tau=700), Recorder()
    run = trainer(6, [install(asymmetric(), seed=0), monitor, rec], accumulate_grad_batches=2)
    run.fit(TinyDiffusion(), data)
    assert [h["step"] for h in monitor.history] == [3.0, 6.0]
    assert len(rec.t) == 12
    _assert_window(monitor.history[0], rec.t[:6])
    _assert_window(monitor.history[1], rec.t[6:])

    # resumed at step 3: the first window after the resume is again 6 micro-batches, not the first one alone
    first = trainer(3, [install(asymmetric(), seed=0)], accumulate_grad_batches=2)
    first.fit(TinyDiffusion(), data)
    first.save_checkpoint(tmp_path / "step3.ckpt")
    resumed_monitor, resumed = TimestepMonitor(log_every_n_steps=3, tau=700), Recorder()
    second = trainer(6, [install(asymmetric(), seed=0), resumed_monitor, resumed], accumulate_grad_batches=2)
    second.fit(TinyDiffusion(), data, ckpt_path=tmp_path / "step3.ckpt")
    assert [h["step"] for h in resumed_monitor.history] == [6.0]
    assert len(resumed.t) == 6
    _assert_window(resumed_monitor.history[0], resumed.t)


def test_monitor_splits_at_the_installed_strategy_tau():
    monitor = TimestepMonitor(log_every_n_steps=1)
    fit(TinyDiffusion(), [callbacks.SpeeD(tau="auto", seed=0), monitor], steps=1)
    assert monitor.areas.tau == 642  # from SpeeD, given once
    alone = TimestepMonitor(log_every_n_steps=1)
    fit(TinyDiffusion(), [install(P2Weighting()), alone], steps=1)
    assert alone.areas.tau == 642  # no strategy tau: the schedule's pivot
    explicit = TimestepMonitor(log_every_n_steps=1, tau=700)
    fit(TinyDiffusion(), [callbacks.SpeeD(tau=700), explicit], steps=1)
    assert explicit.areas.tau == 700


class _MeanOnly(TinyDiffusion):
    """Samples through the strategy but averages the loss itself: nothing is recorded."""

    def training_step(self, batch, batch_idx):
        t = self.timesteps.sample(batch[0].shape[0], batch[0].device)
        return self.net(torch.cat([batch[0], t.unsqueeze(1).float()], dim=1)).pow(2).mean()


def test_monitor_explains_what_it_needs():
    with pytest.raises(ValueError, match=r"(?s)_MeanOnly.timesteps.last.*did not call it.*self.timesteps.loss\(t, per_sample_loss\)"):
        trainer(1, [TimestepMonitor(log_every_n_steps=1)]).fit(_MeanOnly(), loader())


@pytest.mark.parametrize(
    ("callback", "match"),
    [
        (lambda: callbacks.SpeeD(), r"(?s)SpeeD weights each loss through _MeanOnly.timesteps.loss, but this training_step "
                          r"did not call it.*self.timesteps.loss\(t, per_sample_loss\)"),
        (lambda: install(LossAwareSampling()), "LossAwareSampling reweights and observes each loss through _MeanOnly.timesteps.loss"),
        (lambda: install(asymmetric()), None),  # it only chooses t: averaging the loss itself loses nothing
    ],
)
def test_strategies_that_act_in_the_loss_need_it_called(callback, match):
    if match is None:
        trainer(2, [callback()]).fit(_MeanOnly(), loader())
        return
    with pytest.raises(ValueError, match=match):
        trainer(2, [callback()]).fit(_MeanOnly(), loader())


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
    trainer(3, [install(asymmetric(), MinSNRWeighting(), seed=0), monitor, rec],
            limit_val_batches=0).fit(module, data)
    snr = module.timesteps.schedule.snr
    table = (snr.clamp(max=5) / (snr + 1)).float()  # picked from the module's prediction, "v"
    for t, w in zip(rec.t, rec.weight):
        torch.testing.assert_close(w, table[t])
    assert len(monitor.history) == 3


# ------------------------------------------------------------------------------ CUDA (skipped on CPU)


@cuda
def test_strategies_live_on_the_gpu_and_never_sync():
    module = TinyDiffusion(num_timesteps=20, schedule="cosine")
    cbs = [install(LossAwareSampling(history=2), change_aware(tau="auto"), seed=0)]
    rec = fit(module, [*cbs, TimestepMonitor(log_every_n_steps=5, tau="auto")], steps=12, accelerator="gpu", devices=1)
    assert module.timesteps.sampler.loss_history.is_cuda and module.timesteps.sampler.generator.device.type == "cuda"
    assert bool(module.timesteps.sampler.warm)
    assert len(rec.t) == 12
    schedule = NoiseSchedule.from_name("linear", 1000)
    samplers = [asymmetric(), LossAwareSampling(history=1), CLTSSampling(), LogitNormalSampling(), UniformSampling(),
                SpeeD()]
    weightings = [change_aware(), P2Weighting(), MinSNRWeighting(), ConstantWeighting(), SpeeD(tau=800)]
    for s in [*samplers, *weightings]:
        s.bind(schedule)
    gpu_module = TinyDiffusion().cuda()
    strategy = gpu_module.timesteps
    for s in samplers:
        strategy.sampler, strategy.weights = s, weightings[0]
        s.manual_seed(0)
        strategy.sample(4, "cuda")  # move the tables and build the generator outside the checked region
    for w in weightings:
        w.to("cuda")
    monitor = TimestepMonitor(log_every_n_steps=100)
    monitor.on_fit_start(None, gpu_module)
    fake = _FakeTrainer()
    fake.global_step = 1  # no summary is due: the per-step path only
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            for s in samplers:
                s.set_step(step * 1000, 3000)
                for w in weightings:
                    strategy.sampler, strategy.weights = s, w
                    t = strategy.sample(256, "cuda")
                    per_sample = torch.rand(256, device="cuda", requires_grad=True)
                    loss = strategy.loss(t, per_sample, torch.rand(256, device="cuda"))
                    monitor.on_train_batch_end(fake, gpu_module, loss, None, 0)
                    assert loss.is_cuda and strategy.last.weight.is_cuda and t.is_cuda
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_the_schedule_check_skips_buffers_not_materialised_yet():
    """Under Trainer.init_module(empty_init=True) (FSDP) a module's alphas_cumprod is still on the meta device at the
    callbacks' setup: its length is checked, its values cannot be read and are not."""
    from lightning_speed.callbacks.strategies import _check_schedule

    module = _with_attribute(TinyDiffusion(), "alphas_cumprod", torch.empty(1000, device="meta"))
    _check_schedule(module, module.timesteps, "SpeeD")
    short = _with_attribute(TinyDiffusion(), "alphas_cumprod", torch.empty(100, device="meta"))
    with pytest.raises(ValueError, match=r"len\(TinyDiffusion.alphas_cumprod\) is 100"):
        _check_schedule(short, short.timesteps, "SpeeD")
