"""A user's own LightningModule that trains a diffusers UNet with a diffusers scheduler, adopts the time-step
strategies with the three lines and adds the evaluation callbacks, as docs/own_module.md describes it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_speed.callbacks import FIDCallback, SampleGridCallback, SpeeD
from lightning_speed.metrics import to_uint8
from lightning_speed.timesteps import TimestepStrategy

from _fixtures import cpu_trainer

diffusers = pytest.importorskip("diffusers")


class TinyUNetDiffusion(pl.LightningModule):
    """A DDPM module of one's own: a diffusers UNet2DModel, its DDPMScheduler, the three lines, a DDIM sample."""

    def __init__(self, num_train_timesteps: int = 1000, prediction_type: str = "epsilon") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.unet = diffusers.UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
        )
        self.noise_scheduler = diffusers.DDPMScheduler(
            num_train_timesteps=num_train_timesteps, prediction_type=prediction_type
        )
        self.timesteps = TimestepStrategy(self.noise_scheduler)
        self.image_shape = (1, 8, 8)
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        x0 = batch[0]
        t = self.timesteps.sample(len(x0), x0.device)
        noise = torch.randn_like(x0)
        out = self.unet(self.noise_scheduler.add_noise(x0, noise, t), t).sample
        return self.timesteps.loss(t, (out - noise).pow(2).flatten(1).mean(1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    @torch.no_grad()
    def sample(self, num_samples, *, solver="ddim", solver_steps=50, generator=None, eta=None):
        scheduler = diffusers.DDIMScheduler.from_config(self.noise_scheduler.config)
        scheduler.set_timesteps(solver_steps)  # diffusers refuses more steps than num_train_timesteps
        x = torch.randn((num_samples, *self.image_shape), generator=generator, device=self.device)
        for t in scheduler.timesteps:
            x = scheduler.step(self.unet(x, t).sample, t, x, eta=eta or 0.0).prev_sample
        return x.clamp(-1, 1)


def images(n: int = 32) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def loader() -> DataLoader:
    return DataLoader(TensorDataset(images()), batch_size=8)


@pytest.mark.parametrize("make_callback", [
    lambda: SampleGridCallback(every_n_steps=2, num_samples=2, solver_steps=250),
    lambda: FIDCallback(every_n_steps=2, num_samples=4, batch_size=4, solver_steps=250,
                        feature_extractor="fashion_mnist", reference_images=to_uint8(images())),
])
def test_more_solver_steps_than_the_schedulers_time_steps_fail_before_the_first_step(make_callback):
    # T = 100: a solver cannot keep 250 of its 100 steps; the module has no num_timesteps of its own, so the
    # callbacks read T from its strategy rather than failing inside diffusers at the first evaluation
    module = TinyUNetDiffusion(num_train_timesteps=100)
    with pytest.raises(ValueError, match=r"solver_steps must be an integer from 2 to T = 100"):
        cpu_trainer(max_steps=4, callbacks=[SpeeD(tau="auto"), make_callback()]).fit(module, loader())
    assert module.steps_run == 0


def test_a_diffusers_unet_trains_and_samples_through_the_callbacks():
    module = TinyUNetDiffusion(num_train_timesteps=100)
    grid = SampleGridCallback(every_n_steps=2, num_samples=2, solver_steps=5, at_train_end=False)
    with pytest.warns(UserWarning, match="never converges"):  # tau "auto" on the linear schedule with T = 100
        cpu_trainer(max_steps=2, callbacks=[SpeeD(tau="auto"), grid]).fit(module, loader())
    assert module.steps_run == 2 and grid.last_grid is not None and grid.last_grid.dtype == torch.uint8


# -- latent autoencoders other than AutoencoderKL ------------------------------------------------------------
def test_an_autoencoder_without_a_posterior_is_refused_by_name_when_it_encodes():
    # AutoencoderTiny's encode returns latents, not the posterior whose mean and std a training latent is drawn from
    from lightning_speed.autoencoders import Autoencoder

    tiny = diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                     num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    with pytest.raises(TypeError, match=r"AutoencoderTiny\.encode returned AutoencoderTinyOutput, which has no latent_dist"):
        Autoencoder(tiny).encode(torch.zeros(1, 3, 8, 8))


def test_an_autoencoder_whose_config_lacks_the_shape_facts_is_refused_when_wrapped():
    from lightning_speed.autoencoders import Autoencoder

    dc = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), attention_head_dim=4,
        encoder_block_types="ResBlock", decoder_block_types="ResBlock", encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()), decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41,
    )
    with pytest.raises(TypeError, match=r"AutoencoderDC's config has no block_out_channels"):
        Autoencoder(dc)


@pytest.mark.parametrize("name", ["DDPMScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_a_scheduler_class_instead_of_a_scheduler_is_named_as_such(name):
    with pytest.raises(TypeError, match=rf"from the class {name}: pass an instance, {name}\(\.\.\.\)"):
        TimestepStrategy(getattr(diffusers, name))
