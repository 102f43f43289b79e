"""Classifier-free guidance needs a trained null label: label_dropout 0 never trains it."""

import pytest
import torch

from lightning_speed import DiffusionModule
from lightning_speed.backbones import DiT


def _dit():
    return DiT(image_size=8, in_channels=1, patch_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=3)


def test_guidance_with_label_dropout_zero_is_refused_at_construction():
    with pytest.raises(ValueError, match="label_dropout is 0"):
        DiffusionModule(_dit(), image_shape=(1, 8, 8), num_classes=3, label_dropout=0.0, guidance_scale=4.0)
    # no guidance, or a trained null label: accepted
    DiffusionModule(_dit(), image_shape=(1, 8, 8), num_classes=3, label_dropout=0.0)
    DiffusionModule(_dit(), image_shape=(1, 8, 8), num_classes=3, label_dropout=0.1, guidance_scale=4.0)


def test_guidance_in_sample_with_label_dropout_zero_is_refused_before_sampling():
    module = DiffusionModule(_dit(), image_shape=(1, 8, 8), num_classes=3, label_dropout=0.0)
    calls = []
    module.backbone.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="label_dropout is 0"):
        module.sample(2, solver_steps=2, guidance_scale=3.0)
    assert calls == []  # refused before any network call
    assert module.sample(2, solver_steps=2, guidance_scale=1.0).shape == (2, 1, 8, 8)


def test_a_copy_of_a_module_samples_with_its_own_compiled_backbone(monkeypatch):
    """compile_sampling's compiled forward belongs to one backbone: a deep copy (or a replaced backbone) samples with
    its own weights, not the original's."""
    import copy

    # a stand-in for torch.compile's result: a plain function calling the bound forward it was given
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: lambda *args: fn(*args))
    torch.manual_seed(0)
    module = DiffusionModule(_dit(), image_shape=(1, 8, 8), num_classes=3, compile_sampling=True)
    for p in module.backbone.parameters():  # away from the zero init, so the weights matter
        torch.nn.init.normal_(p, std=0.1)
    noise, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    original = module.sample(2, solver_steps=2, noise=noise, labels=labels)
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for p in twin.backbone.parameters():
            p.mul_(0.5)
    compiled = twin.sample(2, solver_steps=2, noise=noise, labels=labels)
    twin.compile_sampling = False
    eager = twin.sample(2, solver_steps=2, noise=noise, labels=labels)
    assert not torch.allclose(eager, original)
    torch.testing.assert_close(compiled, eager)
    # the original still samples with its own weights
    torch.testing.assert_close(module.sample(2, solver_steps=2, noise=noise, labels=labels), original)
