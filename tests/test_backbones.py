"""Backbones: shapes, conditioning, zero-init, validation errors, gradients, compile-ability, DiT presets."""

from __future__ import annotations

import importlib
from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_speed.backbones import DIT_PRESETS, DiT, DiT_B_2, DiT_S_2, DiTPreset, UNet, dit, sinusoidal_embedding
from lightning_speed.backbones.dit import FeedForward, linear_tanh_gelu

dit_module = importlib.import_module("lightning_speed.backbones.dit")  # the package's ``dit`` is the preset function

TINY_UNET = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), num_heads=2,
                 image_size=16)
TINY_DIT = dict(image_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2)


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
    size = model.image_size
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
        (dict(TINY_DIT, image_size=9), "not divisible by patch_size"),
        (dict(TINY_DIT, num_heads=3), "divisible by num_heads"),
        (dict(TINY_DIT, hidden_size=30, num_heads=3), "divisible by 4"),
    ],
)
def test_dit_bad_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiT(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(mlp_ratio=float("nan")), ValueError, "mlp_ratio must be a positive number, got nan"),
        (dict(mlp_ratio=float("inf")), ValueError, "mlp_ratio must be a positive number, got inf"),
        (dict(mlp_ratio=-1.0), ValueError, "mlp_ratio must be a positive number, got -1.0"),
        (dict(mlp_ratio="4"), TypeError, r"mlp_ratio must be a number, got '4' \(str\)"),
        (dict(mlp_ratio=0.01), ValueError, r"int\(32 \* 0.01\) = 0 hidden units.*at least 0.03125"),
        (dict(num_classes=2.5), TypeError, r"num_classes must be an integer, got 2.5 \(float\)"),
        (dict(num_classes=0), ValueError, "num_classes must be an integer of at least 1, got 0"),
        (dict(num_timesteps=0), ValueError, "num_timesteps must be an integer of at least 1, got 0"),
    ],
)
def test_dit_number_arguments_are_checked(kwargs: dict, error: type, match: str) -> None:
    """Float arguments are finite and positive, integer ones integers: a clear error, not one from int(nan)."""
    with pytest.raises(error, match=match):
        DiT(**TINY_DIT, **kwargs)
    assert DiT(**TINY_DIT, mlp_ratio=0.5).blocks[0].mlp[0].out_features == 16


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
@pytest.mark.parametrize("labels", [torch.tensor([0.0, 1.7, 2.0]), torch.tensor([True, False, True])])
def test_non_integer_labels_raise(make, labels) -> None:
    """A float label would be embedded truncated (1.7 as class 1), a bool one as 0/1: both are refused."""
    model = make()
    x, t = _inputs(model)
    with pytest.raises(TypeError, match="integer class labels"):
        model(x, t, labels)
    model(x, t, labels.long())  # the same labels as integers are taken


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


# -- the DiT preset registry ----------------------------------------------------------------------
# DiT paper (Peebles & Xie 2023), Table 1 and models.py: 256 px ImageNet as 4x32x32 latents, learned
# sigma (8 output channels), 1000 classes plus the null label.
PUBLISHED_MILLIONS = {"DiT-S/2": 33, "DiT-B/2": 130, "DiT-L/2": 458, "DiT-XL/2": 675}


def _dit_parameter_count(size, in_channels: int, out_channels: int, num_classes: int, frequency_dim: int = 256) -> int:
    """DiT's trainable parameters counted layer by layer from the architecture (biases included)."""
    d, p = size.hidden_size, size.patch_size
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    patch_embed = in_channels * p * p * d + d
    time_embed = frequency_dim * d + d + d * d + d
    label_embed = (num_classes + 1) * d
    final = (2 * d * d + 2 * d) + (d * p * p * out_channels + p * p * out_channels)
    return size.depth * block + patch_embed + time_embed + label_embed + final


def _latent_dit(name: str) -> DiT:
    with torch.device("meta"):  # shapes only: XL/2 would need 2.7 GB of float32 weights
        return DiT(name, image_size=32, in_channels=4, learn_sigma=True, num_classes=1000)


def test_preset_literal_lists_exactly_the_registry() -> None:
    assert list(get_args(DiTPreset)) == list(DIT_PRESETS)


@pytest.mark.parametrize("name", list(DIT_PRESETS))
def test_every_preset_has_dits_architecture_size(name: str) -> None:
    model = _latent_dit(name)
    size = DIT_PRESETS[name]
    assert (len(model.blocks), model.blocks[0].attn.num_heads, model.patch_size) == (
        size.depth, size.num_heads, size.patch_size)
    assert model.pos_embed.shape == (1, (32 // size.patch_size) ** 2, size.hidden_size)
    count = sum(p.numel() for p in model.parameters())
    assert count == _dit_parameter_count(size, in_channels=4, out_channels=8, num_classes=1000)


@pytest.mark.parametrize(("name", "millions"), PUBLISHED_MILLIONS.items())
def test_presets_match_published_parameter_counts(name: str, millions: int) -> None:
    """The paper's counts are rounded to 1M; DiT's own count also includes its fixed position table
    (a frozen nn.Parameter there, a buffer here), at most 0.3M for XL/2."""
    count = sum(p.numel() for p in _latent_dit(name).parameters())
    assert count / 1e6 == pytest.approx(millions, rel=0.01)


@pytest.mark.parametrize("name", list(DIT_PRESETS))
def test_every_preset_runs_forward_on_tiny_input(name: str) -> None:
    """Depth 1 keeps the largest widths cheap; two patches per side give 4 tokens."""
    patch = DIT_PRESETS[name].patch_size
    model = _unzero(dit(name, image_size=2 * patch, in_channels=2, learn_sigma=True, depth=1, num_classes=3))
    x, t = _inputs(model, batch=2)
    out = model(x, t, torch.tensor([0, 3]))
    assert out.shape == (2, 4, 2 * patch, 2 * patch) and torch.isfinite(out).all()


def test_learn_sigma_doubles_output_channels() -> None:
    model = DiT(**TINY_DIT, in_channels=3, learn_sigma=True)
    assert (model.out_channels, model.learn_sigma) == (6, True)
    x, t = _inputs(model)
    assert model(x, t).shape == (3, 6, 8, 8)
    assert DiT(**TINY_DIT, in_channels=3, learn_sigma=True, out_channels=6).out_channels == 6
    with pytest.raises(ValueError, match=r"2 \* in_channels = 6 channels, but out_channels=3.*leave out_channels unset"):
        DiT(**TINY_DIT, in_channels=3, learn_sigma=True, out_channels=3)


def test_explicit_sizes_override_the_preset() -> None:
    model = DiT("DiT-B/4", image_size=8, hidden_size=48, depth=1)
    assert (model.patch_size, len(model.blocks), model.blocks[0].attn.num_heads) == (4, 1, 12)
    assert model.pos_embed.shape == (1, 4, 48)
    # No preset: DiT-S/2's sizes.
    plain = DiT(image_size=8)
    assert (plain.patch_size, len(plain.blocks), plain.pos_embed.shape[-1]) == (2, 12, 384)


def test_unknown_preset_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"Unknown DiT preset 'DiT-M/2'; choose one of DiT-S/2, DiT-S/4, .*DiT-XL/8"):
        DiT("DiT-M/2")


def test_preset_patch_must_divide_image_size() -> None:
    with pytest.raises(ValueError, match=r"image_size=12 is not divisible by patch_size=8 of DiT-S/8"):
        DiT("DiT-S/8", image_size=12)


def test_named_aliases_are_their_presets() -> None:
    small = DiT_S_2(image_size=8, in_channels=3, num_classes=10)
    assert (small.preset, small.patch_size, len(small.blocks), small.blocks[0].attn.num_heads) == ("DiT-S/2", 2, 12, 6)
    assert small.pos_embed.shape == (1, 16, 384) and small.label_embed.embedding.num_embeddings == 11
    assert small.out_channels == 3
    with torch.device("meta"):
        base = DiT_B_2(image_size=16, learn_sigma=True)
    assert (base.preset, base.blocks[0].attn.num_heads, base.pos_embed.shape, base.out_channels) == (
        "DiT-B/2", 12, (1, 64, 768), 2)
    with pytest.raises(ValueError, match=r"DiT_S_2 is DiT-S/2; for DiT-B/2 use DiT\(preset='DiT-B/2'\)"):
        DiT_S_2(preset="DiT-B/2")


def test_input_size_is_accepted_as_dits_name_for_image_size() -> None:
    model = DiT(**{**TINY_DIT, "image_size": None}, input_size=8)
    assert model.image_size == model.input_size == 8
    with pytest.raises(ValueError, match="give only image_size"):
        DiT(**TINY_DIT, input_size=16)


def test_preset_from_yaml() -> None:
    """A preset by name through jsonargparse (LightningCLI), and a typo rejected by the parser."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=nn.Module)
    init = {"preset": "DiT-S/4", "in_channels": 1, "image_size": 8, "learn_sigma": True, "depth": 1}
    cfg = parser.parse_object({"model": {"class_path": "lightning_speed.backbones.DiT", "init_args": init}})
    model = parser.instantiate_classes(cfg).model
    assert (model.preset, model.patch_size, len(model.blocks), model.out_channels) == ("DiT-S/4", 4, 1, 2)
    bad = {"model": {"class_path": "lightning_speed.backbones.DiT", "init_args": {**init, "preset": "DiT-S/3"}}}
    with pytest.raises(Exception, match="DiT-S/3"):
        parser.parse_object(bad)


def test_unet_under_bf16_autocast() -> None:
    model = _unzero(UNet(**TINY_UNET, num_classes=3))
    x, t = _inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, torch.tensor([0, 1, 3]))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("backbone", ["UNet", "DiT"])
def test_backbone_cast_to_bf16_runs_in_bf16_and_stays_near_fp32(backbone: str) -> None:
    """A backbone cast to bf16 (as Lightning's bf16-true does) takes fp32 images and time steps: the images are cast to
    the weights' dtype, the time-step sinusoid is computed in fp32 and then cast. Each bf16 rounding errs by at most
    2^-8 relative; over these few layers that stays well under 2^-4 of the output's RMS, and above 2^-12 (bf16 ran)."""
    model = _unzero(UNet(**TINY_UNET, num_classes=3) if backbone == "UNet" else DiT(**TINY_DIT, num_classes=3)).eval()
    x, t = _inputs(model)
    y = torch.tensor([0, 1, 3])
    with torch.no_grad():
        reference = model(x, t, y)
        out = model.to(torch.bfloat16)(x, t, y)
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    rel = float((out.float() - reference).norm() / reference.norm())
    assert 2.0**-12 < rel < 2.0**-4


def _feed_forward(seed: int = 0) -> FeedForward:
    torch.manual_seed(seed)
    return FeedForward(nn.Linear(16, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 16))


@pytest.fixture
def addmm_operands(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.dtype, ...]]:
    """The (bias, mat1, mat2) dtypes of every ``torch._addmm_activation`` call, as passed (before any autocast cast)."""
    operands: list[tuple[torch.dtype, ...]] = []
    real = torch._addmm_activation

    def spy(bias: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, **kwargs: object) -> torch.Tensor:
        operands.append((bias.dtype, mat1.dtype, mat2.dtype))
        return real(bias, mat1, mat2, **kwargs)

    monkeypatch.setattr(torch, "_addmm_activation", spy)
    return operands


def _epilogue_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the epilogue path run on the CPU: its condition without the CUDA part."""
    monkeypatch.setattr(dit_module, "_gelu_epilogue_applies", lambda x: not torch.is_grad_enabled())


def _tanh_gelu_gap() -> float:
    """The largest difference between the exact and the tanh GELU (ATen's CPU kernel for ``_addmm_activation`` is the
    exact form, cuBLASLt's epilogue the tanh one), on a fine grid over the whole range where they differ."""
    z = torch.linspace(-10, 10, 200_001, dtype=torch.float64)
    return float((F.gelu(z) - F.gelu(z, approximate="tanh")).abs().max())


def _tanh_gap_bound(fc2: nn.Linear) -> float:
    """Largest MLP output change from exact against tanh GELU: each hidden unit moves by at most the gap, so an output
    by at most ``gap * max_row sum|W2|``, plus fp32 rounding of the 64-term sums."""
    return _tanh_gelu_gap() * float(fc2.weight.detach().abs().sum(dim=1).max()) + 1e-5


def test_dit_mlp_keeps_the_sequential_state_dict_keys() -> None:
    """Checkpoints written while DiT's MLP was an ``nn.Sequential`` load into FeedForward unchanged."""
    model = DiT(**TINY_DIT)
    assert isinstance(model.blocks[0].mlp, FeedForward)
    plain = nn.Sequential(nn.Linear(32, 128), nn.GELU(approximate="tanh"), nn.Linear(128, 32))
    assert set(model.blocks[0].mlp.state_dict()) == set(plain.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    model.blocks[0].mlp.load_state_dict(plain.state_dict())
    torch.testing.assert_close(model.blocks[0].mlp[0].weight, plain[0].weight, rtol=0, atol=0)


def test_linear_tanh_gelu_is_the_layer_and_gelu_over_leading_dimensions() -> None:
    """One ``_addmm_activation`` call over any leading dimensions: exact GELU on the CPU (to fp32 rounding of values of
    order 10), away from the tanh form by no more than that approximation's gap."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 24)
    x = torch.randn(2, 5, 16) * 2
    with torch.no_grad():
        got = linear_tanh_gelu(x, linear.weight, linear.bias)
        pre = linear(x)
    assert got.shape == (2, 5, 24) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.gelu(pre), rtol=1e-5, atol=1e-5)
    assert float((got - F.gelu(pre, approximate="tanh")).abs().max()) <= _tanh_gelu_gap() + 1e-5


def test_feed_forward_takes_the_gelu_epilogue_only_when_sampling_on_cuda(
        monkeypatch: pytest.MonkeyPatch, addmm_operands: list[tuple[torch.dtype, ...]]) -> None:
    """The epilogue has no derivative and is the tanh GELU on CUDA only: training, and anything on the CPU, keep the
    three calls (the spy on ``_addmm_activation`` must stay unused); with the condition met (patched to hold on the
    CPU) the MLP makes exactly one fused call and gives the plain output to the exact/tanh gap."""
    calls = addmm_operands
    mlp = _feed_forward()
    x = torch.randn(3, 7, 16)
    reference = mlp[2](mlp[1](mlp[0](x))).detach()
    mlp(x).sum().backward()  # training: autograd on
    with torch.no_grad():
        on_cpu = mlp(x)
    assert calls == [] and mlp[0].weight.grad is not None
    torch.testing.assert_close(on_cpu, reference, rtol=0, atol=0)

    _epilogue_on_cpu(monkeypatch)
    with torch.no_grad():
        fused = mlp(x)
    assert calls == [(torch.float32,) * 3] and fused.shape == reference.shape
    assert float((fused - reference).abs().max()) <= _tanh_gap_bound(mlp[2])
    mlp.gelu_epilogue = False
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), reference, rtol=0, atol=0)
    assert len(calls) == 1


def test_feed_forward_epilogue_runs_in_the_autocast_dtype(
        monkeypatch: pytest.MonkeyPatch, addmm_operands: list[tuple[torch.dtype, ...]]) -> None:
    """Under bf16 autocast the fused product gets bf16 operands, as ``F.linear`` would: CUDA's autocast does not cast
    ``_addmm_activation`` itself (the CPU's does, so the spy checks what we pass), and the result is within bf16's
    rounding (2^-8 relative per operand and result, a few roundings deep) of the fp32 output, not silently fp32."""
    _epilogue_on_cpu(monkeypatch)
    mlp = _feed_forward()
    x = torch.randn(4, 16)
    with torch.no_grad():
        reference = mlp(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = linear_tanh_gelu(x, mlp[0].weight, mlp[0].bias)
            out = mlp(x)
    assert addmm_operands == [(torch.float32,) * 3] + [(torch.bfloat16,) * 3] * 2
    assert hidden.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    rel = float((out.float() - reference).norm() / reference.norm())
    assert 2.0**-12 < rel < 2.0**-5


def test_dit_with_the_gelu_epilogue_compiles_without_graph_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampling path (epilogue on) traces into one graph: the autocast queries fold to constants."""
    torch._dynamo.reset()
    _epilogue_on_cpu(monkeypatch)
    model = _unzero(DiT(**TINY_DIT)).eval()
    x, t = _inputs(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), model(x, t), rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert compiled(x, t).dtype == torch.bfloat16
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dit_sampling_forward_on_cuda_matches_the_unfused_mlp(dtype: torch.dtype) -> None:
    """On CUDA both paths compute the tanh GELU; they differ only by where the product's result is rounded (the
    epilogue applies the GELU to the fp32 accumulator), so fp32 agrees to TF32-free fp32 rounding and bf16 to bf16's
    (2^-8 relative, a few layers deep)."""
    model = _unzero(DiT(**TINY_DIT, num_classes=3)).cuda().to(dtype).eval()
    x, t = (v.cuda() for v in _inputs(model))
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in the fp32 products
    try:
        with torch.no_grad():
            fused = model(x.to(dtype), t).float()
            for block in model.blocks:
                block.mlp.gelu_epilogue = False
            plain = model(x.to(dtype), t).float()
    finally:
        torch.set_float32_matmul_precision(precision)
    rel = float((fused - plain).norm() / plain.norm())
    assert rel < (1e-5 if dtype == torch.float32 else 2.0**-6)


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
                                         "init_args": {"image_size": 8, "num_classes": 10}}})
    assert cfg.model.init_args.num_classes == 10
