"""FIDCallback and SampleGridCallback inside tiny CPU Trainer.fit runs (a fake generator module)."""

from __future__ import annotations

import csv
import math
import urllib.error
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.io import decode_png, read_file

from lightning_speed.callbacks import EMAWeightAveraging as OurEMA
from lightning_speed.callbacks.fid import FIDCallback
from lightning_speed.callbacks.samples import SampleGridCallback
from lightning_speed.data.embedded import EmbeddedFashionMNISTDataModule
from lightning_speed.metrics import InceptionWeightsUnavailable
from lightning_speed.metrics import features as features_module
from lightning_speed.metrics.sampling import local_share

torch.set_num_threads(2)


class TinyGenerator(pl.LightningModule):
    """Stands in for DiffusionModule: ``sample`` maps seeded noise through one learnable scale."""

    image_shape = (1, 32, 32)

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.sampled_with: list[tuple[int, float]] = []  # (global_step, scale used)
        self.sample_kwargs: list[dict] = []
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        return (self.scale - 3.0) ** 2 + 0.0 * batch[0].float().mean()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)

    @torch.no_grad()
    def sample(self, num_samples, *, solver_steps=50, solver="ddim", generator=None, **kwargs):
        self.sampled_with.append((self.trainer.global_step, float(self.scale)))
        self.sample_kwargs.append({"solver_steps": solver_steps, "solver": solver, **kwargs})
        noise = torch.randn((num_samples, *self.image_shape), generator=generator, device=self.device)
        return torch.tanh(noise * self.scale)


class FlatFeatures(nn.Module):
    """A user-style custom feature network: uint8 images in, (N, 8) features out."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32 * 32, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images.float().flatten(1) / 255.0)


def make_trainer(tmp_path: Path, callbacks, max_steps: int = 4, logger=None, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=kwargs.pop("enable_progress_bar", False),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=kwargs.pop("limit_val_batches", 0),
        **kwargs,
    )


def fid_callback(tmp_path: Path, **kwargs) -> FIDCallback:
    args = dict(num_samples=32, batch_size=16, solver_steps=3, feature_extractor="fashion_mnist",
                num_reference=200, cache_dir=str(tmp_path / "cache"))
    args.update(kwargs)
    return FIDCallback(**args)


def datamodule() -> EmbeddedFashionMNISTDataModule:
    return EmbeddedFashionMNISTDataModule(batch_size=8, val_images=16)


def test_fid_logged_every_n_steps_with_csv_and_cache(tmp_path) -> None:
    fid = fid_callback(tmp_path, every_n_steps=2)
    model = TinyGenerator()
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [fid], logger=logger)
    trainer.fit(model, datamodule=datamodule())

    assert [s for s, _ in fid.history] == [2, 4]  # step 4 = end of training: not evaluated twice
    assert all(v > 0 for _, v in fid.history)
    assert float(trainer.callback_metrics["fid"]) == pytest.approx(fid.history[-1][1])
    assert model.sample_kwargs[0] == {"solver_steps": 3, "solver": "ddim"}
    assert sum(1 for s, _ in model.sampled_with if s == 2) == 2  # 32 samples in batches of 16
    assert fid.reference_from_cache is False
    assert "fashion_mnist_embedded-test-n200" in fid.reference_key

    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = {int(r["step"]): float(r["fid"]) for r in rows if r.get("fid")}
    assert logged == pytest.approx(dict(fid.history))
    assert all(float(r["fid/seconds"]) > 0 for r in rows if r.get("fid"))

    # Same cache dir and key: the real statistics come from disk (file untouched), same FID for same weights.
    cache_files = list((tmp_path / "cache").iterdir())
    assert len(cache_files) == 1
    mtime = cache_files[0].stat().st_mtime_ns
    again = fid_callback(tmp_path, every_n_steps=2)
    make_trainer(tmp_path, [again]).fit(TinyGenerator(), datamodule=datamodule())
    assert again.reference_from_cache is True and cache_files[0].stat().st_mtime_ns == mtime
    assert dict(again.history) == pytest.approx(dict(fid.history))  # fixed seed: the same samples

    # A different reference count or feature network is a different key: recomputed, new file.
    fewer = fid_callback(tmp_path, num_reference=100, on_train_end=False, every_n_steps=1)
    make_trainer(tmp_path, [fewer], max_steps=1).fit(TinyGenerator(), datamodule=datamodule())
    assert fewer.reference_from_cache is False
    other_net = fid_callback(tmp_path, feature_extractor=FlatFeatures(),
                             on_train_end=False, every_n_steps=1)
    make_trainer(tmp_path, [other_net], max_steps=1).fit(TinyGenerator(), datamodule=datamodule())
    assert other_net.reference_from_cache is False
    assert len(list((tmp_path / "cache").iterdir())) == 3

    state = fid.state_dict()
    restored = FIDCallback()
    restored.load_state_dict(state)
    assert restored.history == fid.history


def test_fid_uses_ema_weights_and_restores_training_weights(tmp_path) -> None:
    ema = EMAWeightAveraging(decay=0.5)
    fid = fid_callback(tmp_path, every_n_steps=2, on_train_end=False)
    seen = []

    class Probe(pl.Callback):  # runs right after FIDCallback at the same hook
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append((trainer.global_step, float(pl_module.scale.detach()), float(ema._average_model.module.scale.detach())))

    model = TinyGenerator()
    make_trainer(tmp_path, [ema, fid, Probe()]).fit(model, datamodule=datamodule())
    used = dict(model.sampled_with)
    for step, raw, averaged in seen:
        if step in used:
            assert used[step] == pytest.approx(averaged)
            assert abs(raw - averaged) > 1e-3  # EMA lags the raw weights; raw ones are back after the FID
    assert {2, 4} <= set(used)


@pytest.mark.parametrize("ema_first", [True, False])
def test_fid_at_validation_uses_ema_in_either_callback_order(tmp_path, ema_first) -> None:
    ema = EMAWeightAveraging(decay=0.5)
    fid = fid_callback(tmp_path, on_validation=True, on_train_end=False, num_samples=8, batch_size=8)
    seen = {}

    class Probe(pl.Callback):
        def on_validation_epoch_start(self, trainer, pl_module):  # weights before EMA's swap
            seen[trainer.global_step] = float(ema._average_model.module.scale)

    callbacks = [Probe(), ema, fid] if ema_first else [Probe(), fid, ema]
    model = TinyGenerator()
    trainer = make_trainer(tmp_path, callbacks, max_steps=4, limit_val_batches=1, val_check_interval=2)
    trainer.fit(model, datamodule=datamodule())
    used = dict(model.sampled_with)
    assert set(used) == {2, 4} and [s for s, _ in fid.history] == [2, 4]
    for step, averaged in seen.items():
        assert used[step] == pytest.approx(averaged)


def test_explicit_reference_images_and_missing_reference(tmp_path) -> None:
    images = torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(torch.zeros(16, 1, 32, 32)), batch_size=4)
    fid = fid_callback(tmp_path, reference_images=lambda: images, every_n_steps=2)
    make_trainer(tmp_path, [fid], max_steps=2).fit(TinyGenerator(), train_dataloaders=loader)
    assert [s for s, _ in fid.history] == [2] and fid.reference_key.startswith("tensor-")

    with pytest.raises(ValueError, match="reference_images"):
        make_trainer(tmp_path, [fid_callback(tmp_path)], max_steps=1).fit(TinyGenerator(), train_dataloaders=loader)


def test_missing_inception_fails_in_setup_before_training(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, timeout):
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(features_module, "_download", offline)
    model = TinyGenerator()
    fid = fid_callback(tmp_path, feature_extractor="inception", every_n_steps=2)
    with pytest.raises(InceptionWeightsUnavailable, match="fashion_mnist"):
        make_trainer(tmp_path, [fid]).fit(model, datamodule=datamodule())
    assert model.steps_run == 0


def test_fid_kid_option(tmp_path) -> None:
    fid = fid_callback(tmp_path, compute_kid=True, kid_subset_size=16, on_train_end=True)
    make_trainer(tmp_path, [fid], max_steps=1).fit(TinyGenerator(), datamodule=datamodule())
    assert len(fid.kid_history) == 1 and fid.kid_history[0][1] > 0


def test_local_share_splits_samples() -> None:
    assert [local_share(10, 4, r) for r in range(4)] == [3, 3, 2, 2]
    assert sum(local_share(5000, 3, r) for r in range(3)) == 5000


def test_sample_grid_png_tensorboard_and_fixed_seed(tmp_path) -> None:
    grids = SampleGridCallback(every_n_steps=2, num_samples=9, solver_steps=2, save_dir=str(tmp_path / "grids"))
    logger = TensorBoardLogger(tmp_path, name="tb")
    model = TinyGenerator()
    trainer = make_trainer(tmp_path, [grids], max_steps=3, logger=logger)
    trainer.fit(model, datamodule=datamodule())
    names = sorted(p.name for p in (tmp_path / "grids").iterdir())
    assert names == ["samples_step2.png", "samples_step3.png"]
    png = decode_png(read_file(str(tmp_path / "grids" / "samples_step3.png")))
    assert png.shape == grids.last_grid.shape == (3, 3 * 32 + 4 * 2, 3 * 32 + 4 * 2)
    assert torch.equal(png, grids.last_grid)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [2, 3]

    # The same seed and weights give the same grid; another seed does not.
    first, second = grids.make_grid(trainer, model), grids.make_grid(trainer, model)
    assert torch.equal(first, second)
    other = SampleGridCallback(num_samples=9, solver_steps=2, seed=1)
    assert not torch.equal(first, other.make_grid(trainer, model))


def test_sample_grid_written_to_log_dir_at_train_end(tmp_path) -> None:
    grids = SampleGridCallback(every_n_steps=100, num_samples=4, solver_steps=2)
    trainer = make_trainer(tmp_path, [grids], max_steps=2, logger=CSVLogger(tmp_path, name="csv"))
    trainer.fit(TinyGenerator(), datamodule=datamodule())
    assert (Path(trainer.log_dir) / "samples_step2.png").is_file()


class ReplayGenerator(TinyGenerator):
    """Returns given images in order: replays what the DDP ranks generated, in one process."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images, self.offset = images, 0

    @torch.no_grad()
    def sample(self, num_samples, **kwargs):
        out = self.images[self.offset : self.offset + num_samples]
        self.offset += num_samples
        return out


def test_fid_under_ddp_splits_samples_and_syncs_the_metric(tmp_path, ddp_run) -> None:
    """A real 2-process DDP fit (CPU, gloo; ddp_fid_script.py, run by the ddp_run fixture of conftest.py): each
    rank generates half the samples with its own noise, both ranks get the same FID, and it equals the FID of all
    those samples in a single process."""
    out, cache = ddp_run / "fid", ddp_run / "fid" / "cache"
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [len(r["images"]) for r in ranks] == [16, 16]  # 32 samples split over 2 ranks
    assert not torch.equal(ranks[0]["images"], ranks[1]["images"])  # seed + rank: different noise
    assert ranks[0]["history"] == ranks[1]["history"] and [s for s, _ in ranks[0]["history"]] == [2]
    ddp_fid = ranks[0]["history"][0][1]

    replay = ReplayGenerator(torch.cat([ranks[0]["images"], ranks[1]["images"]]))
    single = FIDCallback(num_samples=32, batch_size=16, solver_steps=3, feature_extractor="fashion_mnist",
                         num_reference=200, cache_dir=str(cache), every_n_steps=2, on_train_end=False)
    make_trainer(tmp_path, [single], max_steps=2).fit(replay, datamodule=datamodule())
    assert single.reference_from_cache is True  # the statistics rank 0 cached
    assert single.history[0][1] == pytest.approx(ddp_fid, rel=1e-4)


@pytest.mark.parametrize("case, stopped, batches", [("even", True, [1, 1]), ("uneven", True, [2, 1]),
                                                   ("uneven_no_signal", False, [2, 1])])
def test_a_stop_flag_on_one_ddp_rank_stops_every_rank_during_an_evaluation(ddp_run, case, stopped, batches) -> None:
    """ddp_fid_script.py's STOPS, each a real 2-process DDP fit (CPU, gloo) whose evaluation one rank's stop flag
    interrupts: both ranks raise SIGTERMException after the same sampling batch, instead of one rank leaving the
    other waiting at the metric's sync (which the script's watchdog would end after STOP_TIMEOUT seconds). Under
    uneven shares rank 1, out of batches, still joins rank 0's reductions, with or without a signal."""
    from ddp_fid_script import STOP_TIMEOUT  # pytest puts tests/ on sys.path

    out = ddp_run / "fid" / "stop" / case
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert [r["batches"] for r in ranks] == batches
    assert all(r["seconds"] < STOP_TIMEOUT for r in ranks)
    assert [r["stopped"] for r in ranks] == [stopped, stopped]
    assert ranks[0]["history"] == ranks[1]["history"]
    assert [s for s, _ in ranks[0]["history"]] == ([] if stopped else [1])


# ------------------------------------------------------------------ what users are told
class DivergedGenerator(TinyGenerator):
    """Generates NaN in every other image, as a model with non-finite weights does."""

    @torch.no_grad()
    def sample(self, num_samples, **kwargs):
        images = super().sample(num_samples, **kwargs)
        images[::2] = float("nan")
        return images


def test_fid_of_nonfinite_samples_is_nan_with_a_warning(tmp_path) -> None:
    fid = fid_callback(tmp_path, compute_kid=True, kid_subset_size=16, on_train_end=True)
    with pytest.warns(UserWarning, match=r"16 of 32 generated images contain NaN or inf values at step 1.*diverged"):
        make_trainer(tmp_path, [fid], max_steps=1).fit(DivergedGenerator(), datamodule=datamodule())
    assert len(fid.history) == 1 and math.isnan(fid.history[0][1])  # not the FID of black images
    assert all(math.isnan(v) for v in fid.kid_history[0][1:])
    assert fid.best() is None


def test_sample_grid_warns_about_nonfinite_images(tmp_path) -> None:
    grids = SampleGridCallback(every_n_steps=100, num_samples=4, solver_steps=2)
    with pytest.warns(UserWarning, match=r"2 of 4 generated images contain NaN or inf.*diverged"):
        make_trainer(tmp_path, [grids], max_steps=1).fit(DivergedGenerator(), datamodule=datamodule())
    assert grids.last_grid is not None  # the grid is still made, with the diverged images black


@pytest.mark.parametrize("callback", [FIDCallback, SampleGridCallback])
def test_an_unknown_solver_names_the_choices(callback) -> None:
    with pytest.raises(ValueError, match=r"solver='rk4'.*\"ddim\" or \"ddpm\" or \"dpmpp_2m\" or \"euler\" or \"heun\""):
        callback(solver="rk4")


def test_warns_up_front_when_evaluation_dwarfs_training(tmp_path) -> None:
    """5,000 DDIM-50 samples after 3 steps of batch 8: 250,000 network evaluations vs 72."""
    fid = fid_callback(tmp_path, num_samples=5000, solver_steps=50)
    fid.evaluate = lambda *args, **kwargs: None  # the warning is the point, not the hour of sampling
    with pytest.warns(UserWarning) as caught:
        make_trainer(tmp_path, [fid], max_steps=3).fit(TinyGenerator(), datamodule=datamodule())
    message = next(str(w.message) for w in caught if "network evaluations" in str(w.message))
    assert "5,000 images with DDIM-50 1 time(s): 250,000 network evaluations" in message
    assert "3,472x the training's 72 (3 steps x batch 8 x 3 for forward and backward)" in message
    assert "far longer than the training" in message
    for fix in ("num_samples (now 5,000)", "solver_steps (now 50)", "every_n_steps", "on_train_end: false"):
        assert fix in message

    quiet = fid_callback(tmp_path, num_samples=64, solver_steps=5, every_n_steps=3)  # 64 x 5 = 320 < 10 x 72
    assert quiet.cost_warning(make_trainer(tmp_path, [quiet], max_steps=3), TinyGenerator(), 8) is None


def test_evaluation_shows_a_progress_bar(tmp_path, capsys) -> None:
    fid = fid_callback(tmp_path, num_samples=32, batch_size=8, on_train_end=True)
    make_trainer(tmp_path, [fid], max_steps=1, enable_progress_bar=True).fit(TinyGenerator(), datamodule=datamodule())
    err = capsys.readouterr().err
    import re

    assert re.search(r"fid: DDIM-3: +\d+%.* \d+/32 \[\d\d:\d\d<\d\d:\d\d", err), err  # done/total [elapsed<left]


def test_validate_says_the_fid_it_logged_and_fit_does_not(tmp_path, caplog) -> None:
    """The validate results table shows what the module logs: the FID, logged to the loggers at its true step, is
    said in a line of its own outside a fit (during one it would repeat every evaluation)."""
    import logging

    fid = fid_callback(tmp_path, num_samples=32, batch_size=16, on_train_end=True, on_validation=True)
    module = TinyGenerator()
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [fid], max_steps=1).fit(module, datamodule=datamodule())
    assert "fid =" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [fid], limit_val_batches=1).validate(module, datamodule=datamodule())
    step, value = fid.history[-1]
    assert f"fid = {value:.4g} at step {step} (32 samples, DDIM-3)" in caplog.text


@pytest.mark.parametrize("make", [lambda: FIDCallback(feature_extractor="fashion_mnist"), SampleGridCallback],
                         ids=["fid", "samples"])
def test_sampling_callbacks_refuse_a_sharded_strategy_before_any_work(make) -> None:
    """Sampling calls the backbone outside FSDP's wrapper, where each rank holds shards: stop at setup, say what to do."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match=r"cannot sample under FSDPStrategy.*null.*--ckpt_path"):
        make().setup(trainer, nn.Linear(2, 2), "fit")


@pytest.mark.parametrize("callback", [FIDCallback, SampleGridCallback])
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"eta": -1.0}, r"eta must be a number in \[0, 1\], got -1.0"),
    ({"eta": 1.5}, r"eta must be a number in \[0, 1\], got 1.5"),
    ({"solver": "ddpm", "eta": 1.0}, "eta applies to the ddim solver only"),
    ({"solver_steps": 1}, r"solver_steps must be an integer of at least 2, got 1"),
])
def test_generation_settings_wrong_in_themselves_fail_at_construction(callback, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        callback(**kwargs)


class NoSample(pl.LightningModule):
    """A user's module without ``sample()``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def training_step(self, batch, batch_idx):
        return self.scale**2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def tiny_diffusion():
    from lightning_speed.backbones import UNet
    from lightning_speed.module import DiffusionModule

    unet = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                attention_resolutions=(), num_heads=1, num_timesteps=100)
    return DiffusionModule(unet, num_timesteps=100, image_shape=(1, 8, 8))


def tiny_conditional_without_dropout():
    from lightning_speed.backbones import UNet
    from lightning_speed.module import DiffusionModule

    unet = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                attention_resolutions=(), num_heads=1, num_timesteps=100, num_classes=3)
    return DiffusionModule(unet, num_timesteps=100, image_shape=(1, 8, 8), num_classes=3, label_dropout=0.0)


@pytest.mark.parametrize("callback", [
    lambda tmp_path, **kw: fid_callback(tmp_path, reference_images=torch.zeros(4, 1, 8, 8, dtype=torch.uint8), **kw),
    lambda tmp_path, **kw: SampleGridCallback(**kw),
], ids=["fid", "samples"])
@pytest.mark.parametrize(("make", "kwargs", "error", "match"), [
    (tiny_diffusion, {"solver_steps": 250}, ValueError, r"Callback: solver_steps must be an integer from 2 to T = 100"),
    (tiny_diffusion, {"sample_kwargs": {"guidance": 2.0}}, TypeError,
     r"sample\(\) has no argument guidance; use its names: .*guidance_scale"),
    (NoSample, {}, TypeError, "NoSample has no sample"),
    (tiny_conditional_without_dropout, {"sample_kwargs": {"guidance_scale": 4.0}}, ValueError,
     r"guidance_scale=4 mixes in .* never trains \(label_dropout is 0\)"),
])
def test_sampling_callbacks_check_the_module_before_training(tmp_path, callback, make, kwargs, error, match) -> None:
    trainer = make_trainer(tmp_path, [callback(tmp_path, **kwargs)], max_steps=2)
    with pytest.raises(error, match=match):
        trainer.fit(make(), train_dataloaders=DataLoader(TensorDataset(torch.zeros(4, 1, 8, 8)), batch_size=2))
    assert trainer.global_step == 0


@pytest.mark.parametrize(("shape", "extractor"), [((3, 32, 32), FlatFeatures()), ((1, 16, 16), "fashion_mnist")],
                         ids=["channels", "resolution"])
def test_reference_images_of_another_shape_fail_in_setup(tmp_path, shape, extractor) -> None:
    references = torch.zeros(4, *shape, dtype=torch.uint8)
    fid = fid_callback(tmp_path, reference_images=references, feature_extractor=extractor)
    trainer = make_trainer(tmp_path, [fid], max_steps=2)
    with pytest.raises(ValueError, match=rf"reference images are {'x'.join(map(str, shape))} .* generates 1x32x32"):
        trainer.fit(TinyGenerator(), train_dataloaders=DataLoader(TensorDataset(torch.zeros(4, 1, 32, 32)), batch_size=2))
    assert trainer.global_step == 0


# ------------------------------------------------------------------ bad settings fail before any work
@pytest.mark.parametrize("callback", [FIDCallback, SampleGridCallback])
@pytest.mark.parametrize(("sample_kwargs", "error", "match"), [
    ({"batch_size": 0}, ValueError, r"Callback: sample_kwargs.batch_size must be an integer of at least 1, got 0"),
    ({"batch_size": 2.5}, TypeError, r"sample_kwargs.batch_size must be an integer, got 2.5"),
    ({"guidance_scale": "4"}, TypeError, r"sample_kwargs.guidance_scale must be a number, got '4'"),
    ({"guidance_scale": float("nan")}, ValueError, r"sample_kwargs.guidance_scale must be a finite number"),
    ({"solver": "ddpm"}, ValueError, r"sample_kwargs=\{'solver': 'ddpm'\}\): the callback passes solver to sample\(\) "
                                     r"itself; remove them from sample_kwargs: solver: use the callback's own solver"),
    ({"generator": None, "noise": None}, ValueError, r"passes generator, noise to sample\(\) itself.*from seed"),
    (["guidance_scale", 4.0], TypeError, r"sample_kwargs must map argument names of pl_module.sample to values"),
])
def test_sample_kwargs_are_checked_at_construction(callback, sample_kwargs, error, match) -> None:
    """Found at construction (the CLI's parse), not by the first evaluation after training."""
    with pytest.raises(error, match=match):
        callback(sample_kwargs=sample_kwargs)


def test_sample_kwargs_within_range_are_kept() -> None:
    made = FIDCallback(sample_kwargs={"batch_size": 8, "guidance_scale": 4, "labels": None})
    assert made.sample_kwargs == {"batch_size": 8, "guidance_scale": 4.0, "labels": None}
    assert FIDCallback(sample_kwargs={"batch_size": None}).sample_kwargs == {"batch_size": None}


class NeedsLabels(TinyGenerator):
    """A user's ``sample`` with a required keyword the callback does not pass: it must come from sample_kwargs."""

    @torch.no_grad()
    def sample(self, num_samples, *, solver, solver_steps, generator, labels):
        return super().sample(num_samples, solver=solver, solver_steps=solver_steps, generator=generator)


@pytest.mark.parametrize("callback", [
    lambda tmp_path, **kw: fid_callback(tmp_path, reference_images=torch.zeros(4, 1, 32, 32, dtype=torch.uint8), **kw),
    lambda tmp_path, **kw: SampleGridCallback(solver_steps=2, num_samples=4, **kw),
], ids=["fid", "samples"])
def test_sample_kwargs_are_bound_against_sample_in_setup(tmp_path, callback) -> None:
    """The call the callback will make is bound against the module's sample() before the first training step."""
    trainer = make_trainer(tmp_path, [callback(tmp_path)], max_steps=2)
    with pytest.raises(TypeError, match=r"NeedsLabels.sample\(\) cannot be called as this callback calls it, "
                                        r"sample\(num_samples, solver, solver_steps, generator\): missing a required "
                                        r"argument: 'labels'.*extra arguments come from sample_kwargs \(now \{\}\)"):
        trainer.fit(NeedsLabels(), train_dataloaders=DataLoader(TensorDataset(torch.zeros(4, 1, 32, 32)), batch_size=2))
    assert trainer.global_step == 0
    # given through sample_kwargs, the same module binds
    fine = callback(tmp_path, sample_kwargs={"labels": None})
    fine._check_module(NeedsLabels())


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"reference_split": ""}, TypeError, r"reference_split must name a split of the datamodule, e.g. 'test', got ''"),
    ({"num_reference": 0}, ValueError, r"num_reference must be an integer of at least 2, got 0.*null: the whole split"),
    ({"num_reference": 1}, ValueError, r"num_reference must be an integer of at least 2, got 1"),
    ({"num_reference": 100.0}, TypeError, r"num_reference must be an integer, got 100.0"),
    ({"compute_kid": True, "kid_subset_size": 0}, ValueError, r"kid_subset_size must be an integer of at least 2, got 0"),
    ({"compute_kid": True, "kid_subset_size": 1}, ValueError, r"kid_subset_size must be an integer of at least 2, got 1"),
    ({"num_samples": 2.5}, TypeError, r"num_samples must be an integer, got 2.5 \(float\)"),
    ({"num_samples": 1}, ValueError, r"num_samples must be an integer of at least 2, got 1"),
    ({"batch_size": 1.5}, TypeError, r"batch_size must be an integer, got 1.5 \(float\)"),
    ({"batch_size": 0}, ValueError, r"batch_size must be an integer of at least 1, got 0"),
    ({"every_n_steps": 2.0}, TypeError, r"every_n_steps must be an integer, got 2.0"),
    ({"every_n_steps": 0}, ValueError, r"every_n_steps must be an integer of at least 1, got 0"),
])
def test_fid_settings_fail_at_construction_naming_the_argument(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        FIDCallback(feature_extractor="fashion_mnist", **kwargs)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"nrow": -2}, ValueError, r"nrow must be an integer of at least 1, got -2.*null: about the square root"),
    ({"nrow": 0}, ValueError, r"nrow must be an integer of at least 1, got 0"),
    ({"nrow": 2.0}, TypeError, r"nrow must be an integer, got 2.0"),
    ({"num_samples": 2.5}, TypeError, r"num_samples must be an integer, got 2.5 \(float\)"),
    ({"num_samples": 0}, ValueError, r"num_samples must be an integer of at least 1, got 0"),
    ({"every_n_steps": 0}, ValueError, r"every_n_steps must be an integer of at least 1, got 0"),
])
def test_sample_grid_settings_fail_at_construction_naming_the_argument(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        SampleGridCallback(**kwargs)


def test_sample_grid_nrow_default_and_given() -> None:
    assert SampleGridCallback(num_samples=9).nrow == 3
    assert SampleGridCallback(num_samples=10).nrow == 4
    assert SampleGridCallback(num_samples=9, nrow=9).nrow == 9


def test_guidance_in_sample_kwargs_needs_a_class_conditional_module() -> None:
    """sample() refuses guidance on an unconditional model only when it is called: the callbacks say so at setup."""
    module = TinyGenerator()
    callback = SampleGridCallback(solver_steps=2, num_samples=4, sample_kwargs={"guidance_scale": 4.0})
    module.num_classes = None
    with pytest.raises(ValueError, match=r"SampleGridCallback: sample_kwargs.guidance_scale=4 needs a class-conditional "
                                         r"model, but TinyGenerator is unconditional"):
        callback._check_module(module)
    SampleGridCallback(solver_steps=2, num_samples=4, sample_kwargs={"guidance_scale": 1.0})._check_module(module)
    module.num_classes = 10
    callback._check_module(module)


def test_reference_split_is_checked_against_the_datamodule(tmp_path) -> None:
    """Our datamodules have 'train' and 'test': another name fails at setup, naming reference_split; a datamodule of
    the user's own may have other splits, which the constructor does not refuse."""
    callback = fid_callback(tmp_path, reference_split="val")
    trainer = make_trainer(tmp_path, [callback], max_steps=2)
    with pytest.raises(ValueError, match=r"reference_split 'val'; choose one of 'train', 'test'"):
        trainer.fit(TinyGenerator(), datamodule=datamodule())
    assert trainer.global_step == 0


def test_too_few_images_for_the_feature_dimension_warn_at_setup(tmp_path) -> None:
    """32 generated and 200 real images in the 256-d Fashion-MNIST features: singular covariances, a warning
    naming both counts before training; in 8-d features the same counts are quiet, and so are 300 of each in 256-d."""
    fid = fid_callback(tmp_path, every_n_steps=None, on_train_end=False)
    with pytest.warns(UserWarning, match=r"32 generated and 200 real images in 256-d features: .*not a meaningful"):
        make_trainer(tmp_path, [fid], max_steps=1).fit(TinyGenerator(), datamodule=datamodule())
    assert fid.sample_count_warning(8, 200) is None
    assert "8 real" in fid.sample_count_warning(256, 8) and "generated" in fid.sample_count_warning(256, 8)
    assert fid_callback(tmp_path, num_samples=300).sample_count_warning(256, 300) is None


# ------------------------------------------------------------------ evaluations independent of each other and of training
def test_an_interrupted_evaluation_leaves_nothing_in_the_next(tmp_path) -> None:
    """A failure mid-way (out of memory, a stop in a notebook) must not leave its first batches in the next FID."""
    fid = fid_callback(tmp_path, compute_kid=True, kid_subset_size=16, on_train_end=False)
    model = TinyGenerator()
    trainer = make_trainer(tmp_path, [fid], max_steps=1)
    trainer.fit(model, datamodule=datamodule())
    clean = fid.evaluate(trainer, model)
    calls = []

    def second_batch_fails(num_samples, **kwargs):
        calls.append(num_samples)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return TinyGenerator.sample(model, num_samples, **kwargs)

    model.sample = second_batch_fails
    with pytest.raises(RuntimeError, match="out of memory"):
        fid.evaluate(trainer, model)
    assert fid.evaluate(trainer, model) == pytest.approx(clean)
    assert fid.kid_history[-1][1:] == pytest.approx(fid.kid_history[0][1:])


def test_kid_is_reproducible_and_leaves_the_training_random_stream_alone(tmp_path) -> None:
    """KID's random subsets come from the callback's seed: the same weights give the same KID (on every rank), and an
    evaluation does not change the random numbers training draws next."""
    fid = fid_callback(tmp_path, compute_kid=True, kid_subset_size=16, on_train_end=False)
    model = TinyGenerator()
    trainer = make_trainer(tmp_path, [fid], max_steps=1)
    trainer.fit(model, datamodule=datamodule())
    torch.manual_seed(123)
    state = torch.get_rng_state()
    fid.evaluate(trainer, model)
    assert torch.equal(torch.get_rng_state(), state)
    fid.evaluate(trainer, model)
    assert fid.kid_history[0][1:] == fid.kid_history[1][1:]


@pytest.mark.parametrize("rank", [0, 3])
def test_fewer_samples_than_ranks_fail_at_setup_on_every_rank(tmp_path, rank) -> None:
    """Ranks without a sample would skip the cross-rank sum the others wait in: every rank stops at setup."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(strategy=object(), world_size=4, global_rank=rank)
    with pytest.raises(ValueError, match=r"num_samples=3 .* 4 ranks"):
        fid_callback(tmp_path, num_samples=3).setup(trainer, TinyGenerator(), "fit")


@pytest.mark.parametrize("ema_first", [True, False])
def test_fid_at_validation_without_ema_uses_training_weights_in_either_callback_order(tmp_path, ema_first) -> None:
    ema = EMAWeightAveraging(decay=0.5)
    fid = fid_callback(tmp_path, on_validation=True, on_train_end=False, num_samples=8, batch_size=8, use_ema=False)
    seen = {}

    class Probe(pl.Callback):
        def on_validation_epoch_start(self, trainer, pl_module):  # before EMA's swap
            seen[trainer.global_step] = (float(pl_module.scale), float(ema._average_model.module.scale))

    callbacks = [Probe(), ema, fid] if ema_first else [Probe(), fid, ema]
    model = TinyGenerator()
    trainer = make_trainer(tmp_path, callbacks, max_steps=4, limit_val_batches=1, val_check_interval=2)
    trainer.fit(model, datamodule=datamodule())
    used = dict(model.sampled_with)
    assert set(used) == set(seen) == {2, 4}
    for step, (raw, averaged) in seen.items():
        assert used[step] == pytest.approx(raw) and abs(raw - averaged) > 1e-3


@pytest.mark.parametrize("order", ["ema_first", "fid_first", "lightning_ema_last"])
def test_fid_at_train_end_without_ema_uses_training_weights_in_either_callback_order(tmp_path, order) -> None:
    """At train end the EMA callback copies its average into the module; ours keeps the training weights, which an
    evaluation with use_ema=False puts back in for itself. Lightning's, listed after FIDCallback, copies later."""
    ema = EMAWeightAveraging(decay=0.5) if order == "lightning_ema_last" else OurEMA(decay=0.5)
    fid = fid_callback(tmp_path, num_samples=8, batch_size=8, use_ema=False)
    seen = {}

    class Probe(pl.Callback):
        def on_train_end(self, trainer, pl_module):  # first: before any copy
            seen["raw"] = float(pl_module.scale.detach())
            seen["averaged"] = float(ema._average_model.module.scale.detach())

    callbacks = [Probe(), ema, fid] if order == "ema_first" else [Probe(), fid, ema]
    model = TinyGenerator()
    make_trainer(tmp_path, callbacks, max_steps=4).fit(model, datamodule=datamodule())
    assert abs(seen["raw"] - seen["averaged"]) > 1e-3
    assert model.sampled_with == [(4, pytest.approx(seen["raw"]))] and [s for s, _ in fid.history] == [4]
    assert float(model.scale.detach()) == pytest.approx(seen["averaged"])  # the module ends with the average


@pytest.mark.parametrize("ema_first", [True, False])
def test_sample_grid_at_train_end_without_ema_uses_training_weights_in_either_callback_order(tmp_path, ema_first):
    ema, grids = OurEMA(decay=0.5), SampleGridCallback(every_n_steps=100, num_samples=4, solver_steps=2, use_ema=False)
    seen = {}

    class Probe(pl.Callback):
        def on_train_end(self, trainer, pl_module):  # first: before any copy
            seen["raw"] = float(pl_module.scale.detach())
            seen["averaged"] = float(ema._average_model.module.scale.detach())

    model = TinyGenerator()
    callbacks = [Probe(), ema, grids] if ema_first else [Probe(), grids, ema]
    make_trainer(tmp_path, callbacks, max_steps=4).fit(model, datamodule=datamodule())
    assert abs(seen["raw"] - seen["averaged"]) > 1e-3
    assert model.sampled_with == [(4, pytest.approx(seen["raw"]))]
    with pytest.raises(ValueError, match=r"SampleGridCallback\(use_ema=False\) .* EMAWeightAveraging comes before it"):
        lightnings = SampleGridCallback(every_n_steps=100, num_samples=4, solver_steps=2, use_ema=False)
        make_trainer(tmp_path, [EMAWeightAveraging(decay=0.5), lightnings]).fit(TinyGenerator(), datamodule=datamodule())


@pytest.mark.parametrize("make", [FIDCallback, SampleGridCallback])
def test_a_module_of_ones_own_with_a_flow_strategy_samples_as_a_flow(tmp_path, make) -> None:
    """No ``process`` attribute, but a TimestepStrategy of a flow: euler by default, a DDPM solver refused at setup."""
    from lightning_speed.flow import FlowSchedule
    from lightning_speed.timesteps import TimestepStrategy

    class OwnFlow(TinyGenerator):
        def __init__(self) -> None:
            super().__init__()
            self.timesteps = TimestepStrategy(FlowSchedule(3.0))

    real = torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    settings = dict(solver_steps=3) if make is SampleGridCallback else dict(
        num_samples=8, batch_size=8, solver_steps=3, feature_extractor="fashion_mnist", reference_images=real,
        cache_dir=str(tmp_path))
    callback = make(**settings)
    callback.setup(make_trainer(tmp_path, [callback]), OwnFlow(), "fit")
    assert callback.solver == "euler"
    with pytest.raises(ValueError, match=r"solver 'ddim' samples a ddpm model but this model is a flow model"):
        make(**settings, solver="ddim").setup(make_trainer(tmp_path, []), OwnFlow(), "fit")
    plain = make(**settings)
    plain.setup(make_trainer(tmp_path, [plain]), TinyGenerator(), "fit")
    assert plain.solver == "ddim"  # a module that names no process samples as a DDPM


@pytest.mark.parametrize("make", [FIDCallback, SampleGridCallback])
def test_a_flow_solver_for_a_module_that_names_no_process_is_refused_at_setup(tmp_path, make) -> None:
    """Such a module samples as a DDPM: euler would fail at the first evaluation, after the training steps before it.
    A module that states ``process = 'flow'`` takes it; a DiffusionModule always names its process."""
    real = torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    settings = dict(solver="euler", solver_steps=3) if make is SampleGridCallback else dict(
        solver="euler", num_samples=8, batch_size=8, solver_steps=3, feature_extractor="fashion_mnist",
        reference_images=real, cache_dir=str(tmp_path))
    model, trainer = TinyGenerator(), make_trainer(tmp_path, [make(**settings)])
    with pytest.raises(ValueError, match=rf"{make.__name__}\(solver='euler'\): euler integrates a flow, but "
                                         r"TinyGenerator names no process .* samples as a DDPM: use 'ddim' or "
                                         r"'ddpm' or 'dpmpp_2m', or .* self.process = 'flow'"):
        trainer.fit(model, datamodule=datamodule())
    assert trainer.global_step == 0 and model.steps_run == 0

    class NamedFlow(TinyGenerator):
        process = "flow"

    make(**settings).setup(make_trainer(tmp_path, []), NamedFlow(), "fit")
    with pytest.raises(ValueError, match=r"solver 'euler' samples a flow model but this model is a ddpm model"):
        make(**{**settings, "solver_steps": 2}).setup(make_trainer(tmp_path, []), tiny_diffusion(), "fit")


def test_fid_at_train_end_without_ema_after_lightnings_ema_is_refused_at_setup(tmp_path) -> None:
    """Lightning's EMA callback keeps no copy of the training weights when it copies its average in at train end."""
    fid = fid_callback(tmp_path, use_ema=False)
    trainer = make_trainer(tmp_path, [EMAWeightAveraging(decay=0.5), fid])
    with pytest.raises(ValueError, match=r"FIDCallback\(use_ema=False\) .* EMAWeightAveraging comes before it .* "
                                         r"lightning_speed.callbacks.EMAWeightAveraging .* on_train_end=False"):
        trainer.fit(TinyGenerator(), datamodule=datamodule())
    assert trainer.global_step == 0


def test_streamed_reference_batches_of_another_shape_fail_in_setup(tmp_path) -> None:
    """The datamodule's reference_batches (32x32) against a model generating 16x16 images: stopped before training."""
    model = TinyGenerator()
    model.image_shape = (1, 16, 16)
    fid = fid_callback(tmp_path, on_train_end=False)
    trainer = make_trainer(tmp_path, [fid], max_steps=2)
    with pytest.raises(ValueError, match=r"reference images are 1x32x32 .* generates 1x16x16"):
        trainer.fit(model, datamodule=datamodule())
    assert trainer.global_step == 0
