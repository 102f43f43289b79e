"""Clipping the predicted x0 to [-1, 1] while sampling is a property of the data space: pixels clip, latents do not.

Gaussian data x0 ~ N(0, S^2 I) has the optimal epsilon predictor eps*(x_t, t) = sqrt(1 - ab_t) x_t / (ab_t S^2 + 1 - ab_t).
With it the solvers' samples are known: unclipped they keep the data's variance S^2 (S = 1, as for unit-variance
latents: a third of the values beyond 1); clipped, the last step returns a clamped x0, so they lie in [-1, 1].
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from _fixtures import cpu_trainer  # pytest puts tests/ on sys.path
from lightning_speed import DiffusionModule
from lightning_speed.callbacks import FIDCallback, SampleGridCallback
from lightning_speed.schedules import NoiseSchedule

S = 1.0  # the data's standard deviation
T = 1000
SHAPE = (4, 16, 16)
NUM_SAMPLES = 64
# Every value is an independent draw (the model is elementwise, the noise i.i.d.): the mean of squares of n values
# estimates S^2 with standard deviation S^2 sqrt(2 / n). The full 1000-step chain itself under-disperses a little:
# its output variance, from the exact linear recursion of the step coefficients, is 0.991 S^2 for ancestral DDPM
# (the posterior variance is below the true reverse variance) and 0.996 S^2 for DDIM, hence the 0.01 S^2.
VALUES = NUM_SAMPLES * math.prod(SHAPE)
VARIANCE_TOLERANCE = 4 * S**2 * math.sqrt(2 / VALUES) + 0.01 * S**2
SOLVERS = [("ddpm", None), ("ddim", None), ("ddim", 1.0)]  # (solver, eta): ancestral, deterministic, stochastic DDIM


class GaussianEpsilon(nn.Module):
    """The exact eps*(x_t, t) of x0 ~ N(0, S^2 I); ``gain`` gives a Trainer a parameter to hold (trained at lr 0)."""

    def __init__(self) -> None:
        super().__init__()
        ab = NoiseSchedule.from_name("linear", T).alpha_bar.double()
        self.register_buffer("slope", ((1 - ab).sqrt() / (ab * S**2 + 1 - ab)).float())
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.gain * self.slope[t].view(-1, *([1] * (x.ndim - 1))) * x


class RecordingAutoencoder:
    """An autoencoder as ``DiffusionModule.decode`` uses it; keeps the latents it decodes."""

    def __init__(self) -> None:
        self.decoded: list[Tensor] = []

    def to(self, device: Any) -> RecordingAutoencoder:
        return self

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return (3, *latent_shape[1:])

    def decode(self, latents: Tensor, batch_size: int = 64) -> Tensor:
        self.decoded.append(latents.clone())
        return latents[:, :3].tanh()


def module(**kwargs: Any) -> DiffusionModule:
    return DiffusionModule(GaussianEpsilon(), num_timesteps=T, image_shape=SHAPE, solver_steps=T,
                           optimizer=lambda p: torch.optim.SGD(p, lr=0.0), **kwargs)


def latent_module(**kwargs: Any) -> DiffusionModule:
    latent = module(**kwargs)
    latent.autoencoder = RecordingAutoencoder()  # as after loading a latent checkpoint
    return latent


def sample(model: DiffusionModule, solver: str, eta: float | None, **kwargs: Any) -> Tensor:
    return model.sample(NUM_SAMPLES, solver=solver, eta=eta, generator=torch.Generator().manual_seed(0), **kwargs)


def assert_unclipped(x: Tensor) -> None:
    """The data's variance kept (the mean is known to be 0), values beyond 1 as N(0, S^2) has them."""
    assert x.numel() == VALUES
    variance = x.double().pow(2).mean().item()
    assert abs(variance - S**2) < VARIANCE_TOLERANCE, (variance, VARIANCE_TOLERANCE)


def assert_clipped(x: Tensor) -> None:
    """Inside [-1, 1], and visibly so: the clamp takes a third of N(0, 1) values back to the range."""
    assert x.abs().max().item() <= 1
    assert x.double().pow(2).mean().item() < S**2 - VARIANCE_TOLERANCE


@pytest.mark.parametrize("solver,eta", SOLVERS)
def test_pixels_clip_and_latents_do_not_by_default(solver: str, eta: float | None) -> None:
    pixels, latents = module(), latent_module()
    assert_clipped(sample(pixels, solver, eta))
    assert_unclipped(sample(latents, solver, eta))
    assert pixels.clip_denoised is True and latents.clip_denoised is False
    assert pixels.hparams.clip_denoised is None  # decided from the data space, not recorded as a choice


@pytest.mark.parametrize("solver,eta", SOLVERS)
def test_the_setting_and_each_call_override_the_data_space(solver: str, eta: float | None) -> None:
    unclipped_pixels, clipped_latents = module(clip_denoised=False), latent_module(clip_denoised=True)
    assert unclipped_pixels.hparams.clip_denoised is False  # a checkpoint records it
    assert_unclipped(sample(unclipped_pixels, solver, eta))
    assert_clipped(sample(clipped_latents, solver, eta))
    assert_unclipped(sample(module(), solver, eta, clip_denoised=False))
    assert_clipped(sample(latent_module(), solver, eta, clip_denoised=True))
    clipped_latents.clip_denoised = None  # back to the data space's
    assert clipped_latents.clip_denoised is False


def test_a_clip_setting_that_is_not_a_boolean_is_refused() -> None:
    with pytest.raises(TypeError, match=r"clip_denoised must be true or false .*got 'false' \(str\); null: from the"):
        module(clip_denoised="false")
    with pytest.raises(TypeError, match=r"clip_denoised must be true or false .*got 1 \(int\)"):
        module().sample(2, solver_steps=2, clip_denoised=1)


class LatentData(pl.LightningDataModule):
    """Unit-variance latents and the autoencoder that decodes them, as ``LatentDataModule`` gives."""

    image_shape = SHAPE

    def __init__(self) -> None:
        super().__init__()
        self.autoencoder = RecordingAutoencoder()

    def train_dataloader(self) -> DataLoader:
        latents = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(latents), batch_size=4)


@pytest.mark.parametrize("solver", ["ddpm", "ddim"])
def test_a_latent_data_module_leaves_sampling_and_the_callbacks_unclipped(solver: str, tmp_path: Path) -> None:
    """The data module's autoencoder makes the data space latent: the sample grid and FID generate unclipped."""
    data, model = LatentData(), module()
    grid = SampleGridCallback(num_samples=NUM_SAMPLES, solver=solver, solver_steps=T, save_dir=str(tmp_path))
    cpu_trainer(max_steps=1, callbacks=[grid]).fit(model, datamodule=data)
    (latents,) = data.autoencoder.decoded  # the grid at train end
    assert_unclipped(latents)
    fid = FIDCallback(num_samples=NUM_SAMPLES, batch_size=NUM_SAMPLES, solver=solver, solver_steps=T)
    list(fid._generate(model, NUM_SAMPLES, batch_size=NUM_SAMPLES, seed=0))
    assert_unclipped(data.autoencoder.decoded[-1])
    assert model.clip_denoised is False


def test_a_latent_checkpoint_loaded_without_its_autoencoder_samples_unclipped(tmp_path: Path) -> None:
    """The data space is decided in training (the data module's autoencoder); the checkpoint keeps the choice, so
    the module loaded alone, which sees no autoencoder, still samples latents unclipped. A set value wins."""
    data, model = LatentData(), module()
    trainer = cpu_trainer(max_steps=1)
    trainer.fit(model, datamodule=data)
    path = tmp_path / "latent.ckpt"
    trainer.save_checkpoint(path)
    loaded = DiffusionModule.load_from_checkpoint(path, backbone=GaussianEpsilon(), weights_only=False)
    assert loaded.clip_denoised is False
    assert_unclipped(sample(loaded, "ddim", None))
    forced = DiffusionModule.load_from_checkpoint(path, backbone=GaussianEpsilon(), clip_denoised=True,
                                                  weights_only=False)
    assert forced.clip_denoised is True


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LATENT_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml")
                        if str((yaml.safe_load(p.read_text()).get("data") or {}).get("class_path", ""))
                        .endswith(".LatentDataModule"))


def test_the_shipped_latent_configs_are_found() -> None:
    assert {p.stem for p in LATENT_CONFIGS} >= {"ffhq", "metfaces"}


@pytest.mark.parametrize("config", LATENT_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_the_shipped_latent_configs_sample_unclipped(config: Path, cli_env: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """One fast_dev_run step through the CLI (as tests/test_configs.py runs them): the model samples unclipped, by
    the config's setting and by its data (a LatentDataModule) alike."""
    from benchmarks.common import smoke_args
    from lightning_speed import module as module_file
    from lightning_speed.cli import main
    from test_configs import data_args

    clipped: list[bool] = []

    def recording_loop(*args: Any, clip_denoised: bool = True, **kwargs: Any) -> Tensor:
        clipped.append(clip_denoised)
        return solver_loop(*args, clip_denoised=clip_denoised, **kwargs)

    solver_loop = module_file.sample_loop
    monkeypatch.setattr(module_file, "sample_loop", recording_loop)

    composed = yaml.safe_load(config.read_text())
    args = ["fit", "--config", str(config), "--trainer.fast_dev_run", "true",
            "--trainer.logger.init_args.save_dir", str(cli_env / "runs"),
            *smoke_args(composed["model"]["backbone"]["class_path"]), *data_args(composed, cli_env)]
    for key in ("fid", "final_fid"):
        if composed.get(key):  # the offline feature network: the standard Inception needs a download
            args += [f"--{key}.init_args.feature_extractor", "fashion_mnist"]
    cli = main(args)
    assert cli.trainer.global_step == 1
    cli.model.sample(2, solver_steps=2)
    cli.model.clip_denoised = None  # the data space's choice: the trainer's data module holds the autoencoder
    cli.model.sample(2, solver_steps=2)
    assert clipped == [False, False]
