"""SpeeD in a plain LightningModule that trains a diffusers flow-matching transformer with the three lines.

The module holds a randomly initialised tiny ``SD3Transformer2DModel`` and a
``FlowMatchEulerDiscreteScheduler(shift=3.0)`` and adopts the strategies with ``TimestepStrategy(self.scheduler)``, ``self.timesteps.sample`` and
``self.timesteps.loss``; the callbacks differ between runs, the module does not. Every drawn t is recorded and
tested against the installed strategy's distribution (``cdf_at``) with the Kolmogorov-Smirnov distance
D = sup |F_n - F|, whose critical value comes from the Dvoretzky-Kiefer-Wolfowitz inequality with Massart's
constant: P(D > eps) <= 2 exp(-2 n eps^2) for n independent draws, so eps = sqrt(log(2 / alpha) / (2 n)) rejects a
correct sampler with probability at most alpha. The same draws must reject the distribution without the shift,
so the test can fail.

SpeeD's dual pairs are not independent of their primaries: the draws at the first n // 2 + 1 positions of a batch
(primaries, CDF G) and the rest (partners, CDF G(m + t) - G(m - t)) are tested as two independent samples, each at
alpha / 2 (together every drawn t, at level alpha).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_speed import callbacks, flow
from lightning_speed.flow import FlowSchedule
from lightning_speed.timesteps import LogitNormalSampling, SpeeD, TimestepStrategy, UniformSampling

from _fixtures import cpu_trainer

diffusers = pytest.importorskip("diffusers")

ALPHA = 1e-3
BATCH, STEPS = 64, 12


class TinySD3(pl.LightningModule):
    """A user's flow-matching module: a diffusers transformer, its scheduler and the three lines."""

    def __init__(self, shift: float = 3.0, timesteps: object = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.transformer = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        )
        self.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
        self.timesteps = TimestepStrategy(self.scheduler if timesteps is None else timesteps)
        self.drawn: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x0, text, pooled = batch
        t = self.timesteps.sample(len(x0), x0.device)
        noise = torch.randn_like(x0)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        v = self.transformer(x_t, text, pooled, t * self.scheduler.config.num_train_timesteps).sample
        loss = self.timesteps.loss(t, (v - (noise - x0)).pow(2).flatten(1).mean(1))
        self.drawn.append(t.detach().clone())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = BATCH * STEPS
    data = (torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 5, 16, generator=g), torch.randn(n, 8, generator=g))
    return DataLoader(TensorDataset(*data), batch_size=BATCH, drop_last=True)


def train(callback: pl.Callback, **module_args: object) -> TinySD3:
    module = TinySD3(**module_args)
    cpu_trainer(max_steps=STEPS, callbacks=[callback]).fit(module, loader())
    return module


def ks_distance(samples: np.ndarray, cdf) -> float:
    x = np.sort(samples)
    f = np.asarray(cdf(x), dtype=np.float64)
    i = np.arange(1, x.size + 1)
    return float(max(np.max(i / x.size - f), np.max(f - (i - 1) / x.size)))


def ks_critical(n: int, alpha: float) -> float:
    return math.sqrt(math.log(2 / alpha) / (2 * n))


def unshifted_uniform(x: np.ndarray) -> np.ndarray:
    return x


def test_a_flow_scheduler_gives_the_strategy_its_shift():
    timesteps = TimestepStrategy(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert timesteps.schedule == FlowSchedule(3.0) and timesteps.process == "flow"
    assert timesteps.prediction == "velocity" and timesteps.num_timesteps is None


def test_speed_trains_a_diffusers_transformer_and_draws_its_density():
    module = train(callbacks.SpeeD())  # tau auto: 0.921
    sampler = module.timesteps.sampler
    assert isinstance(sampler, SpeeD) and module.timesteps.weights is sampler
    assert module.timesteps.tau == pytest.approx(flow.auto_tau())
    drawn = torch.stack(module.drawn).double()  # (steps, batch)
    assert drawn.shape == (STEPS, BATCH) and bool(((drawn > 0) & (drawn < 1)).all())
    assert module.timesteps.last.weight.shape == (BATCH,)  # SpeeD's change-aware weights were applied
    primary_cdf = sampler.density.cdf
    m = sampler.pivot

    def partner_cdf(x):
        return primary_cdf(m + x) - primary_cdf(m - x)

    split = BATCH // 2 + 1
    for draws, cdf, uncorrected in (
        (drawn[:, :split], primary_cdf, unshifted_uniform),
        (drawn[:, split:], partner_cdf, lambda x: np.clip(m + x, 0, 1) - np.clip(m - x, 0, 1)),  # of uniform t
    ):
        draws = draws.flatten().numpy()
        critical = ks_critical(draws.size, ALPHA / 2)
        assert ks_distance(draws, lambda x: cdf(torch.from_numpy(x)).numpy()) < critical
        assert ks_distance(draws, uncorrected) > critical
    # the marginal the strategy reports is the mean of both
    x = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(sampler.cdf_at(x), 0.5 * (primary_cdf(x) + partner_cdf(x)))


def test_logit_normal_trains_a_diffusers_transformer_and_draws_its_density():
    module = train(callbacks.TimestepCallback(LogitNormalSampling()))
    sampler = module.timesteps.sampler
    draws = torch.stack(module.drawn).double().flatten().numpy()
    critical = ks_critical(draws.size, ALPHA)
    assert ks_distance(draws, lambda x: sampler.cdf_at(x).numpy()) < critical
    without_shift = LogitNormalSampling().bind(FlowSchedule(1.0))
    assert ks_distance(draws, lambda x: without_shift.cdf_at(x).numpy()) > critical


def test_setup_refuses_a_scheduler_whose_shift_the_strategy_does_not_use():
    module = TinySD3(shift=3.0, timesteps=FlowSchedule(1.0))
    match = r"with shift 1, but TinySD3.scheduler has shift 3.*TimestepStrategy\(self.scheduler\)"
    with pytest.raises(ValueError, match=match):
        cpu_trainer(max_steps=1, callbacks=[callbacks.SpeeD()]).fit(module, loader())


def test_dynamic_shifting_needs_the_shift_stated():
    dynamic = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    with pytest.raises(ValueError, match=r"dynamic shifting.*config.shift is not.*FlowSchedule.from_scheduler\(self.scheduler, "
                                         "num_tokens="):
        TimestepStrategy(dynamic)
    unipc = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                              use_dynamic_shifting=True)
    with pytest.raises(ValueError, match=r"dynamic shifting.*config.flow_shift is not the shift"):  # the key it reads
        TimestepStrategy(unipc)
    # stated: the held scheduler's shift is chosen per resolution, so it is not compared
    module = TinySD3(timesteps=FlowSchedule(flow.resolution_shift(16)))
    module.scheduler = dynamic
    cpu_trainer(max_steps=1, callbacks=[callbacks.TimestepCallback(UniformSampling())]).fit(module, loader())
    assert module.timesteps.schedule.shift == pytest.approx(flow.resolution_shift(16))


def test_setup_refuses_a_strategy_of_the_other_process():
    """A flow strategy next to a DDPM scheduler, a DDPM strategy next to a flow scheduler, or a stated process that
    the strategy does not follow: the time steps would describe another process than the one trained."""
    ddpm = diffusers.DDPMScheduler()
    flow_module = TinySD3(timesteps=FlowSchedule(3.0))
    flow_module.scheduler = ddpm
    ddpm_module = TinySD3()
    ddpm_module.timesteps = TimestepStrategy(ddpm)
    stated = TinySD3()
    stated.process = "ddpm"
    for module, match in (
        (flow_module, r"flow times from TinySD3.timesteps \(FlowSchedule\(shift=3\)\), but TinySD3.scheduler holds a DDPM"),
        (ddpm_module, r"time steps from TinySD3.timesteps .*, but TinySD3.scheduler holds a flow-matching schedule"),
        (stated, r"TinySD3.process is 'ddpm' but TinySD3.timesteps is built on FlowSchedule\(shift=3\), a flow"),
    ):
        with pytest.raises(ValueError, match=match):
            cpu_trainer(max_steps=1, callbacks=[callbacks.SpeeD()]).fit(module, loader())


@pytest.mark.parametrize("config", [
    {},  # Flux's: mu from 0.5 at 256 tokens to 1.15 at 4096, shift exp(mu)
    {"base_shift": 0.95, "max_shift": 2.05, "base_image_seq_len": 1024, "max_image_seq_len": 4096},  # LTX-Video's
    {"time_shift_type": "linear"},  # shift mu itself
])
def test_a_dynamic_scheduler_gives_the_shift_it_applies_at_a_token_count(config):
    """The shift equals the one the scheduler applies for that token count: mu as its pipelines compute it from its
    config (linear in the token count), then the scheduler's own time_shift, whose shift is t'(1 - t) / (t (1 - t'))."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **config)
    c, tokens = scheduler.config, 1024
    slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    mu = c.base_shift + slope * (tokens - c.base_image_seq_len)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    shifted = scheduler.time_shift(mu, 1.0, t)
    applied = shifted * (1 - t) / (t * (1 - shifted))
    schedule = FlowSchedule.from_scheduler(scheduler, num_tokens=tokens)
    torch.testing.assert_close(torch.full_like(t, schedule.shift), applied)
    torch.testing.assert_close(schedule.warp(t), shifted)
    with pytest.raises(ValueError, match="fixed shift 3.*leave num_tokens out"):
        FlowSchedule.from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), num_tokens=tokens)


def test_a_solver_with_flow_sigmas_is_a_flow_scheduler():
    """A multistep solver with flow sigmas (Wan's UniPC) noises as a flow with its flow_shift: its alphas_cumprod is
    not its schedule. Held next to the strategy, its shift is compared, and it is not taken for a DDPM schedule."""
    unipc = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    assert TimestepStrategy(unipc).schedule == FlowSchedule(3.0)
    module = TinySD3()
    module.sampling_scheduler = unipc
    cpu_trainer(max_steps=1, callbacks=[callbacks.SpeeD()]).fit(module, loader())
    other = TinySD3(timesteps=FlowSchedule(1.0))
    other.scheduler = unipc
    with pytest.raises(ValueError, match=r"with shift 1, but TinySD3.scheduler has shift 3"):
        cpu_trainer(max_steps=1, callbacks=[callbacks.SpeeD()]).fit(other, loader())
    epsilon = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="epsilon", flow_shift=3.0)
    with pytest.raises(ValueError, match=r"prediction_type 'epsilon'.*velocity.*flow_prediction"):
        TimestepStrategy(epsilon)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_a_zero_snr_solver_schedule_is_read_as_ending_at_zero(name):
    """Sigma-based solvers store zero terminal SNR's last alpha_bar as 2^-24 (a finite first sigma), above the
    entry before it: read as the rescaled schedule it is, the one DDPMScheduler holds, not refused as rising."""
    from lightning_speed.schedules import as_schedule

    solver = getattr(diffusers, name)(rescale_betas_zero_snr=True)
    assert solver.alphas_cumprod[-1].item() == 2**-24 > solver.alphas_cumprod[-2].item()
    schedule = as_schedule(solver)
    reference = as_schedule(diffusers.DDPMScheduler(rescale_betas_zero_snr=True))
    assert schedule.alpha_bar[-1].item() == 0.0
    assert torch.equal(schedule.alpha_bar, reference.alpha_bar)  # the same float32 products, converted alike
    assert as_schedule(getattr(diffusers, name)()).alpha_bar[-1].item() > 0  # without the rescaling: as stored
