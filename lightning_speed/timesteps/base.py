"""The two seams of the training step: where time steps come from and how losses are weighted.

A ``TimestepSampler`` draws ``t`` for a batch; a ``LossWeighting`` turns ``t`` into per-sample
loss weights. Both are called once per step with tensors only: no host-device synchronisation.

They are deliberately *not* ``nn.Module``: assigning one to a LightningModule attribute must
not change the model's parameters, buffers or checkpoint keys (EMA weight averaging pairs
the model's buffers by position, and a checkpoint must load with or without the callbacks).
Their tables are plain tensors that ``.to(device)`` moves; the installing callback (or the
module's ``on_fit_start``) moves them next to the model. Stateful strategies save their
state through ``extra_state`` / ``load_extra_state``, called by the installing callback.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class DeviceTables:
    """Base for strategy objects: every tensor attribute follows ``.to(device)``."""

    device: torch.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> DeviceTables:
        device = torch.device(device)
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
        self.device = device
        return self


class TimestepSampler(DeviceTables):
    """Draws integer time steps in ``[0, num_timesteps)`` on ``self.device``."""

    def __init__(self, num_timesteps: int) -> None:
        if int(num_timesteps) < 1:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}.")
        self.num_timesteps = int(num_timesteps)
        self._generator: torch.Generator | None = None
        self._seed: int | None = None

    # -- randomness ---------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        """Give the sampler its own generator, so its draws can be replayed and resumed."""
        self._seed = int(seed)
        self._generator = None  # (re)built lazily on the current device

    @property
    def generator(self) -> torch.Generator | None:
        if self._seed is None:
            return None
        if self._generator is None or self._generator.device != self.device:
            state = self._generator.get_state() if self._generator is not None else None
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(self._seed)
            if state is not None:
                self._generator.set_state(state)
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
    def extra_state(self) -> dict[str, Any]:
        """State that must survive a resume: the generator's and any running statistics."""
        gen = self.generator
        return {"seed": self._seed, "generator": gen.get_state() if gen is not None else None}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("seed") is not None:
            self.manual_seed(state["seed"])
            if state.get("generator") is not None:
                self.generator.set_state(torch.as_tensor(state["generator"]).cpu())


class UniformSampler(TimestepSampler):
    """t ~ U{0 .. T-1}: the DDPM default and the baseline everything is compared with."""

    def sample(self, n: int) -> Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=self.device, generator=self.generator)

    def probabilities(self) -> Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, device=self.device)


class TableSampler(TimestepSampler):
    """Samples from a fixed categorical distribution over t held on the device."""

    def __init__(self, probs: Tensor) -> None:
        probs = torch.as_tensor(probs, dtype=torch.float64).flatten()
        if (probs < 0).any() or not torch.isfinite(probs).all() or probs.sum() <= 0:
            raise ValueError("Time-step probabilities must be finite, non-negative and not all zero.")
        super().__init__(probs.numel())
        self.probs = (probs / probs.sum()).float()

    def sample(self, n: int) -> Tensor:
        return torch.multinomial(self.probs, n, replacement=True, generator=self.generator)

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
        weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if not torch.isfinite(weights).all() or (weights < 0).any():
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
