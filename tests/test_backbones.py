"""Backbones: shapes, conditioning, zero-init, validation errors, gradients, compile-ability."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

from lightning_speed.backbones import DiT, DiT_B_2, DiT_S_2, UNet, sinusoidal_embedding

TINY_UNET = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), num_heads=2,
                 image_size=16)
TINY_DIT = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2)


def _unzero(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every all-zero parameter small random values, so the output depends on all inputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _inputs(model: nn.Module, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    size = model.image_size if isinstance(model, UNet) else model.input_size
    x = torch.randn(batch, model.in_channels, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x, t


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(TINY_UNET),
        dict(TINY_UNET, in_channels=3),
        dict(TINY_UNET, in_channels=3, num_classes=10),
        dict(TINY_UNET, channel_mult=(1, 2, 2), attention_resolutions=(16, 4), image_size=16),
        dict(TINY_UNET, channel_mult=(1,), attention_resolutions=()),
    ],
)
def test_unet_output_shape_matches_input(kwargs: dict) -> None:
    model = UNet(**kwargs)
    x, t = _inputs(model)
    y = torch.tensor([0, 5, 10]) if model.num_classes else None
    assert model(x, t, y).shape == x.shape


def test_out_channels_override() -> None:
    x, t = _inputs(UNet(**TINY_UNET, in_channels=3))
    assert UNet(**TINY_UNET, in_channels=3, out_channels=6)(x, t).shape == (3, 6, 16, 16)
    dit = DiT(**TINY_DIT, in_channels=3, out_channels=6)
    x, t = _inputs(dit)
    assert dit(x, t).shape == (3, 6, 8, 8)


@pytest.mark.parametrize("kwargs", [dict(TINY_DIT), dict(TINY_DIT, in_channels=3, num_classes=4)])
def test_dit_output_shape_matches_input(kwargs: dict) -> None:
    model = DiT(**kwargs)
    x, t = _inputs(model)
    y = torch.tensor([0, 1, 4]) if model.num_classes else None
    assert model(x, t, y).shape == x.shape


@pytest.mark.parametrize("make", [lambda: UNet(**TINY_UNET, num_classes=3), lambda: DiT(**TINY_DIT, num_classes=3)])
def test_zero_init_output_is_exactly_zero(make) -> None:
    model = make()
    x, t = _inputs(model)
    assert torch.equal(model(x, t, torch.tensor([0, 1, 3])), torch.zeros_like(x))


@pytest.mark.parametrize("make", [lambda: UNet(**TINY_UNET, num_classes=3), lambda: DiT(**TINY_DIT, num_classes=3)])
def test_output_depends_on_t_and_y_and_null_label_works(make) -> None:
    model = _unzero(make()).eval()
    x, t = _inputs(model)
    y = torch.tensor([0, 1, 2])
    out = model(x, t, y)
    assert not torch.allclose(out, model(x, (t + 137) % 1000, y))
    assert not torch.allclose(out, model(x, t, (y + 1) % 3))
    null = torch.full((3,), 3)
    out_null = model(x, t, null)
    assert torch.isfinite(out_null).all() and not torch.allclose(out, out_null)
    # y=None on a conditional model means "no label" for every sample.
    assert torch.allclose(model(x, t), out_null)


def test_scalar_t_broadcasts() -> None:
    model = _unzero(UNet(**TINY_UNET)).eval()
    x, _ = _inputs(model)
    assert torch.allclose(model(x, torch.tensor(10)), model(x, torch.full((3,), 10)))


def test_num_timesteps_rescales_time() -> None:
    """With T=100, step 10 must be embedded like step 100 of a T=1000 model."""
    a = _unzero(UNet(**TINY_UNET, num_timesteps=100)).eval()
    b = UNet(**TINY_UNET, num_timesteps=1000).eval()
    b.load_state_dict(a.state_dict())
    x, _ = _inputs(a)
    assert torch.allclose(a(x, torch.full((3,), 10)), b(x, torch.full((3,), 100)), atol=1e-5)


def test_sinusoidal_embedding_shape_and_values() -> None:
    emb = sinusoidal_embedding(torch.tensor([0.0, 5.0]), 7)
    assert emb.shape == (2, 7)
    assert torch.equal(emb[0, :3], torch.ones(3)) and torch.equal(emb[0, 3:], torch.zeros(4))
    assert not torch.allclose(emb[0], emb[1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(TINY_UNET, image_size=18, channel_mult=(1, 2, 2)), "divisible by 4"),
        (dict(TINY_UNET, attention_resolutions=(5,)), r"never reaches.*\[16, 8\]"),
        (dict(TINY_UNET, base_channels=12), "multiple of 8"),
        (dict(TINY_UNET, num_heads=3), "num_heads=3"),
        (dict(TINY_UNET, channel_mult=()), "channel_mult"),
        (dict(TINY_UNET, dropout=1.0), "dropout"),
    ],
)
def test_unet_bad_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(TINY_DIT, input_size=9), "not divisible by patch_size"),
        (dict(TINY_DIT, num_heads=3), "divisible by num_heads"),
        (dict(TINY_DIT, hidden_size=30, num_heads=3), "divisible by 4"),
    ],
)
def test_dit_bad_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiT(**kwargs)


@pytest.mark.parametrize("make", [lambda: UNet(**TINY_UNET), lambda: DiT(**TINY_DIT)])
def test_bad_inputs_raise_helpful_errors(make) -> None:
    model = make()
    x, t = _inputs(model)
    size = x.shape[-1]
    with pytest.raises(ValueError, match=rf"expects 1x{size}x{size} images but got 3x{size}x{size}: set in_channels"):
        model(torch.randn(3, 3, size, size), t)
    with pytest.raises(ValueError, match=rf"but got 1x{size + 2}x{size + 2}.*pad"):
        model(torch.randn(3, 1, size + 2, size + 2), t)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(x[0], t)
    with pytest.raises(ValueError, match="expects t of shape"):
        model(x, t[:2])
    with pytest.raises(ValueError, match="without num_classes"):
        model(x, t, torch.zeros(3, dtype=torch.long))


def test_bad_label_shape_raises() -> None:
    model = UNet(**TINY_UNET, num_classes=3)
    x, t = _inputs(model)
    with pytest.raises(ValueError, match="expects y of shape"):
        model(x, t, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("make", [lambda: UNet(**TINY_UNET, num_classes=3), lambda: DiT(**TINY_DIT, num_classes=3)])
def test_gradient_step_trains_from_zero_init(make) -> None:
    torch.manual_seed(0)
    model = make()
    x, t = _inputs(model)
    y = torch.tensor([0, 1, 3])
    target = torch.randn_like(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = (model(x, t, y) - target).pow(2).mean()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model(x, t, y).abs().sum() > 0  # the zero-init output layer has moved


@pytest.mark.parametrize("make", [lambda: UNet(**TINY_UNET, num_classes=3), lambda: DiT(**TINY_DIT, num_classes=3)])
def test_every_parameter_gets_gradient_once_unzeroed(make) -> None:
    model = _unzero(make())
    x, t = _inputs(model)
    model(x, t, torch.tensor([0, 1, 3])).square().mean().backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


def test_dit_unpatchify_inverts_token_layout() -> None:
    """Token n is grid cell (n // g, n % g); each token holds a (p, p, C) patch."""
    model = DiT(**TINY_DIT, in_channels=3)
    x = torch.randn(2, 3, 8, 8)
    g, p = model.grid_size, model.patch_size
    tokens = x.reshape(2, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 3)
    assert torch.equal(model.unpatchify(tokens), x)


def test_dit_presets() -> None:
    small = DiT_S_2(input_size=8, in_channels=3, num_classes=10)
    assert (small.patch_size, len(small.blocks), small.blocks[0].attn.num_heads) == (2, 12, 6)
    assert small.pos_embed.shape == (1, 16, 384) and small.label_embed.embedding.num_embeddings == 11
    assert small.out_channels == 3
    # DiT-B/2 has 130M parameters: check what it asks DiT for instead of building it.
    with mock.patch.object(DiT, "__init__", return_value=None) as init:
        DiT_B_2(input_size=16, in_channels=3, num_classes=10)
    kwargs = init.call_args.kwargs
    assert (kwargs["hidden_size"], kwargs["depth"], kwargs["num_heads"], kwargs["patch_size"]) == (768, 12, 12, 2)
    assert (kwargs["input_size"], kwargs["in_channels"], kwargs["num_classes"]) == (16, 3, 10)


def test_unet_under_bf16_autocast() -> None:
    model = _unzero(UNet(**TINY_UNET, num_classes=3))
    x, t = _inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, torch.tensor([0, 1, 3]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unet_compiles_without_graph_breaks() -> None:
    """fullgraph=True fails on any graph break; aot_eager skips codegen to keep this fast on CPU."""
    torch._dynamo.reset()
    model = _unzero(UNet(**TINY_UNET, num_classes=3)).eval()
    x, t = _inputs(model)
    y = torch.tensor([0, 1, 3])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x, t, y), model(x, t, y), atol=1e-5)


def test_dit_compiles_without_graph_breaks() -> None:
    torch._dynamo.reset()
    model = _unzero(DiT(**TINY_DIT, num_classes=3)).eval()
    x, t = _inputs(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x, t), model(x, t), atol=1e-5)


def test_constructor_is_yaml_friendly() -> None:
    """jsonargparse (LightningCLI) can build the backbones from plain config values."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--model", type=nn.Module)
    cfg = parser.parse_object(
        {"model": {"class_path": "lightning_speed.backbones.UNet",
                   "init_args": {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                                 "attention_resolutions": [8], "image_size": 16, "num_heads": 2}}}
    )
    model = parser.instantiate_classes(cfg).model
    assert isinstance(model, UNet) and len(model.down) == 3
    cfg = parser.parse_object({"model": {"class_path": "lightning_speed.backbones.DiT_S_2",
                                         "init_args": {"input_size": 8, "num_classes": 10}}})
    assert cfg.model.init_args.num_classes == 10
