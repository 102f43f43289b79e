"""DiffusionModule(process="flow") on the CPU: the velocity loss through the strategy seam, float t reaching the
backbone as t * 1000, Euler and Heun checked against closed forms through ``sample``, guidance, the callbacks, the
errors of a flow set up wrongly, and a checkpoint save and resume."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_speed import DiffusionModule
from lightning_speed.backbones import DiT, UNet
from lightning_speed.backbones.embeddings import sinusoidal_embedding
from lightning_speed.callbacks import EMAWeightAveraging, FIDCallback, SampleGridCallback, TimestepCallback
from lightning_speed.timesteps import MinSNRWeighting, SpeeD

from _fixtures import blob_loader as loader  # pytest puts tests/ on sys.path
from _fixtures import cpu_trainer as trainer

SHAPE = (1, 8, 8)


class RecordingNet(nn.Module):
    """A tiny conv net that embeds t continuously (t / 1000, so flow times arrive in [0, 1]) and records every t."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)
        self.t_proj = nn.Linear(1, 8)
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, y=None):
        self.seen.append(t.detach().clone())
        h = self.inp(x) + self.t_proj(t[:, None].float() / 1000)[:, :, None, None]
        return self.out(torch.relu(h))


class Field(nn.Module):
    """A known velocity field v(x, t / 1000, y) as a backbone (one unused parameter, so the module can be built)."""

    def __init__(self, field) -> None:
        super().__init__()
        self.field = field
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        return self.field(x, t / 1000, y)


def flow_module(backbone=None, **kwargs) -> DiffusionModule:
    return DiffusionModule(backbone if backbone is not None else RecordingNet(), process="flow", image_shape=SHAPE,
                           **kwargs)


# -- training --------------------------------------------------------------------------------------
def test_the_training_loss_is_the_velocity_mse_through_the_strategys_loss() -> None:
    """loss = mean(w(t) ||v_hat(x_t, t) - (eps - x0)||^2 / D) with x_t = (1 - t) x0 + t eps, t float in (0, 1) from
    the strategy and t * 1000 at the backbone."""
    module = flow_module()
    module.timesteps.install(weighting=MinSNRWeighting(gamma=5.0))  # non-constant weights: the seam is used
    x0 = torch.rand(8, *SHAPE) * 2 - 1
    torch.manual_seed(3)
    loss = module.training_step(x0, 0)
    torch.manual_seed(3)
    t = module.timesteps.sample(8, "cpu")
    noise = torch.randn_like(x0)
    assert t.dtype == torch.float32 and 0 < t.min() and t.max() < 1
    torch.testing.assert_close(module.backbone.seen[0], t * 1000)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    mse = (module.backbone(x_t, t * 1000) - (noise - x0)).pow(2).flatten(1).mean(1)
    w = module.timesteps.weights.weight(t)
    assert w.std() > 0
    torch.testing.assert_close(loss, (w * mse).mean())
    torch.testing.assert_close(module.timesteps.last.t, t)


def test_a_flow_trains_a_few_cpu_steps_with_float_times_at_the_backbone(tmp_path) -> None:
    pl.seed_everything(0)
    module = flow_module(optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    losses, times = [], []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())
            times.append(pl_module.backbone.seen[-1])
            torch.testing.assert_close(times[-1], pl_module.timesteps.last.t * 1000)

    grids = SampleGridCallback(every_n_steps=4, num_samples=4, solver="heun", solver_steps=2, save_dir=str(tmp_path))
    fid = FIDCallback(num_samples=8, batch_size=8, solver="euler", solver_steps=3, feature_extractor=FlatFeatures(),
                      reference_images=torch.randint(0, 256, (16, *SHAPE), dtype=torch.uint8),
                      cache_dir=str(tmp_path / "fid"))
    trainer(max_steps=8, callbacks=[Record(), EMAWeightAveraging(decay=0.9), grids, fid], limit_val_batches=2,
            val_check_interval=4).fit(module, loader(n=64, batch_size=8), loader(n=16, batch_size=8, shuffle=False))
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    train_times = torch.cat(times)
    assert train_times.dtype == torch.float32 and 0 < train_times.min() and train_times.max() < 1000
    assert (train_times != train_times.round()).any()  # not cast to integer steps
    assert grids.last_grid is not None and (tmp_path / "samples_step4.png").exists()
    assert [step for step, _ in fid.history] == [8] and math.isfinite(fid.history[0][1])


class FlatFeatures(nn.Module):
    """A feature network for 8 x 8 images (uint8 in, 4 features out)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 4)

    def forward(self, images):
        return self.proj(images.float().flatten(1) / 255.0)


def test_validation_loss_draws_the_same_uniform_times_per_batch() -> None:
    module = flow_module()
    batch = torch.rand(6, *SHAPE) * 2 - 1
    first, second = module.validation_step(batch, 1), module.validation_step(batch, 1)
    torch.testing.assert_close(first, second)
    t = module.backbone.seen[-1] / 1000
    expected = torch.rand(6, generator=torch.Generator().manual_seed(1))  # unshifted uniform, whatever the shift
    torch.testing.assert_close(t, expected)


def test_validation_draws_differ_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP every rank validates other images: with one seed per batch index they were noised with the same t
    and noise on every rank. Rank 0 keeps the batch's seed, so a run on one device is unchanged."""
    module = flow_module()
    batch = torch.rand(6, *SHAPE) * 2 - 1
    times = {}
    for rank in (0, 1):
        monkeypatch.setattr(type(module), "global_rank", property(lambda self, r=rank: r))
        module.validation_step(batch, 1)
        times[rank] = module.backbone.seen[-1] / 1000
    torch.testing.assert_close(times[0], torch.rand(6, generator=torch.Generator().manual_seed(1)))
    assert not torch.allclose(times[0], times[1])


def test_validation_times_stay_float32_under_half_precision_defaults() -> None:
    """precision="bf16-true" makes bf16 the default dtype inside each step, where torch.rand would draw 2^8 distinct
    times per octave (t = 0 included); the validation times are the float32 draws of the seeded generator."""
    module = flow_module()
    batch = torch.rand(6, *SHAPE) * 2 - 1
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        module.validation_step(batch, 1)
    finally:
        torch.set_default_dtype(previous)
    expected = torch.rand(6, generator=torch.Generator().manual_seed(1)) * 1000
    torch.testing.assert_close(module.backbone.seen[-1], expected, rtol=0, atol=0)


class HalfNet(nn.Module):
    """A bf16 backbone (as precision="bf16-true" casts it) that records its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.bfloat16))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, y=None):
        self.seen.append((x.detach().clone(), t.detach().clone()))
        return x.to(self.scale.dtype) * self.scale


@pytest.mark.parametrize("time_dtype", [torch.bfloat16, torch.float32])
def test_half_precision_training_tells_the_backbone_the_time_that_noised_x_t(time_dtype) -> None:
    """bf16 data and backbone: x_t = (1 - t) x0 + t eps is formed at the drawn t, not at t rounded to bf16, and the
    backbone gets t * 1000 in float32, not rounded to bf16 (4 apart in [512, 1024): 0.7695 would arrive as 768).
    Both to float32 rounding: x_t within 8 eps32 of its terms' size, t * 1000 within one eps32 relative."""
    module = flow_module(HalfNet())
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(3, *SHAPE, generator=g).bfloat16() for _ in range(2))
    t = torch.tensor([0.76953125, 0.9, 0.99]).to(time_dtype)
    module._losses(x0, t, noise, None)
    x_t, t_seen = module.backbone.seen[-1]
    assert t_seen.dtype == torch.float32
    torch.testing.assert_close(t_seen.double(), t.double() * 1000, rtol=torch.finfo(torch.float32).eps, atol=0)
    t64 = t.double().view(-1, 1, 1, 1)
    tol = 8 * torch.finfo(torch.float32).eps * float((x0.double().abs() + noise.double().abs()).max())
    torch.testing.assert_close(x_t.double(), (1 - t64) * x0.double() + t64 * noise.double(), rtol=0, atol=tol)


@pytest.mark.parametrize("make", [
    lambda: DiT(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1, num_heads=2),
    lambda: UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=[1], num_res_blocks=1,
                 attention_resolutions=[]),
], ids=["dit", "unet"])
def test_the_backbones_embed_fractional_times_as_given(make) -> None:
    """t * 1000 of a flow time is fractional: the time embedding gets it unrounded, as its closed-form sinusoid."""
    backbone = make()
    got = []
    backbone.time_embed.register_forward_pre_hook(lambda module, args: got.append(args[0]))
    t = torch.tensor([0.25, 0.7503]) * 1000
    out = backbone(torch.zeros(2, *SHAPE), t)
    assert out.shape == (2, *SHAPE) and torch.isfinite(out).all()
    torch.testing.assert_close(got[0], t, rtol=0, atol=0)
    half = 4
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    angles = t[:, None] * frequencies
    torch.testing.assert_close(sinusoidal_embedding(t, 2 * half), torch.cat([angles.cos(), angles.sin()], 1))
    embedded = backbone.time_embed(torch.tensor([750.3, 750.0]))
    assert not torch.allclose(embedded[0], embedded[1])


# -- sampling: closed forms ---------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [2, 7])
def test_euler_is_exact_for_a_constant_velocity(shift, steps) -> None:
    """dx/dt = c from t = 1 to 0: x(0) = x(1) - c on any grid."""
    c = torch.linspace(-0.5, 0.5, 64).view(1, *SHAPE)
    module = flow_module(Field(lambda x, t, y: c.expand_as(x)), shift=shift)
    noise = torch.randn(3, *SHAPE)
    out = module.sample(3, solver="euler", solver_steps=steps, noise=noise, clip_denoised=False)
    torch.testing.assert_close(out, noise - c)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_solver_grid_is_shifted_and_the_backbone_sees_t_times_1000(shift) -> None:
    """dx/dt = t: Euler sums (t_i - t_(i+1)) t_i over the grid t_i = s u_i / (1 + (s - 1) u_i), u_i = 1 - i / n."""
    net = Field(lambda x, t, y: t.view(-1, 1, 1, 1).expand_as(x))
    module = flow_module(net, shift=shift)
    n, noise = 5, torch.zeros(2, *SHAPE)
    u = 1 - torch.arange(n + 1, dtype=torch.float64) / n
    grid = shift * u / (1 + (shift - 1) * u)
    expected = -((grid[:-1] - grid[1:]) * grid[:-1]).sum()
    out = module.sample(2, solver="euler", solver_steps=n, noise=noise, clip_denoised=False)
    torch.testing.assert_close(out, torch.full_like(out, float(expected)))


def test_heun_is_second_order_with_its_closed_form() -> None:
    """dx/dt = x from x(1) to x(0) = x(1) / e on n equal steps of h = 1/n: Heun's step multiplies by 1 - h + h^2 / 2
    and the last one, into t = 0, is Euler's (1 - h); so sample = (1 - h + h^2 / 2)^(n - 1) (1 - h) x(1), and its
    error falls as h^2 (ratio 4 + O(h) between n and 2n: 4.15 at n = 16; a first-order method gives 2)."""
    module = flow_module(Field(lambda x, t, y: x))
    noise = torch.randn(2, *SHAPE)
    errors = []
    for n in (16, 32):
        h = 1 / n
        out = module.sample(2, solver="heun", solver_steps=n, noise=noise, clip_denoised=False)
        torch.testing.assert_close(out, noise * (1 - h + h * h / 2) ** (n - 1) * (1 - h))
        errors.append((out - noise / math.e).abs().max().item())
    assert 3.75 < errors[0] / errors[1] < 4.25


def test_heun_integrates_a_linear_in_time_field_to_its_last_euler_step() -> None:
    """dx/dt = t: the trapezoid rule is exact on [h, 1], the last Euler step adds h * h: x(0) = x(1) - 1/2 - h^2 / 2."""
    module = flow_module(Field(lambda x, t, y: t.view(-1, 1, 1, 1).expand_as(x)))
    out = module.sample(2, solver="heun", solver_steps=4, noise=torch.zeros(2, *SHAPE), clip_denoised=False)
    torch.testing.assert_close(out, torch.full_like(out, -0.5 - 0.5 / 16))


def test_classifier_free_guidance_mixes_the_velocities() -> None:
    """Per-label constant velocities: Euler gives x(1) - (v_null + s (v_y - v_null)) exactly."""
    table = torch.tensor([0.3, -0.2, 0.05])  # labels 0, 1 and the null label 2
    module = flow_module(Field(lambda x, t, y: table[y].view(-1, 1, 1, 1).expand_as(x)), num_classes=2)
    noise, labels = torch.randn(2, *SHAPE), torch.tensor([0, 1])
    out = module.sample(2, solver="euler", solver_steps=3, noise=noise, labels=labels, guidance_scale=3.0,
                        clip_denoised=False)
    mixed = table[2] + 3.0 * (table[labels] - table[2])
    torch.testing.assert_close(out, noise - mixed.view(-1, 1, 1, 1))


def test_samples_are_clamped_to_the_pixel_range_unless_told_not_to() -> None:
    module = flow_module(Field(lambda x, t, y: torch.full_like(x, -3.0)))
    noise = torch.zeros(1, *SHAPE)
    assert module.sample(1, noise=noise).max() == 1.0  # the default solver is euler
    torch.testing.assert_close(module.sample(1, noise=noise, clip_denoised=False), torch.full_like(noise, 3.0))


# -- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"learn_sigma": True}, r"learn_sigma=True does not apply to process='flow'.*velocity only"),
    ({"prediction": "v"}, r"prediction='v' does not apply to process='flow'.*velocity"),
    ({"schedule": "cosine"}, r"schedule='cosine' does not apply to process='flow'"),
    ({"num_timesteps": 500}, r"num_timesteps=500 does not apply to process='flow'.*continuous"),
    ({"shift": 0.0}, r"shift must be .*> 0"),
    ({"process": "ddpm", "shift": 3.0}, r"shift=3.0 applies to process='flow' only"),
    ({"process": "sde"}, r"Unknown process 'sde'; choose one of 'ddpm', 'flow'"),
    ({"backbone": DiT(image_size=8, in_channels=1, patch_size=4, hidden_size=32, depth=1, num_heads=2,
                      learn_sigma=True)}, r"built with learn_sigma=True.*init_args.learn_sigma to false"),
    ({"backbone": DiT(image_size=8, in_channels=1, patch_size=4, hidden_size=32, depth=1, num_heads=2,
                      num_timesteps=250)}, r"num_timesteps=250.*passes t \* 1000.*at 1000"),
])
def test_a_flow_set_up_wrongly_fails_at_construction(kwargs, match) -> None:
    arguments = {"backbone": RecordingNet(), "process": "flow", "image_shape": SHAPE, **kwargs}
    with pytest.raises(ValueError, match=match):
        DiffusionModule(**arguments)


@pytest.mark.parametrize(("process", "kwargs", "match"), [
    ("flow", {"solver": "ddim"}, r"solver 'ddim' samples a ddpm model but this model is a flow model.*'euler' or 'heun'"),
    ("flow", {"solver": "dpmpp_2m"}, r"solver 'dpmpp_2m' samples a ddpm model"),
    ("ddpm", {"solver": "heun"}, r"solver 'heun' samples a flow model but this model is a ddpm model.*'ddim'"),
    ("flow", {"solver": "euler", "eta": 0.5}, r"eta applies to DDPM's ddim solver only; euler"),
    ("flow", {"solver": "rk4"}, r"Unknown solver 'rk4'; choose one of 'euler', 'heun'"),
])
def test_sample_refuses_a_solver_of_the_other_process(process, kwargs, match) -> None:
    module = DiffusionModule(RecordingNet(), process=process, image_shape=SHAPE)
    with pytest.raises(ValueError, match=match):
        module.sample(1, solver_steps=2, **kwargs)


def _fid(tmp_path, **kwargs) -> FIDCallback:
    kwargs = {"num_samples": 4, "batch_size": 4, "solver_steps": 2, **kwargs}
    return FIDCallback(feature_extractor=FlatFeatures(), reference_images=torch.zeros(4, *SHAPE, dtype=torch.uint8),
                       cache_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize(("process", "callback", "match"), [
    ("flow", lambda tmp_path: SampleGridCallback(num_samples=4, solver="ddim", solver_steps=2),
     r"SampleGridCallback: solver 'ddim' samples a ddpm model but this model is a flow model"),
    ("flow", lambda tmp_path: _fid(tmp_path, solver="ddpm"), r"FIDCallback: solver 'ddpm' samples a ddpm model"),
    ("ddpm", lambda tmp_path: SampleGridCallback(num_samples=4, solver="euler", solver_steps=2),
     r"SampleGridCallback: solver 'euler' samples a flow model but this model is a ddpm model"),
    ("ddpm", lambda tmp_path: _fid(tmp_path, solver="heun"), r"FIDCallback: solver 'heun' samples a flow model"),
], ids=["grid-ddim-on-flow", "fid-ddpm-on-flow", "grid-euler-on-ddpm", "fid-heun-on-ddpm"])
def test_sampling_callbacks_refuse_a_solver_of_the_other_process_before_training(tmp_path, process, callback,
                                                                                 match) -> None:
    module = DiffusionModule(RecordingNet(), process=process, image_shape=SHAPE)
    fit = trainer(max_steps=2, callbacks=[callback(tmp_path)])
    with pytest.raises(ValueError, match=match):
        fit.fit(module, loader(n=8, batch_size=4))
    assert fit.global_step == 0


@pytest.mark.parametrize(("process", "solver"), [("flow", "euler"), ("ddpm", "ddim")])
def test_sampling_callbacks_without_a_solver_take_the_models_own(tmp_path, process, solver) -> None:
    """solver=None (the default) is the process's first solver, chosen at setup: a flow model's callbacks work
    without naming euler, a DDPM's sample with ddim as before; the FID is computed with it."""
    module = DiffusionModule(RecordingNet(), process=process, image_shape=SHAPE)
    grid, fid = SampleGridCallback(num_samples=4, solver_steps=2, every_n_steps=2, at_train_end=False), _fid(tmp_path)
    assert grid.solver is None and fid.solver is None
    fit = trainer(max_steps=2, callbacks=[grid, fid])
    fit.fit(module, loader(n=8, batch_size=4))
    assert (grid.solver, fid.solver) == (solver, solver) and fit.global_step == 2
    assert len(fid.history) == 1 and math.isfinite(fid.history[0][1])


def test_a_default_solver_given_eta_fails_at_setup_on_a_flow(tmp_path) -> None:
    module = flow_module()
    fit = trainer(max_steps=2, callbacks=[SampleGridCallback(num_samples=4, solver_steps=2, eta=0.0)])
    with pytest.raises(ValueError, match=r"SampleGridCallback: .*eta applies to DDPM's ddim solver only; euler"):
        fit.fit(module, loader(n=8, batch_size=4))
    assert fit.global_step == 0


def test_flow_solvers_take_no_eta_in_the_callbacks_either() -> None:
    with pytest.raises(ValueError, match=r"SampleGridCallback: eta applies to DDPM's ddim solver only; heun"):
        SampleGridCallback(solver="heun", eta=0.0)


def test_the_fid_cost_estimate_counts_two_network_calls_per_heun_step(tmp_path) -> None:
    """100 samples x 4 steps after 3 steps of batch 8 (72 training evaluations; a warning from 720): Euler's 400 stay
    quiet, Heun's 800 warn."""
    module, run = flow_module(), trainer(max_steps=3)
    cost = {solver: _fid(tmp_path, solver=solver, num_samples=100, solver_steps=4).cost_warning(run, module, 8)
            for solver in ("euler", "heun")}
    assert cost["euler"] is None
    assert "100 images with HEUN-4 1 time(s): 800 network evaluations" in cost["heun"]


# -- checkpoints ----------------------------------------------------------------------------------------
def test_a_flow_checkpoint_restores_its_process_and_resumes_the_strategy(tmp_path) -> None:
    """load_from_checkpoint rebuilds the flow (process, shift, weights); a resumed fit continues SpeeD's own draws
    exactly as an uninterrupted one; a DDPM module refuses the flow's weights."""

    def fit(steps, module, ckpt_path=None):
        run = trainer(max_steps=steps, callbacks=[TimestepCallback(SpeeD(tau="auto"), seed=7)])
        run.fit(module, loader(n=8, batch_size=8), ckpt_path=ckpt_path)
        return run

    pl.seed_everything(0)
    straight = flow_module(shift=2.0)
    fit(4, straight)
    pl.seed_everything(0)
    first = flow_module(shift=2.0)
    path = tmp_path / "flow.ckpt"
    fit(2, first).save_checkpoint(path)
    resumed = flow_module(shift=2.0)
    assert fit(4, resumed, ckpt_path=path).global_step == 4
    torch.testing.assert_close(resumed.backbone.seen[-2:], straight.backbone.seen[-2:])  # steps 3 and 4

    loaded = DiffusionModule.load_from_checkpoint(path, backbone=RecordingNet())
    assert (loaded.process, loaded.noise_schedule.shift, loaded.num_timesteps) == ("flow", 2.0, None)
    for key, value in first.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    noise = torch.randn(2, *SHAPE)
    torch.testing.assert_close(loaded.sample(2, solver_steps=3, noise=noise), first.sample(2, solver_steps=3, noise=noise))
    with pytest.raises(ValueError, match=r"trained with process='flow' but this module is a 'ddpm' model.*process='flow'"):
        DiffusionModule.load_from_checkpoint(path, backbone=RecordingNet(), process="ddpm", shift=1.0)
