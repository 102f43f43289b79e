"""DiffusionModule end to end on the CPU: it learns, it samples, it rejects bad setups early."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_speed import DiffusionModule


class TinyBackbone(nn.Module):
    def __init__(self, channels: int = 1, num_classes: int | None = None):
        super().__init__()
        self.inp = nn.Conv2d(channels, 16, 3, padding=1)
        self.t_emb = nn.Embedding(1000, 16)
        self.y_emb = nn.Embedding(num_classes + 1, 16) if num_classes else None
        self.out = nn.Conv2d(16, channels, 3, padding=1)

    def forward(self, x, t, y=None):
        h = self.inp(x) + self.t_emb(t)[:, :, None, None]
        if y is not None:
            h = h + self.y_emb(y)[:, :, None, None]
        return self.out(torch.relu(h))


def loader(n=512, shape=(1, 8, 8), classes=False):
    g = torch.Generator().manual_seed(0)
    # Structured data (a smooth blob per image) that a small net can learn to denoise.
    base = torch.linspace(-1, 1, shape[-1])
    blob = (base[None, :] ** 2 + base[:, None] ** 2).neg().exp() * 2 - 1
    x = blob.expand(n, *shape).clone() + 0.05 * torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


def trainer(**kw):
    kw.setdefault("max_steps", 60)
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", **kw)


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_tiny_fit_loss_goes_down(prediction):
    pl.seed_everything(0)
    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8), prediction=prediction,
                             optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    rec = LossRecorder()
    trainer(max_steps=120, callbacks=[rec]).fit(module, loader())
    first, last = sum(rec.losses[:10]) / 10, sum(rec.losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_step_outputs_and_sampling_shapes():
    pl.seed_everything(0)
    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8))
    out = module.training_step((torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), 0)
    assert set(out) == {"loss", "t", "per_sample_loss", "weight"}
    assert out["t"].dtype == torch.long and out["per_sample_loss"].shape == (4,)
    imgs = module.sample(5, steps=4, batch_size=2)
    assert imgs.shape == (5, 1, 8, 8) and imgs.min() >= -1 and imgs.max() <= 1
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(module.sample(3, steps=4, generator=g1), module.sample(3, steps=4, generator=g2))
    assert module.training  # sample() restores the mode


def test_class_conditional_with_guidance():
    pl.seed_everything(0)
    module = DiffusionModule(TinyBackbone(num_classes=3), image_shape=(1, 8, 8), num_classes=3, label_dropout=0.5)
    trainer(max_steps=5).fit(module, loader(classes=True))
    labels = torch.tensor([0, 1, 2])
    noise = torch.randn(3, 1, 8, 8)
    a = module.sample(3, steps=3, labels=labels, noise=noise, guidance_scale=1.0)
    b = module.sample(3, steps=3, labels=labels, noise=noise, guidance_scale=3.0)
    assert not torch.allclose(a, b)
    dropped = module._drop_labels(torch.zeros(10_000, dtype=torch.long))
    assert (dropped == 3).float().mean().item() == pytest.approx(0.5, abs=0.03)


def test_mismatched_backbone_fails_at_setup():
    module = DiffusionModule(TinyBackbone(channels=1), image_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="cannot process images of shape"):
        trainer(max_steps=1).fit(module, loader(shape=(3, 8, 8)))


def test_data_shape_mismatch_names_the_fix():
    class DM(pl.LightningDataModule):
        image_shape = (1, 16, 16)

        def train_dataloader(self):
            return loader(shape=(1, 16, 16))

    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="model.image_shape"):
        trainer(max_steps=1).fit(module, datamodule=DM())


@pytest.mark.parametrize("kwargs,match", [
    ({"schedule": "sigmoid"}, "Unknown noise schedule"),
    ({"prediction": "score"}, "Unknown prediction"),
    ({"label_dropout": 1.5}, "label_dropout"),
    ({"image_shape": (8, 8)}, "image_shape"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionModule(TinyBackbone(), **kwargs)


def test_checkpoint_keys_do_not_depend_on_strategies():
    from lightning_speed.timesteps.base import TableSampler, TableWeighting

    module = DiffusionModule(TinyBackbone(), image_shape=(1, 8, 8))
    keys = set(module.state_dict())
    module.timestep_sampler = TableSampler(torch.ones(1000))
    module.loss_weighting = TableWeighting(torch.ones(1000))
    assert set(module.state_dict()) == keys


def test_compiled_sampling_matches_eager_and_stays_out_of_the_state():
    """compile_sampling changes how the network runs, not what it computes or what is saved."""
    from lightning_speed.backbones import UNet

    torch.manual_seed(0)
    backbone = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                    attention_resolutions=[])
    eager = DiffusionModule(backbone, image_shape=(1, 8, 8))
    compiled = DiffusionModule(backbone, image_shape=(1, 8, 8), compile_sampling=True)
    noise = torch.randn(3, 1, 8, 8)
    expected = eager.sample(3, steps=3, noise=noise)
    torch.testing.assert_close(compiled.sample(3, steps=3, noise=noise), expected, rtol=1e-4, atol=1e-4)
    assert compiled._sample_forward is not None  # the compiled path was really taken
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert len(list(compiled.parameters())) == len(list(backbone.parameters()))


def test_compiled_module_checkpoints_have_backbone_keys_only():
    """Compiling in setup must not change state_dict keys (a resumed compiled run failed on them)."""
    from lightning_speed.backbones import UNet

    backbone = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=[1], num_res_blocks=1,
                    attention_resolutions=[])
    module = DiffusionModule(backbone, image_shape=(1, 8, 8), compile=True)
    before = set(module.state_dict())
    module.setup("fit")  # wraps the backbone in torch.compile (compiles lazily, on the first call)
    assert set(module.state_dict()) == before and all(k.startswith("backbone.") for k in before)
    # Checkpoints written before the fix also hold "_train_forward._orig_mod.*" copies: they still load.
    old = dict(module.state_dict())
    old.update({"_train_forward._orig_mod." + k[len("backbone."):]: v for k, v in module.state_dict().items()})
    module.load_state_dict(old)


def test_cuda_graph_modes_are_recognised() -> None:
    """Both torch.compile modes that record CUDA graphs need the per-step marker (max-autotune was missed)."""
    from lightning_speed.module import uses_cuda_graphs

    assert uses_cuda_graphs("reduce-overhead") and uses_cuda_graphs("max-autotune")
    for mode in (None, "default", "max-autotune-no-cudagraphs"):
        assert not uses_cuda_graphs(mode)


def test_channels_last_changes_the_layout_not_the_result_and_survives_fit_and_ema():
    """channels_last=True: NHWC weights and training input, the same loss, and a fit with EMA that keeps the layout."""
    import copy

    from lightning_speed.backbones import UNet
    from lightning_speed.callbacks import EMAWeightAveraging

    torch.manual_seed(0)
    backbone = UNet(in_channels=3, image_size=8, base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                    attention_resolutions=[4])
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
    expected = plain.training_step(batch, 0)["loss"]
    torch.manual_seed(1)
    torch.testing.assert_close(nhwc.training_step(batch, 0)["loss"], expected, rtol=1e-5, atol=1e-6)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    # A fit with EMA: the trained weights and the average stay NHWC, and a checkpoint loads into an NCHW module.
    ema = EMAWeightAveraging(decay=0.9)
    trainer(max_steps=3, callbacks=[ema]).fit(nhwc, loader(shape=(3, 8, 8)))
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    averaged = [m.weight for m in ema._average_model.module.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in averaged)
    plain.load_state_dict(nhwc.state_dict())
    noise = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(plain.sample(2, steps=2, noise=noise), nhwc.sample(2, steps=2, noise=noise),
                               rtol=1e-4, atol=1e-4)
