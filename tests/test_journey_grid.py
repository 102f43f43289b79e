"""SampleGridCallback with the sample methods of modules of one's own: latent-like channel counts and wrong layouts."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_speed.callbacks import SampleGridCallback
from lightning_speed.metrics.features import to_uint8

from _fixtures import cpu_trainer

LEVELS = torch.tensor([-1.0, -0.5, 0.5, 1.0])  # channel c of every sample is filled with LEVELS[c]


class Sampler(pl.LightningModule):
    """A module whose ``sample`` returns constant images of ``shape`` (each channel its own level)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net, self.shape = nn.Linear(1, 1), shape

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def sample(self, num_samples, *, solver="ddim", solver_steps=50, generator=None, eta=None):
        images = torch.empty(num_samples, *self.shape)
        if self.shape[0] <= len(LEVELS):
            images[:] = LEVELS[: self.shape[0]].view(-1, 1, 1)
        return images

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(shape: tuple[int, ...], tmp_path) -> SampleGridCallback:
    grid = SampleGridCallback(every_n_steps=1, num_samples=2, nrow=2, solver_steps=2, save_dir=str(tmp_path),
                              at_train_end=False)
    loader = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)
    cpu_trainer(max_steps=1, callbacks=[grid]).fit(Sampler(shape), loader)
    return grid


def test_four_channel_samples_are_shown_one_grey_tile_per_channel(tmp_path) -> None:
    with pytest.warns(UserWarning, match="4-channel images"):
        grid = fit((4, 8, 8), tmp_path)
    # 2 samples x 4 channels side by side (nrow 2 x 4): one row of 8 tiles of 8 px with 2 px padding around each.
    assert tuple(grid.last_grid.shape) == (3, 8 + 2 * 2, 8 * 8 + 9 * 2)
    levels = to_uint8(LEVELS)
    for tile in range(8):
        x = 2 + tile * 10
        assert torch.all(grid.last_grid[:, 2:10, x : x + 8] == levels[tile % 4])
    assert [p.name for p in grid.saved_paths] == ["samples_step1.png"] and grid.saved_paths[0].is_file()


def test_channels_last_samples_fail_with_the_permute_to_use(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"channels-last.*permute\(0, 3, 1, 2\)"):
        fit((8, 8, 3), tmp_path)


def test_integer_samples_fail_naming_the_expected_range(tmp_path) -> None:
    class Uint8Sampler(Sampler):
        def sample(self, num_samples, **kwargs):
            return super().sample(num_samples, **kwargs).add(1).mul(127.5).to(torch.uint8)

    grid = SampleGridCallback(every_n_steps=1, num_samples=2, solver_steps=2, at_train_end=False)
    loader = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)
    with pytest.raises(TypeError, match=r"torch.uint8 tensor.*float tensor \(num_samples, C, H, W\) in \[-1, 1\]"):
        cpu_trainer(max_steps=1, callbacks=[grid]).fit(Uint8Sampler((1, 8, 8)), loader)


@pytest.mark.parametrize("returned", ["list", "channels_last", "decoded_ints"])
def test_fid_checks_what_sample_and_decode_return_as_grids_do(tmp_path, returned) -> None:
    """FID draws its samples through the same generator as the grids: a list (a pipeline's output), channels-last
    images or integer decodes are named, not failed on deep inside the feature network or read on the wrong scale."""
    from lightning_speed.callbacks import FIDCallback

    class Odd(Sampler):
        def sample(self, num_samples, **kwargs):
            images = super().sample(num_samples, **kwargs)
            return list(images) if returned == "list" else images

        def decode(self, images):
            return images.add(1).mul(127.5).to(torch.uint8) if returned == "decoded_ints" else images

    shape = (8, 8, 1) if returned == "channels_last" else (1, 8, 8)
    fid = FIDCallback(every_n_steps=1, num_samples=2, batch_size=2, solver_steps=2, on_train_end=False,
                      feature_extractor="fashion_mnist", reference_images=torch.zeros(4, 1, 8, 8, dtype=torch.uint8),
                      num_reference=4, cache_dir=str(tmp_path / "cache"))
    loader = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)
    match = {"list": r"Odd.sample\(2\) returned a list; it must return a float tensor",
             "channels_last": r"Odd.sample\(2\) returned images of shape \(2, 8, 8, 1\), which look channels-last",
             "decoded_ints": r"Odd.decode returned a torch.uint8 tensor"}[returned]
    with pytest.raises((TypeError, ValueError), match=match):
        cpu_trainer(max_steps=1, callbacks=[fid]).fit(Odd(shape), loader)


class NoiseSampler(Sampler):
    """A ``sample`` as users write it: noise drawn without a dtype, then the network (bf16 under bf16-true)."""

    def __init__(self) -> None:
        super().__init__((1, 2, 2))
        self.head = nn.Linear(4, 4)

    def sample(self, num_samples, *, solver="ddim", solver_steps=50, generator=None, eta=None):
        noise = torch.randn(num_samples, 4, device=self.device, generator=generator)
        self.sampled_dtype = noise.dtype
        return self.head(noise).tanh().float().view(num_samples, 1, 2, 2)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_a_sample_of_ones_own_runs_in_the_trainers_precision(tmp_path, precision) -> None:
    """Lightning runs a module's steps in its precision context; the callbacks call ``sample`` in it too: under
    bf16-true float32 noise against bf16 weights failed at the first grid, after the training before it."""
    grid = SampleGridCallback(every_n_steps=1, num_samples=2, nrow=2, solver_steps=2, save_dir=str(tmp_path),
                              at_train_end=False)
    module = NoiseSampler()
    loader = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)
    cpu_trainer(max_steps=1, callbacks=[grid], precision=precision).fit(module, loader)
    assert grid.saved_paths[0].is_file()
    assert module.sampled_dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)


def test_diffusion_modules_sampling_keeps_its_own_precision() -> None:
    """DiffusionModule draws its noise and runs its solver in float32 under its own autocast: the Trainer's bf16-true
    context (bf16 default dtype) would put them in bf16, so it is not entered for it."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import HalfPrecision

    from lightning_speed import DiffusionModule
    from lightning_speed.metrics.sampling import precision_context

    trainer = SimpleNamespace(precision_plugin=HalfPrecision("bf16-true"))
    for module, expected in ((DiffusionModule(nn.Identity(), image_shape=(1, 4, 4)), torch.float32),
                             (NoiseSampler(), torch.bfloat16)):
        module._trainer = trainer
        with precision_context(module):
            assert torch.randn(1).dtype == expected
