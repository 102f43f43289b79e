"""DiffusionModule end to end on the CPU: it learns, it samples, it rejects bad setups early."""

import copy
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_speed import DiffusionModule
from lightning_speed.timesteps import P2Weighting, SpeeD, TimestepStrategy

from _fixtures import blob_loader as loader  # pytest puts tests/ on sys.path
from _fixtures import cpu_trainer as trainer

TESTS = Path(__file__).parent


class TinyBackbone(nn.Module):
    def __init__(self, channels: int = 1, num_classes: int | None = None, out_channels: int | None = None,
                 embedded_timesteps: int = 1000):
        super().__init__()
        self.inp = nn.Conv2d(channels, 16, 3, padding=1)
        self.t_emb = nn.Embedding(embedded_timesteps, 16)
        self.y_emb = nn.Embedding(num_classes + 1, 16) if num_classes else None
        self.out = nn.Conv2d(16, out_channels or channels, 3, padding=1)

    def forward(self, x, t, y=None):
        h = self.inp(x) + self.t_emb(t)[:, :, None, None]
        if y is not None:
            h = h + self.y_emb(y)[:, :, None, None]
        return self.out(torch.relu(h))


def small_unet(channels=1, **kw):
    from lightning_speed.backbones import UNet

    kw = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [], **kw}
    return UNet(in_channels=channels, image_size=8, **kw)


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def _fit_losses(module, steps=120):
    rec = LossRecorder()
    trainer(max_steps=steps, callbacks=[rec]).fit(module, loader())
    return sum(rec.losses[:10]) / 10, sum(rec.losses[-10:]) / 10


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_tiny_fit_loss_goes_down(prediction):
    pl.seed_everything(0)
    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8), prediction=prediction,
                             optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    first, last = _fit_losses(module)
    assert last < 0.8 * first, (first, last)


def test_learned_sigma_fit_and_sampling():
    """learn_sigma: a 2C-channel backbone trains on the hybrid loss, and both solvers generate."""
    pl.seed_everything(0)
    module = DiffusionModule(TinyBackbone(out_channels=2), image_shape=(1, 8, 8), learn_sigma=True,
                             optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    first, last = _fit_losses(module)
    assert last < 0.8 * first, (first, last)
    for solver in ("ddpm", "ddim"):
        imgs = module.sample(3, solver=solver, solver_steps=5, generator=torch.Generator().manual_seed(0))
        assert imgs.shape == (3, 1, 8, 8) and torch.isfinite(imgs).all()


@pytest.mark.parametrize("weight_vlb", [False, True])
def test_time_step_weights_multiply_the_mse_term_only_unless_weight_vlb(weight_vlb):
    """loss = mean(w(t) mse + vlb) by default (official SpeeD), mean(w(t) (mse + vlb)) with weight_vlb."""
    module = DiffusionModule(TinyBackbone(out_channels=2), image_shape=(1, 8, 8), learn_sigma=True,
                             weight_vlb=weight_vlb)
    module.timesteps.install(weighting=P2Weighting())  # w = 1 / (1 + SNR), from 1e-4 to 1
    batch = (torch.rand(8, 1, 8, 8) * 2 - 1, torch.zeros(8, dtype=torch.long))
    torch.manual_seed(3)
    loss = module.training_step(batch, 0)
    torch.manual_seed(3)
    t = module.timesteps.sample(8, "cpu")
    mse, vlb = module.diffusion.training_losses(lambda x, tt: module.backbone(x, tt), batch[0], t)
    w = module.timesteps.weights.weight(t)
    expected = (w * (mse + vlb)).mean() if weight_vlb else (w * mse + vlb).mean()
    assert vlb.abs().min() > 0
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(module.timesteps.last.t, t)  # what the monitor reads


def test_step_returns_the_loss_and_sampling_shapes():
    pl.seed_everything(0)
    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8))
    loss = module.training_step((torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), 0)
    assert loss.shape == () and loss.requires_grad
    record = module.timesteps.last
    assert record.t.dtype == torch.long and record.loss.shape == (4,) and record.weight.shape == (4,)
    imgs = module.sample(5, solver_steps=4, batch_size=2)
    assert imgs.shape == (5, 1, 8, 8) and imgs.min() >= -1 and imgs.max() <= 1
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(module.sample(3, solver="ddpm", solver_steps=4, generator=g1),
                               module.sample(3, solver="ddpm", solver_steps=4, generator=g2))
    assert module.training  # sample() restores the mode


def test_class_conditional_with_guidance():
    pl.seed_everything(0)
    module = DiffusionModule(TinyBackbone(num_classes=3), image_shape=(1, 8, 8), num_classes=3, label_dropout=0.5)
    trainer(max_steps=5).fit(module, loader())
    labels = torch.tensor([0, 1, 2])
    noise = torch.randn(3, 1, 8, 8)
    a = module.sample(3, solver_steps=3, labels=labels, noise=noise, guidance_scale=1.0)
    b = module.sample(3, solver_steps=3, labels=labels, noise=noise, guidance_scale=3.0)
    assert not torch.allclose(a, b)
    dropped = module._drop_labels(torch.zeros(10_000, dtype=torch.long))
    assert (dropped == 3).float().mean().item() == pytest.approx(0.5, abs=0.03)



def test_label_dropout_draws_in_float32_under_half_precision_defaults():
    """precision="bf16-true" makes bf16 the default dtype inside each step; a bf16 uniform would drop labels at
    about 0.102 for label_dropout 0.1. The mask is the float32 draw's: u < label_dropout."""
    module = DiffusionModule(TinyBackbone(num_classes=3), image_shape=(1, 8, 8), num_classes=3, label_dropout=0.1)
    labels = torch.zeros(100_000, dtype=torch.long)
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        dropped = module._drop_labels(labels)
    finally:
        torch.set_default_dtype(previous)
    torch.manual_seed(0)
    assert torch.equal(dropped == 3, torch.rand(labels.shape) < 0.1)

# -- misconfiguration fails before the first step, naming the fix ---------------------------------
@pytest.mark.parametrize("backbone,kwargs,match", [
    (TinyBackbone(channels=1), {"image_shape": (3, 8, 8)}, "cannot process images of shape"),
    (TinyBackbone(embedded_timesteps=1000), {"image_shape": (1, 8, 8), "num_timesteps": 2000},
     "at time steps 0 .. 1999.*num_timesteps"),
    (TinyBackbone(out_channels=1), {"image_shape": (1, 8, 8), "learn_sigma": True},
     r"2C = 2 channels \(prediction and variance\) for learn_sigma.*set its out_channels to 2"),
    (TinyBackbone(out_channels=2), {"image_shape": (1, 8, 8)}, "the data's 1 channels.*out_channels to 1"),
])
def test_backbone_that_cannot_serve_the_model_fails_at_setup(backbone, kwargs, match):
    module = DiffusionModule(backbone, **kwargs)
    with pytest.raises(ValueError, match=match):
        trainer(max_steps=1).fit(module, loader(shape=kwargs["image_shape"]))


def test_backbone_built_for_other_num_timesteps_is_refused():
    """A backbone that states its T (DiT's num_timesteps) must agree with the model's, at construction."""
    backbone = TinyBackbone()
    backbone.num_timesteps = 1000
    with pytest.raises(ValueError, match="num_timesteps=1000 but the model diffuses over 500 steps.*set the backbone"):
        DiffusionModule(backbone, num_timesteps=500)


def test_data_shape_mismatch_names_the_fix():
    class DM(pl.LightningDataModule):
        image_shape = (1, 16, 16)

        def train_dataloader(self):
            return loader(shape=(1, 16, 16))

    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="model.image_shape"):
        trainer(max_steps=1).fit(module, datamodule=DM())


@pytest.mark.parametrize("kwargs,error,match", [
    ({"schedule": "sigmoid"}, ValueError, "Unknown noise schedule"),
    ({"prediction": "score"}, ValueError, "prediction"),
    ({"label_dropout": 1.5}, ValueError, "label_dropout"),
    ({"image_shape": (8, 8)}, ValueError, "image_shape"),
    ({"learn_sigma": "true"}, TypeError, "learn_sigma"),
    ({"lambda_vlb": -1.0}, ValueError, "lambda_vlb"),
    ({"compile_mode": "fast"}, ValueError, "compile_mode 'fast'.*'reduce-overhead'"),
    ({"schedule": [1e-3] * 500}, ValueError, "500 steps but num_timesteps=1000: set num_timesteps to 500"),
    ({"solver_steps": 2000}, ValueError, "solver_steps must be at most num_timesteps = 1000"),
    ({"guidance_scale": 4.0}, ValueError, "model.guidance_scale=4 needs a class-conditional model.*model.num_classes is null"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DiffusionModule(TinyBackbone(), **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"solver": "plms"}, ValueError, "Unknown solver 'plms'"),
    ({"solver_steps": 1001}, ValueError, "solver_steps must be an integer from 2 to T = 1000"),
    ({"solver_steps": 0}, ValueError, "solver_steps must be an integer from 2 to T = 1000 .*got 0"),
    ({"num_samples": 0}, ValueError, "num_samples must be an integer of at least 1, got 0"),
    ({"num_samples": -2}, ValueError, "num_samples must be an integer of at least 1, got -2"),
    ({"batch_size": 0}, ValueError, "batch_size must be an integer of at least 1, got 0"),
    ({"noise": torch.randn(1, 1, 8, 8)}, ValueError, r"noise must be shaped .* = \(2, 1, 8, 8\), got \(1, 1, 8, 8\)"),
    ({"guidance_scale": float("nan")}, ValueError, "guidance_scale must be a finite number, got nan"),
    ({"labels": torch.tensor([3, 4])}, ValueError, r"labels must lie in \[0, 2\] \(or 3, the null label.*got \[4\]"),
    ({"labels": torch.tensor([-1, 0])}, ValueError, r"labels must lie in \[0, 2\].*got \[-1\]"),
    ({"labels": torch.tensor([0])}, ValueError, r"one label per sample, shaped \(2,\), got \(1,\)"),
    ({"labels": torch.tensor([0.0, 1.0])}, TypeError, "labels must be an integer tensor, got torch.float32"),
    ({"noise": torch.full((2, 1, 8, 8), float("nan"))}, ValueError, "noise holds NaN or infinite values"),
    ({"noise": torch.zeros(2, 1, 8, 8, dtype=torch.long)}, TypeError,
     r"noise must be a floating-point tensor .* shaped \(2, 1, 8, 8\), got torch.int64"),
    ({"noise": [[0.0]]}, TypeError, r"noise must be a floating-point tensor .*got list: e.g. torch.randn\(2, 1, 8, 8\)"),
    ({"eta": "0.5"}, TypeError, r"eta must be a number, got '0.5' \(str\); 0: deterministic DDIM"),
    ({"eta": 1.5}, ValueError, r"eta must be a number in \[0, 1\], got 1.5; 0: deterministic DDIM, 1: DDPM's variance"),
])
def test_bad_sample_arguments(kwargs, error, match):
    module = DiffusionModule(TinyBackbone(num_classes=3), image_shape=(1, 8, 8), num_classes=3)
    with pytest.raises(error, match=match):
        module.sample(kwargs.pop("num_samples", 2), **kwargs)


def test_guidance_needs_a_class_conditional_model_in_sample_too():
    """An unconditional model has nothing to guide: guidance_scale != 1 is refused, not silently ignored."""
    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="guidance_scale=3 needs a class-conditional model.*unconditional"):
        module.sample(2, solver_steps=2, guidance_scale=3.0)
    assert module.sample(2, solver_steps=2, guidance_scale=1.0).shape == (2, 1, 8, 8)


def test_sample_accepts_the_null_label():
    """labels == num_classes (the null label) is a legitimate request for unconditional samples."""
    module = DiffusionModule(TinyBackbone(num_classes=3), image_shape=(1, 8, 8), num_classes=3)
    assert module.sample(2, labels=torch.tensor([3, 0]), solver_steps=2).shape == (2, 1, 8, 8)


class Returns(nn.Module):
    """A TinyBackbone whose output goes through ``post`` (a tuple, an integer cast, ...)."""

    def __init__(self, post):
        super().__init__()
        self.inner, self.post = TinyBackbone(), post

    def forward(self, x, t, y=None):
        return self.post(self.inner(x, t, y))


@pytest.mark.parametrize("post,match", [
    (lambda out: (out,), "must return the prediction as a tensor, got tuple"),
    (lambda out: out.round().long(), "floating-point predictions, got torch.int64"),
])
def test_backbone_output_type_is_checked_at_setup(post, match):
    module = DiffusionModule(Returns(post), image_shape=(1, 8, 8))
    with pytest.raises(TypeError, match=match):
        module.setup("fit")


@pytest.mark.parametrize("batch,kwargs,error,match", [
    ({"pixel_values": torch.zeros(2, 1, 8, 8)}, {}, KeyError, r"under 'images'.*'labels'.*got keys \['pixel_values'\]"),
    ((torch.zeros(2, 1, 8, 8, dtype=torch.uint8),), {}, TypeError, r"floating-point tensor in \[-1, 1\], got torch.uint8"),
    ((torch.zeros(2, 1, 16, 16),), {"image_shape": (1, 8, 8)}, ValueError,
     r"shape \(1, 16, 16\).*image_shape is \(1, 8, 8\): set model.image_shape to \[1, 16, 16\]"),
    ((torch.zeros(2, 1, 8, 8),), {"num_classes": 3}, ValueError, "num_classes=3.*holds no labels.*num_classes=None"),
    # float labels would be truncated (0.7 -> class 0) without a word
    ((torch.zeros(2, 1, 8, 8), torch.rand(2)), {"num_classes": 3}, TypeError,
     r"Class labels must be an integer tensor \(0 .. model.num_classes - 1\), got torch.float32"),
    ((torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, dtype=torch.long)), {"num_classes": 3}, ValueError,
     r"labels of shape \(2, 1\) for 2 images: give one integer label per image, shaped \(2,\)"),
    # channels-last images: the fix is a permute, not another image_shape
    ((torch.zeros(2, 16, 16, 1),), {"image_shape": (1, 16, 16)}, ValueError,
     r"shape \(16, 16, 1\) after the batch dimension: channels last.*x.permute\(0, 3, 1, 2\) per batch"),
    ((torch.zeros(2, 8, 8),), {"image_shape": (1, 8, 8)}, ValueError,
     r"\(B, C, H, W\) = \(B, 1, 8, 8\), got a 3-D tensor of shape \(2, 8, 8\).*channel dimension"),
])
def test_bad_batches_name_the_fix(batch, kwargs, error, match):
    """Batch checks read host metadata only (type, dtype, shape): no device sync in the training step."""
    module = DiffusionModule(TinyBackbone(num_classes=3), **kwargs)
    with pytest.raises(error, match=match):
        module.training_step(batch, 0)


# -- class labels: the model's, the backbone's and the data's num_classes, and the labels themselves --------
@pytest.mark.parametrize("backbone,kwargs,match", [
    (lambda: small_unet(num_classes=10), {},
     r"UNet was built with num_classes=10 but the model is unconditional \(model.num_classes is null\).*only ever see "
     r"the null label: set model.num_classes to 10.*model.backbone.init_args.num_classes"),
    (lambda: small_unet(num_classes=5), {"num_classes": 10},
     r"model.num_classes=10 but the backbone UNet was built with num_classes=5.*null label 10.*Set "
     r"model.backbone.init_args.num_classes to 10 \(or model.num_classes to 5\)"),
    (lambda: small_unet(), {"num_classes": 10},
     r"model.num_classes=10 .*UNet was built without num_classes.*set model.backbone.init_args.num_classes to 10"),
])
def test_backbone_num_classes_must_be_the_models(backbone, kwargs, match):
    """A backbone that states its num_classes (UNet, DiT) must agree with the model's, at construction."""
    with pytest.raises(ValueError, match=match):
        DiffusionModule(backbone(), **kwargs)
    assert DiffusionModule(small_unet(num_classes=3), num_classes=3).num_classes == 3
    assert DiffusionModule(TinyBackbone(num_classes=3), num_classes=3).num_classes == 3  # states none: not compared


def test_data_with_more_classes_than_the_model_fails_at_setup():
    class DM(pl.LightningDataModule):
        image_shape, num_classes = (1, 8, 8), 10

        def train_dataloader(self):
            return loader()

    module = DiffusionModule(TinyBackbone(num_classes=3), num_classes=3)
    with pytest.raises(ValueError, match=r"The data has 10 classes \(labels 0 .. 9\) but model.num_classes is 3: set "
                                         r"model.num_classes and the backbone's num_classes.*to 10"):
        trainer(max_steps=1).fit(module, datamodule=DM())


@pytest.mark.parametrize("label,match", [
    (3, r"class label 3 \(the model's null label.*model.num_classes=3 takes labels 0 .. 2: set model.num_classes and "
        r"the backbone's num_classes \(model.backbone.init_args.num_classes\).*at least 4"),
    (9, r"class label 9, but model.num_classes=3 takes labels 0 .. 2.*at least 10"),
    (-1, r"class label -1, but labels must lie in \[0, 2\] \(model.num_classes=3\)"),
])
def test_labels_outside_num_classes_name_the_keys(label, match):
    module = DiffusionModule(TinyBackbone(num_classes=10), image_shape=(1, 8, 8), num_classes=3)
    labels = torch.tensor([0, 1, label, 2])
    with pytest.raises(ValueError, match=match):
        module.training_step((torch.rand(4, 1, 8, 8) * 2 - 1, labels), 0)


def test_labels_beyond_num_classes_fail_in_a_fit_not_deep_in_the_embedding():
    """Fashion-MNIST's labels go to 9: a model of 5 classes fails with the keys to set, not an IndexError, also when
    a later batch brings the first such label (labels on the CPU are checked in every batch: no sync)."""
    x = torch.rand(64, 1, 8, 8) * 2 - 1
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(64) * 3 % 10), batch_size=8)
    module = DiffusionModule(TinyBackbone(num_classes=5), image_shape=(1, 8, 8), num_classes=5)
    with pytest.raises(ValueError, match="training batch holds the class label 9, but model.num_classes=5"):
        trainer(max_steps=4).fit(module, data)
    late = torch.cat([torch.zeros(8, dtype=torch.long), torch.full((8,), 7)])  # first batch fine, second not
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:16], late), batch_size=8)
    module = DiffusionModule(TinyBackbone(num_classes=5), image_shape=(1, 8, 8), num_classes=5)
    with pytest.raises(ValueError, match="training batch holds the class label 7"):
        trainer(max_steps=4).fit(module, data)


# -- the first batch's values: finite, pixels in [-1, 1] ----------------------------------------------
@pytest.mark.parametrize("images,match", [
    (torch.linspace(0, 255, 256).view(4, 1, 8, 8), r"first training batch holds images in \[0, 255\].*in \[-1, 1\].*x / 127.5 - 1"),
    (torch.linspace(-1, 254, 256).view(4, 1, 8, 8), r"holds images in \[-1, 254\].*x / 127.5 - 1"),  # the division forgotten
    (torch.full((4, 1, 8, 8), float("nan")), "first training batch holds NaN or infinite values"),
    (torch.zeros(4, 1, 8, 8).index_fill_(0, torch.tensor([2]), float("inf")), "NaN or infinite values"),
])
def test_first_batch_outside_the_unit_range_is_refused(images, match):
    module = DiffusionModule(TinyBackbone(channels=images.shape[1]), image_shape=tuple(images.shape[1:]))
    with pytest.raises(ValueError, match=match):
        module.training_step((images,), 0)


@pytest.mark.parametrize("images,match", [
    (torch.linspace(0, 1, 256).view(4, 1, 8, 8),
     r"first training batch holds images in \[0, 1\], nothing below 0: this looks like \[0, 1\] data.*x \* 2 - 1"),
    # mean/std normalised (ImageNet's statistics) or latents the module knows nothing of: ambiguous, so a warning
    ((torch.linspace(0, 1, 256).view(4, 1, 8, 8) - 0.45) / 0.226,
     r"holds values in \[-1.99\d*, 2.43\d*\], far outside the \[-1, 1\].*Normalize\(mean=0.5, std=0.5\).*"
     r"LatentDataModule or set module.autoencoder.*--model.check_data_range false"),
])
def test_data_of_a_doubtful_range_warns_once(images, match, recwarn):
    """[0, 1] data (torchvision's ToTensor) and data far beyond [-1, 1] on both sides train, with a warning naming the
    fix; the values are read on the first batch only."""
    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8))
    with pytest.warns(UserWarning, match=match):
        module.training_step((images,), 0)
    recwarn.clear()
    module.training_step((images,), 1)  # read once: the second batch is not read
    assert not _range_warnings(recwarn)


def _range_warnings(recwarn):
    return [w for w in recwarn if "batch holds" in str(w.message)]


def test_unit_range_data_does_not_warn(recwarn):
    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8))
    module.training_step((torch.rand(4, 1, 8, 8) * 2.2 - 1.1,), 0)  # a little beyond [-1, 1]: augmentation, fine
    module.validation_step((torch.zeros(4, 1, 8, 8),), 0)  # all zero says nothing about the range
    assert not _range_warnings(recwarn)


def test_latents_are_exempt_from_the_pixel_range_but_not_from_nan(recwarn):
    """Latent diffusion (an autoencoder on the module or its data module) trains on latents, whose range is
    the autoencoder's; check_data_range=False exempts other data of another range on purpose."""
    latents = torch.linspace(0, 3, 256).view(4, 1, 8, 8)  # one-sided beyond 2: refused as pixels
    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"holds images in \[0, 3\]"):
        module.training_step((latents,), 0)
    module.autoencoder = object()  # what decode() would use; LatentDataModule's autoencoder counts the same
    module.training_step((latents,), 0)
    module._values_checked.clear()  # as a new fit's setup does
    module.training_step((torch.linspace(-4, 4, 256).view(4, 1, 8, 8),), 0)
    module._values_checked.clear()
    with pytest.raises(ValueError, match="NaN or infinite"):
        module.training_step((latents * float("nan"),), 0)
    opted_out = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8), check_data_range=False)
    opted_out.training_step((latents,), 0)
    assert not _range_warnings(recwarn)


def test_bad_range_fails_in_a_fit_before_the_first_optimizer_step():
    x = torch.randint(0, 256, (32, 1, 8, 8), generator=torch.Generator().manual_seed(0)).float()  # a forgotten x / 127.5 - 1
    x[0, 0, 0, :2] = torch.tensor([0.0, 255.0])  # the first batch's range, whatever the draws
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(32, dtype=torch.long)), batch_size=8)
    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8))
    before = copy.deepcopy(module.backbone.state_dict())
    fit = trainer(max_steps=3)
    with pytest.raises(ValueError, match=r"first training batch holds images in \[0, 255\]"):
        fit.fit(module, data)
    assert fit.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in module.backbone.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_values_are_read_once_on_cuda():
    """The value checks cost one sync, on the first batch; later training steps never sync."""
    module = DiffusionModule(TinyBackbone(num_classes=3), image_shape=(1, 8, 8), num_classes=3).cuda()
    batch = (torch.rand(8, 1, 8, 8, device="cuda") * 2 - 1, torch.randint(0, 3, (8,), device="cuda"))
    module.training_step(batch, 0)
    assert module._values_checked == {"training"}  # the first batch was read
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any sync in these steps raises
    try:
        losses = [module.training_step(batch, step) for step in range(1, 4)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(bool(torch.isfinite(loss)) for loss in losses)


def test_checkpoint_loading_names_the_backbone_its_sizes_and_its_T(tmp_path):
    from lightning_speed.checkpoints import CheckpointMismatchError

    fit = trainer(max_steps=1)
    fit.fit(DiffusionModule(TinyBackbone(embedded_timesteps=100), num_timesteps=100, image_shape=(1, 8, 8)),
            loader(n=8, batch_size=8))
    path = tmp_path / "m.ckpt"
    fit.save_checkpoint(path)
    loaded = DiffusionModule.load_from_checkpoint(path, backbone=TinyBackbone(embedded_timesteps=100))
    assert loaded.num_timesteps == 100
    with pytest.raises(TypeError, match="not the backbone.*load_from_checkpoint\\(path, backbone=UNet"):
        DiffusionModule.load_from_checkpoint(path)
    with pytest.raises(CheckpointMismatchError, match="(?s)1 of 5 tensors have other shapes.*backbone.t_emb.weight: checkpoint \\(100, 16\\)"):
        DiffusionModule.load_from_checkpoint(path, backbone=TinyBackbone(embedded_timesteps=1000))
    with pytest.raises(ValueError, match="trained with num_timesteps=100 but this module diffuses over 1000 steps"):
        DiffusionModule.load_from_checkpoint(path, backbone=TinyBackbone(embedded_timesteps=1000), num_timesteps=1000)


def test_a_checkpoint_keeps_the_image_shape_its_data_module_gave(tmp_path):
    """A module built without image_shape takes its data module's at setup; the checkpoint records it, so the loaded
    module samples as the trained one does."""
    class DM(pl.LightningDataModule):
        image_shape = (1, 8, 8)

        def train_dataloader(self):
            return loader(n=8, batch_size=8)

    fit = trainer(max_steps=1)
    fit.fit(DiffusionModule(TinyBackbone()), datamodule=DM())
    fit.save_checkpoint(tmp_path / "m.ckpt")
    loaded = DiffusionModule.load_from_checkpoint(tmp_path / "m.ckpt", backbone=TinyBackbone())
    assert loaded.image_shape == (1, 8, 8) and loaded.sample(2, solver_steps=2).shape == (2, 1, 8, 8)


class StartWeights(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_a_fit_resumed_without_the_ema_continues_from_the_training_weights(tmp_path):
    """An EMA run's checkpoint holds the average as state_dict and the training weights as current_model_state. A fit
    resumed without an averaging callback starts from the training weights and says the average is left behind;
    with the EMA callback nothing is said; loading for sampling still gives the average."""
    from lightning_speed.callbacks import EMAWeightAveraging

    torch.manual_seed(0)
    first = trainer(max_steps=3, callbacks=[EMAWeightAveraging(decay=0.5)])
    first.fit(DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8)), loader(n=16, batch_size=8))
    path = tmp_path / "ema.ckpt"
    first.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    name = "backbone.inp.weight"
    assert not torch.equal(saved["state_dict"][name], saved["current_model_state"][name])  # average, training weights
    for averaging in (False, True):
        start = StartWeights()
        callbacks = [start, EMAWeightAveraging(decay=0.5)] if averaging else [start]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(max_steps=4, callbacks=callbacks).fit(
                DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8)), loader(n=16, batch_size=8), ckpt_path=path)
        said = [w for w in caught if "saved with an EMA" in str(w.message)]
        assert len(said) == (0 if averaging else 1)
        assert torch.equal(start.weights[name], saved["current_model_state"][name])
    loaded = DiffusionModule.load_from_checkpoint(path, backbone=TinyBackbone())
    assert torch.equal(loaded.state_dict()[name], saved["state_dict"][name])


# -- state, compilation, memory format -------------------------------------------------------
def test_checkpoint_keys_do_not_depend_on_strategies():
    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8))
    assert isinstance(module.timesteps, TimestepStrategy) and module.timesteps.prediction == "epsilon"
    keys = set(module.state_dict())
    module.timesteps.install(SpeeD())  # tables of both roles
    assert set(module.state_dict()) == keys


def test_compiled_sampling_matches_eager_and_stays_out_of_the_state():
    """compile_sampling changes how the network runs, not what it computes or what is saved."""
    torch.manual_seed(0)
    backbone = TinyBackbone()
    eager = DiffusionModule(backbone, image_shape=(1, 8, 8))
    compiled = DiffusionModule(backbone, image_shape=(1, 8, 8), compile_sampling=True)
    noise = torch.randn(3, 1, 8, 8)
    expected = eager.sample(3, solver_steps=3, noise=noise)
    torch.testing.assert_close(compiled.sample(3, solver_steps=3, noise=noise), expected, rtol=1e-4, atol=1e-4)
    assert compiled._sample_forward is not None  # the compiled path was really taken
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert len(list(compiled.parameters())) == len(list(backbone.parameters()))


def test_compile_sampling_takes_a_compile_mode(monkeypatch):
    """True compiles in torch.compile's default mode, a mode name in that mode; anything else is refused at once."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: modes.append(kw["mode"]) or fn)
    for value, mode in ((True, "default"), ("reduce-overhead", "reduce-overhead")):
        module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8), compile_sampling=value)
        module.sample(2, solver_steps=2)
        assert modes[-1] == mode
    with pytest.raises(ValueError, match="Unknown compile_sampling 'fast'; choose one of 'default'"):
        DiffusionModule(TinyBackbone(), compile_sampling="fast")
    with pytest.raises(TypeError, match="compile_sampling must be true or false.*or a compile mode"):
        DiffusionModule(TinyBackbone(), compile_sampling=1)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_compiled_training_keeps_keys_and_loss(learn_sigma, caplog):
    """configure_model compiles the forward and the loss as a function: same loss, same state_dict keys. On the CPU
    it says that the first step waits for the compilation, and how to train without."""
    import logging

    torch.manual_seed(0)
    eager = DiffusionModule(TinyBackbone(out_channels=1 + learn_sigma), image_shape=(1, 8, 8), learn_sigma=learn_sigma)
    compiled = DiffusionModule(copy.deepcopy(eager.backbone), image_shape=(1, 8, 8), learn_sigma=learn_sigma,
                               compile_mode="default")
    before = set(compiled.state_dict())
    with caplog.at_level(logging.INFO):
        compiled.configure_model()
    assert "compiling the training step on the CPU" in caplog.text and "--model.compile_mode null" in caplog.text
    assert compiled._compiled_losses is not None
    assert set(compiled.state_dict()) == before and all(k.startswith("backbone.") for k in before)
    assert [n for n, _ in compiled.named_modules()] == [n for n, _ in eager.named_modules()]
    batch = (torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    torch.manual_seed(1)
    expected = eager.training_step(batch, 0)
    torch.manual_seed(1)
    torch.testing.assert_close(compiled.training_step(batch, 0), expected, rtol=1e-5, atol=1e-6)


def test_cuda_graph_modes_are_recognised() -> None:
    """Both torch.compile modes that record CUDA graphs need the per-step marker."""
    from lightning_speed.module import uses_cuda_graphs

    assert uses_cuda_graphs("reduce-overhead") and uses_cuda_graphs("max-autotune")
    for mode in (None, "default", "max-autotune-no-cudagraphs"):
        assert not uses_cuda_graphs(mode)


def test_channels_last_changes_the_layout_not_the_result_and_survives_fit_and_ema():
    """channels_last=True: NHWC weights and training input, the same loss, and a fit with EMA that keeps the layout."""
    from lightning_speed.callbacks import EMAWeightAveraging

    torch.manual_seed(0)
    backbone = small_unet(3, attention_resolutions=[4])
    plain = DiffusionModule(copy.deepcopy(backbone), image_shape=(3, 8, 8))
    nhwc = DiffusionModule(backbone, image_shape=(3, 8, 8), channels_last=True)
    # 3x3 convolutions with several input channels: the weights whose NHWC and NCHW layouts differ.
    convs = [m.weight for m in nhwc.backbone.modules()
             if isinstance(m, nn.Conv2d) and m.weight.shape[1] > 1 and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    seen = []
    nhwc.backbone.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    batch = (torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    torch.manual_seed(1)
    expected = plain.training_step(batch, 0)
    torch.manual_seed(1)
    torch.testing.assert_close(nhwc.training_step(batch, 0), expected, rtol=1e-5, atol=1e-6)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    # A fit with EMA: the trained weights and the average stay NHWC, and a checkpoint loads into an NCHW module.
    ema = EMAWeightAveraging(decay=0.9)
    trainer(max_steps=3, callbacks=[ema]).fit(nhwc, loader(shape=(3, 8, 8)))
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    averaged = [m.weight for m in ema._average_model.module.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in averaged)
    plain.load_state_dict(nhwc.state_dict())
    noise = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(plain.sample(2, solver_steps=2, noise=noise), nhwc.sample(2, solver_steps=2, noise=noise),
                               rtol=1e-4, atol=1e-4)


# -- the README's own-module example -----------------------------------------------------------
def test_readme_example_is_the_tested_file_and_adds_three_lines():
    """README shows tests/external_module_example.py verbatim; SpeeD adds exactly three lines to it."""
    source = (TESTS / "external_module_example.py").read_text()
    readme = (TESTS.parent / "README.md").read_text()
    assert f"```python\n{source}```" in readme
    marked = [line.strip() for line in source.splitlines() if "# SpeeD" in line]
    assert len(marked) == 3
    assert marked[0].startswith("self.timesteps = TimestepStrategy(")
    assert marked[1].startswith("t = self.timesteps.sample(") and marked[2].startswith("return self.timesteps.loss(")
    # Apart from the imports, no other line of the module knows about SpeeD.
    body = [line for line in source.splitlines()
            if ("self.timesteps" in line or "TimestepStrategy" in line) and not line.startswith("from ")]
    assert len(body) == 3


class EveryStepLogging(DiffusionModule):
    """The reference: ``self.log`` on every training step, as Lightning's default usage does."""

    def _logger_writes_this_step(self) -> bool:
        return True


class StopAt(pl.Callback):
    """Tells the fit to stop before the training step of index ``step``; Lightning writes that step's metrics."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        trainer.should_stop = trainer.global_step == self.step


@pytest.mark.parametrize("stop_at,steps_run,steps_written", [(None, 10, [2, 5, 8]), (4, 5, [2, 4])])
def test_train_loss_logged_only_when_written_and_logs_unchanged(tmp_path, monkeypatch, stop_at, steps_run, steps_written):
    """``self.log`` runs only on the steps whose metrics the Trainer writes (every ``log_every_n_steps`` and the
    step at which the fit is told to stop), and the CSV log is what logging on every step writes: the same steps,
    the same values."""
    written = {}
    for name, cls in (("skip", DiffusionModule), ("every", EveryStepLogging)):
        pl.seed_everything(0)
        module = cls(TinyBackbone(), image_shape=(1, 8, 8))
        calls = []
        original = cls.log
        monkeypatch.setattr(cls, "log", lambda self, key, *a, **k: (calls.append(key), original(self, key, *a, **k)))
        logger = pl.loggers.CSVLogger(tmp_path, name=name)
        callbacks = [] if stop_at is None else [StopAt(stop_at)]
        trainer(max_steps=10, logger=logger, log_every_n_steps=3, callbacks=callbacks).fit(module, loader(shuffle=False))
        monkeypatch.undo()
        lines = Path(logger.log_dir, "metrics.csv").read_text().splitlines()
        rows = [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
        written[name] = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
        # Lightning writes after steps 3, 6 and 9 (step indices 2, 5, 8), or up to the stop; no other step logs
        assert calls == ["train/loss"] * (len(steps_written) if name == "skip" else steps_run)
    assert [s for s, _ in written["skip"]] == steps_written
    assert written["skip"] == written["every"]


def _one_cycle(total_steps):
    from functools import partial

    return partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-3, total_steps=total_steps)


@pytest.mark.parametrize(("run", "length"), [
    ({"max_steps": 4}, "trainer.max_steps=4"),
    ({"max_steps": -1, "max_epochs": 2}, r"the run's 4 optimizer steps \(trainer.max_epochs=2\)"),  # 2 batches an epoch
])
def test_a_one_cycle_schedule_shorter_than_the_run_fails_before_the_first_step(run, length):
    """OneCycleLR raises when stepped past total_steps, hours into a run: refused when the optimizer is built."""
    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8), lr_scheduler=_one_cycle(3))
    fit = trainer(**run)
    with pytest.raises(ValueError, match=rf"OneCycleLR\(total_steps=3\) ends before {length} .*total_steps to 4"):
        fit.fit(module, loader(n=8, batch_size=4))
    assert fit.global_step == 0


@pytest.mark.parametrize(("run", "total"), [({"max_steps": 4}, 4), ({"max_steps": -1, "max_epochs": 3}, 6)])
def test_a_one_cycle_schedule_without_a_length_runs_over_the_whole_training(run, total, recwarn):
    """No total_steps (a config that leaves it out): the run's length, so that it anneals exactly by the last step."""
    from functools import partial

    class Rates(pl.Callback):  # the rate each step trains with
        def on_train_batch_start(self, trainer, *args):
            used.append(trainer.optimizers[0].param_groups[0]["lr"])

    used: list[float] = []
    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8),
                             lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-3))
    fit = trainer(callbacks=[Rates()], **run)
    fit.fit(module, loader(n=8, batch_size=4))  # 2 batches an epoch
    assert fit.global_step == total and fit.lr_scheduler_configs[0].scheduler.total_steps == total
    assert used[0] == pytest.approx(1e-3 / 25) and used[-1] == pytest.approx(1e-3 / 25 / 1e4)  # the cycle's ends
    assert not [w for w in recwarn if "OneCycleLR" in str(w.message)]


def test_a_one_cycle_schedule_without_a_length_in_a_run_without_one_is_refused():
    from functools import partial

    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8),
                             lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-3))
    fit = trainer(max_steps=-1, max_epochs=-1)
    with pytest.raises(ValueError, match="OneCycleLR without total_steps .* set trainer.max_steps"):
        fit.fit(module, loader(n=8, batch_size=4))
    assert fit.global_step == 0


def test_a_one_cycle_schedule_longer_than_the_run_warns_and_one_that_fits_is_silent(recwarn):
    fit = trainer(max_steps=4)
    with pytest.warns(UserWarning, match=r"OneCycleLR\(total_steps=8\) is longer .*stops 50% of the way"):
        fit.fit(DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8), lr_scheduler=_one_cycle(8)), loader(n=8, batch_size=4))
    recwarn.clear()
    fit = trainer(max_steps=4)
    fit.fit(DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8), lr_scheduler=_one_cycle(4)), loader(n=8, batch_size=4))
    assert fit.global_step == 4 and not [w for w in recwarn if "OneCycleLR" in str(w.message)]


@pytest.mark.parametrize("given", [True, False])
def test_a_one_cycle_schedule_with_a_one_step_warm_up_is_refused_with_the_fix(given):
    """pct_start x total_steps = 1: torch's OneCycleLR divides by zero in its constructor; named before any step."""
    from functools import partial

    keywords = {"max_lr": 1e-3, "pct_start": 0.05, **({"total_steps": 20} if given else {})}
    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8),
                             lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, **keywords))
    fit = trainer(max_steps=20)
    with pytest.raises(ValueError, match=r"OneCycleLR\(total_steps=20, pct_start=0.05\) has a warm-up of .* = 1 step"
                                         r".*raise pct_start or the run's length"):
        fit.fit(module, loader(n=8, batch_size=4))
    assert fit.global_step == 0


def test_resuming_a_one_cycle_run_to_more_steps_than_its_cycle_is_refused_before_a_step(tmp_path):
    """The saved OneCycleLR length replaces the configured one on resume; torch fails once stepped past it. A run to
    8 steps from a 4-step cycle is refused when the checkpoint loads; resuming to its own length trains on."""
    from functools import partial

    def module():
        return DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8),
                               lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-3, pct_start=0.1))

    first = trainer(max_steps=2)
    first.fit(module(), loader(n=8, batch_size=4))  # a cycle of 2 steps, saved at its end
    ckpt = tmp_path / "two.ckpt"
    first.save_checkpoint(ckpt)
    longer = trainer(max_steps=4)
    with pytest.raises(ValueError, match=r"OneCycleLR anneals over total_steps=2, but this run trains 4 optimizer "
                                         r"steps: torch would fail at step 3.*trainer.max_steps=2"):
        longer.fit(module(), loader(n=8, batch_size=4), ckpt_path=ckpt)
    assert longer.global_step == 0  # refused while the checkpoint loads, before its progress is restored
    same = trainer(max_steps=2)
    same.fit(module(), loader(n=8, batch_size=4), ckpt_path=ckpt)  # nothing left to train, nothing refused
    assert same.global_step == 2


def test_a_checkpoint_of_another_depth_is_named_in_short_when_a_trainer_loads_it(tmp_path):
    """DiT blocks have one shape at every depth: nothing differs in shape, and PyTorch would list every missing key.
    A Trainer loads strictly, so the summary names the counts and a few keys; load_from_checkpoint(strict=False)
    still loads what matches."""
    from lightning_speed.backbones import DiT
    from lightning_speed.checkpoints import CheckpointMismatchError

    def module(depth):
        return DiffusionModule(DiT(image_size=8, in_channels=1, patch_size=4, hidden_size=16, depth=depth, num_heads=2),
                               image_shape=(1, 8, 8))

    first = trainer(max_steps=1)
    first.fit(module(1), loader(n=8, batch_size=8))
    path = tmp_path / "depth1.ckpt"
    first.save_checkpoint(path)
    deeper = trainer(max_steps=2)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)another model configuration: (\d+) of the model's \d+ "
                                                      r"tensors are missing from it\. For example:\n  backbone.blocks.1\."):
        deeper.fit(module(2), loader(n=8, batch_size=8), ckpt_path=path)
    partial = DiffusionModule.load_from_checkpoint(path, backbone=module(2).backbone, strict=False)
    saved = torch.load(path, weights_only=False)["state_dict"]
    first_block = [k for k in saved if k.startswith("backbone.blocks.0.")]
    assert first_block and all(torch.equal(partial.state_dict()[k], saved[k]) for k in first_block)  # what matched
