"""The two seams of the training step: where time steps come from and how losses are weighted.

A ``TimestepSampler`` draws ``t`` for a batch; a ``LossWeighting`` turns ``t`` into per-sample
loss weights. Both are called once per step with tensors only: no host-device synchronisation
(no ``.item()``, ``.cpu()``, ``.tolist()``, boolean masking or ``torch.multinomial``'s
single-draw validity check). Table samplers draw by inverse-CDF lookup (``torch.rand`` +
``torch.searchsorted``), which runs entirely on the device.

They are deliberately *not* ``nn.Module``: assigning one to a LightningModule attribute must
not change the model's parameters, buffers or checkpoint keys (EMA weight averaging pairs
the model's buffers by position, and a checkpoint must load with or without the callbacks).
Their tables are plain tensors that ``.to(device)`` moves; the installing callback (or the
module's ``on_fit_start``) moves them next to the model. Stateful strategies save their
state through ``extra_state`` / ``load_extra_state``, called by the installing callback.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor


def _normalise_device(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` so device comparisons with generators are exact."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class DeviceTables:
    """Base for strategy objects: every tensor attribute follows ``.to(device)``."""

    device: torch.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> DeviceTables:
        device = _normalise_device(device)
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
        self.device = device
        return self

    # -- checkpointing (stateless by default) -------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """State that must survive a resume (CPU tensors and plain Python values only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned."""


def inverse_cdf_sample(cdf: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``n`` indices from the categorical distribution whose cumulative table is ``cdf``.

    ``cdf`` must be non-decreasing and end at 1. Entries with zero probability are never drawn
    (``right=True`` skips ties). Sync-free on every device, unlike ``torch.multinomial``.
    """
    u = torch.rand(n, device=cdf.device, dtype=cdf.dtype, generator=generator)
    t = torch.searchsorted(cdf, u, right=True)
    return t.clamp_(max=cdf.numel() - 1)


def probabilities_to_cdf(probs: Tensor) -> Tensor:
    """Normalised cumulative table of non-negative weights, ending exactly at 1 (same dtype)."""
    cdf = torch.cumsum(probs, dim=0)
    return cdf / cdf[-1:]


class TimestepSampler(DeviceTables):
    """Draws integer time steps in ``[0, num_timesteps)`` on ``self.device``.

    Randomness: after ``manual_seed(seed)`` the sampler owns a ``torch.Generator`` on its
    device, so its draws can be replayed and resumed. The generator is created lazily on the
    current device; when the sampler moves to another device *type* (CPU -> CUDA) the stream
    restarts from the seed, since CPU and CUDA generator states are not interchangeable.
    Without a seed it uses the global RNG of its device.
    """

    def __init__(self, num_timesteps: int) -> None:
        if int(num_timesteps) < 1:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}.")
        self.num_timesteps = int(num_timesteps)
        self._generator: torch.Generator | None = None
        self._seed: int | None = None
        # (device type, CPU byte tensor) restored from a checkpoint, applied when the
        # generator is (re)built on a device of that type.
        self._pending_rng: tuple[str, Tensor] | None = None

    # -- randomness ---------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        """Give the sampler its own generator, so its draws can be replayed and resumed."""
        self._seed = int(seed)
        self._generator = None  # (re)built lazily on the current device
        self._pending_rng = None

    @property
    def seed(self) -> int | None:
        return self._seed

    @property
    def generator(self) -> torch.Generator | None:
        if self._seed is None:
            return None
        old = self._generator
        if old is None or old.device != self.device:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(self._seed)
            if self._pending_rng is not None:
                device_type, state = self._pending_rng
                self._pending_rng = None
                if device_type == self.device.type:
                    gen.set_state(state)
                else:
                    warnings.warn(
                        f"The time-step sampler's RNG state was saved on {device_type} but the run continues "
                        f"on {self.device.type}: its stream restarts from seed {self._seed}, so the time steps "
                        "after this resume differ from an uninterrupted run. Resume on the same device type "
                        "for an exact continuation.",
                        stacklevel=2,
                    )
            elif old is not None and old.device.type == self.device.type:
                gen.set_state(old.get_state())  # e.g. cuda:0 -> cuda:1: keep the stream
            self._generator = gen
        return self._generator

    # -- the protocol ---------------------------------------------------------------------
    def sample(self, n: int) -> Tensor:
        """Return ``n`` time steps as a long tensor on ``self.device``."""
        raise NotImplementedError

    def importance_weight(self, t: Tensor) -> Tensor | None:
        """Per-sample factor that keeps the objective unbiased (``None`` when not needed)."""
        return None

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Observe the detached per-sample losses of the step (for adaptive samplers)."""

    def probabilities(self) -> Tensor:
        """The current sampling distribution over t (for logging and tests)."""
        raise NotImplementedError

    # -- checkpointing --------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any] | None:
        if self._pending_rng is not None:
            device_type, state = self._pending_rng
            return {"device_type": device_type, "state": state.clone()}
        if self._generator is not None:
            return {"device_type": self._generator.device.type, "state": self._generator.get_state()}
        return None

    def extra_state(self) -> dict[str, Any]:
        """State that must survive a resume: the seed and generator state (CPU tensors only)."""
        return {"seed": self._seed, "rng": self._rng_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("seed") is None:
            return
        self.manual_seed(state["seed"])
        rng = state.get("rng")
        if rng is not None:
            self._pending_rng = (str(rng["device_type"]), torch.as_tensor(rng["state"]).cpu())
        elif state.get("generator") is not None:  # the first version of this format: a CPU state
            self._pending_rng = ("cpu", torch.as_tensor(state["generator"]).cpu())


class UniformSampler(TimestepSampler):
    """t ~ U{0 .. T-1}: the DDPM default and the baseline everything is compared with."""

    def sample(self, n: int) -> Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=self.device, generator=self.generator)

    def probabilities(self) -> Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, device=self.device)


class TableSampler(TimestepSampler):
    """Samples from a fixed categorical distribution over t held on the device.

    ``probs`` (float32, normalised) is kept for logging; draws use ``cdf``, built in float64
    and stored in float32 with its last entry exactly 1.
    """

    def __init__(self, probs: Tensor) -> None:
        probs = torch.as_tensor(probs, dtype=torch.float64).flatten().cpu()
        if probs.numel() < 1 or not torch.isfinite(probs).all() or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError("Time-step probabilities must be finite, non-negative and not all zero.")
        super().__init__(probs.numel())
        probs = probs / probs.sum()
        self.probs = probs.float()
        self.cdf = probabilities_to_cdf(probs).float()

    def sample(self, n: int) -> Tensor:
        return inverse_cdf_sample(self.cdf, n, self.generator)

    def probabilities(self) -> Tensor:
        return self.probs


class LossWeighting(DeviceTables):
    """Maps time steps to per-sample loss weights."""

    def weight(self, t: Tensor) -> Tensor:
        raise NotImplementedError


class ConstantWeighting(LossWeighting):
    """w(t) = 1: the plain DDPM objective."""

    def weight(self, t: Tensor) -> Tensor:
        return torch.ones(t.shape, device=t.device)


class TableWeighting(LossWeighting):
    """Weights looked up from a fixed table over t held on the device."""

    def __init__(self, weights: Tensor) -> None:
        weights = torch.as_tensor(weights, dtype=torch.float64).flatten().cpu()
        if weights.numel() < 1 or not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("Loss weights must be finite and non-negative.")
        self.table = weights.float()

    @property
    def num_timesteps(self) -> int:
        return self.table.numel()

    def weight(self, t: Tensor) -> Tensor:
        return self.table[t]


def weighted_loss(
    sampler: TimestepSampler, weighting: LossWeighting, t: Tensor, per_sample_loss: Tensor
) -> tuple[Tensor, Tensor]:
    """Combine a step's per-sample losses into the scalar objective.

    Multiplies each sample's loss by the weighting's ``w(t)`` and the sampler's importance
    factor (if any), lets adaptive samplers observe the raw losses, and returns
    ``(loss, weights)``. This is the whole integration protocol for a user's own module.
    """
    weights = weighting.weight(t)
    importance = sampler.importance_weight(t)
    if importance is not None:
        weights = weights * importance
    sampler.update(t, per_sample_loss.detach())
    return (weights * per_sample_loss).mean(), weights
