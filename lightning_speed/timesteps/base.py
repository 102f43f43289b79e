"""The seam of the training step: where time steps come from and how each one's loss counts.

A ``TimestepSampler`` draws ``t`` for a batch; a ``LossWeights`` turns ``t`` into per-sample
loss weights; a ``TimestepStrategy`` holds one of each for a schedule and is the only object a
training step talks to::

    self.timesteps = TimestepStrategy(self.scheduler)         # in __init__
    t = self.timesteps.sample(len(x), x.device)               # instead of torch.randint
    loss = self.timesteps.loss(t, per_sample_mse)             # instead of per_sample_mse.mean()

Callbacks (``lightning_speed.callbacks``) replace ``timesteps.sampler`` / ``timesteps.weights``.

Everything runs once per step with tensors only: no host-device synchronisation (no
``.item()``, ``.cpu()``, ``.tolist()``, boolean masking or ``torch.multinomial``'s validity
check). Table samplers draw by inverse-CDF lookup (``torch.rand`` + ``torch.searchsorted``).

Strategies are not ``nn.Module``: holding one on a LightningModule must not change the model's
parameters, buffers or checkpoint keys (EMA weight averaging pairs the model's buffers by
position, and a checkpoint must load with or without the callbacks). Their tables are plain
tensors that ``.to(device)`` moves; ``TimestepStrategy.sample`` moves them to the batch's device.
Stateful samplers save their state through ``extra_state`` / ``load_extra_state``.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import torch
from torch import Tensor
from typing_extensions import override

from lightning_speed.schedules import NoiseSchedule, Prediction, as_schedule, check_prediction, prediction_of
from lightning_speed.validation import check_int, is_integer_tensor


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


# ---------------------------------------------------------------------------------- samplers
class TimestepSampler(DeviceTables, ABC):
    """Draws integer time steps in ``[0, num_timesteps)`` on ``self.device``.

    Randomness: after ``manual_seed(seed)`` the sampler owns a ``torch.Generator`` on its
    device, so its draws can be replayed and resumed. The generator is created lazily on the
    current device; when the sampler moves to another device *type* (CPU -> CUDA) the stream
    restarts from the seed, since CPU and CUDA generator states are not interchangeable.
    Without a seed it uses the global RNG of its device.
    """

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = check_int(num_timesteps, "num_timesteps", minimum=1)
        self._generator: torch.Generator | None = None
        self._seed: int | None = None
        # (device type, CPU byte tensor) restored from a checkpoint, applied when the
        # generator is (re)built on a device of that type.
        self._pending_rng: tuple[str, Tensor] | None = None

    # -- randomness ---------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        """Give the sampler its own generator, so its draws can be replayed and resumed."""
        self._seed = check_int(seed, "seed")
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
    @abstractmethod
    def sample(self, n: int) -> Tensor:
        """Return ``n`` time steps as a long tensor on ``self.device``."""

    @abstractmethod
    def probabilities(self) -> Tensor:
        """The current sampling distribution over t (for logging and tests)."""

    def importance_weight(self, t: Tensor) -> Tensor | None:
        """Per-sample factor that keeps the objective unbiased (``None`` when not needed)."""
        return None

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Observe the detached per-sample losses of the step (for adaptive samplers)."""

    # -- checkpointing --------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any] | None:
        if self._pending_rng is not None:
            device_type, state = self._pending_rng
            return {"device_type": device_type, "state": state.clone()}
        if self._generator is not None:
            return {"device_type": self._generator.device.type, "state": self._generator.get_state()}
        return None

    @override
    def extra_state(self) -> dict[str, Any]:
        """State that must survive a resume: the seed and generator state (CPU tensors only)."""
        return {"seed": self._seed, "rng": self._rng_state()}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("seed") is None:
            return
        self.manual_seed(state["seed"])
        rng = state.get("rng")
        if rng is not None:
            self._pending_rng = (str(rng["device_type"]), torch.as_tensor(rng["state"]).cpu())


class UniformSampler(TimestepSampler):
    """t ~ U{0 .. T-1}: the DDPM default and the baseline everything is compared with."""

    @override
    def sample(self, n: int) -> Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=self.device, generator=self.generator)

    @override
    def probabilities(self) -> Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, device=self.device)


class CDFSampler(TimestepSampler):
    """Base for samplers whose distribution lives in two device tables that subclasses set:
    ``probs`` (float32, for logging) and its cumulative ``cdf`` (drawn from by inverse-CDF lookup)."""

    probs: Tensor
    cdf: Tensor

    @override
    def sample(self, n: int) -> Tensor:
        return inverse_cdf_sample(self.cdf, n, self.generator)

    @override
    def probabilities(self) -> Tensor:
        return self.probs


class TableSampler(CDFSampler):
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


# ---------------------------------------------------------------------------------- weights
class LossWeights(DeviceTables, ABC):
    """Maps time steps to per-sample loss weights."""

    @abstractmethod
    def weight(self, t: Tensor) -> Tensor:
        """Weights shaped like ``t``, on ``t``'s device."""


class ConstantWeights(LossWeights):
    """w(t) = 1: the plain DDPM objective."""

    @override
    def weight(self, t: Tensor) -> Tensor:
        return torch.ones(t.shape, device=t.device)


class TableWeights(LossWeights):
    """Weights looked up from a fixed table over t held on the device."""

    def __init__(self, weights: Tensor) -> None:
        weights = torch.as_tensor(weights, dtype=torch.float64).flatten().cpu()
        if weights.numel() < 1 or not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("Loss weights must be finite and non-negative.")
        self.table = weights.float()

    @property
    def num_timesteps(self) -> int:
        return self.table.numel()

    @override
    def weight(self, t: Tensor) -> Tensor:
        return self.table[t]


# ---------------------------------------------------------------------------------- the loss
def _check_timesteps(t: Any, num_timesteps: int) -> None:
    """Type, dtype and shape are host metadata. Values are read only on the CPU, where that costs no
    sync; on an accelerator a check would synchronise every step, so there t must come from ``sample``."""
    if not isinstance(t, Tensor):
        raise TypeError(
            f"t must be a 1-D integer tensor of time steps (B,), got {type(t).__name__}: "
            "pass what TimestepStrategy.sample returned."
        )
    if t.ndim != 1 or not is_integer_tensor(t):
        raise ValueError(
            f"t must be a 1-D integer tensor of time steps (B,), got {t.dtype} of shape {tuple(t.shape)}: "
            "pass what TimestepStrategy.sample returned."
        )
    if t.device.type == "cpu" and t.numel() > 0:
        low, high = (int(v) for v in torch.aminmax(t))
        if low < 0 or high >= num_timesteps:
            raise ValueError(
                f"t must hold time steps in [0, {num_timesteps}) for this T = {num_timesteps}, got values from {low} "
                f"to {high}: pass what TimestepStrategy.sample returned, unchanged (t - 1, t + 1 or t drawn for "
                "another T would read the loss weights of other time steps)."
            )


def _check_per_sample(t: Tensor, losses: Any, name: str) -> None:
    """Shapes are host metadata: checking them costs no sync."""
    if not isinstance(losses, Tensor):
        raise TypeError(
            f"{name} must be a tensor of per-sample losses shaped (B,) like t, got {type(losses).__name__}: "
            "compute it with torch, e.g. `(out - target).pow(2).flatten(1).mean(1)`."
        )
    if tuple(losses.shape) != tuple(t.shape):
        raise ValueError(
            f"{name} must hold one loss per sample, shaped (B,) = {tuple(t.shape)} like t, got {tuple(losses.shape)}. "
            "Reduce every dimension but the batch first, e.g. `(out - target).pow(2).flatten(1).mean(1)`; "
            "a (B, 1) tensor would broadcast against the (B,) weights into (B, B) and train on a wrong objective."
        )


def weighted_loss(
    sampler: TimestepSampler,
    weights: LossWeights,
    t: Tensor,
    weighted: Tensor,
    unweighted: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The scalar objective ``mean(imp(t) * (w(t) * weighted + unweighted))`` and the applied ``imp * w``.

    ``weighted`` and ``unweighted`` are per-sample losses (B,) like ``t``; only ``weighted`` is
    multiplied by the loss weights (e.g. the MSE, while a learned-variance VLB term stays as is);
    the sampler's importance factor ``imp`` (if any) multiplies both, keeping the objective
    unbiased. Adaptive samplers observe the detached total per-sample loss.
    """
    _check_timesteps(t, sampler.num_timesteps)
    _check_per_sample(t, weighted, "weighted")
    if unweighted is not None:
        _check_per_sample(t, unweighted, "unweighted")
    w = weights.weight(t)
    importance = sampler.importance_weight(t)
    total = weighted if unweighted is None else weighted + unweighted
    sampler.update(t, total.detach())
    per_sample = w * weighted if unweighted is None else w * weighted + unweighted
    if importance is not None:
        per_sample = importance * per_sample
        w = importance * w
    return per_sample.mean(), w


class StepRecord(NamedTuple):
    """One training step as the strategy saw it (detached tensors, on the batch's device)."""

    t: Tensor
    """(B,) time steps."""
    loss: Tensor
    """(B,) per-sample loss before weighting (weighted + unweighted parts)."""
    weight: Tensor
    """(B,) factor applied to the weighted part: loss weight x importance weight."""


class TimestepStrategy:
    """The time-step seam of a training step: one sampler and one set of loss weights for a schedule.

    Args:
        schedule: a ``NoiseSchedule``, an ``alphas_cumprod`` tensor, or an object with one
            (a diffusers scheduler). Zero terminal SNR and half precision are accepted.
        prediction: what the network predicts (``epsilon``, ``v`` or ``x0``); weightings that
            depend on it (Min-SNR) read it from here. None: a diffusers scheduler's
            ``config.prediction_type`` (``v_prediction`` is ``v``, ``sample`` is ``x0``), else ``epsilon``.

    Attributes set by the callbacks: ``sampler`` (default ``UniformSampler``), ``weights``
    (default ``ConstantWeights``), ``tau`` (the installed SpeeD strategy's convergence threshold,
    None when no strategy set one). ``last`` is the latest step's ``StepRecord``.
    """

    def __init__(self, schedule: Any, prediction: Prediction | None = None) -> None:
        self.schedule: NoiseSchedule = as_schedule(schedule)
        configured = prediction_of(schedule)  # a diffusers scheduler knows what its model predicts
        if prediction is not None and configured is not None and check_prediction(prediction) != configured:
            raise ValueError(
                f"prediction={prediction!r} but the scheduler was configured with prediction_type "
                f"{schedule.config.prediction_type!r} ({configured!r} here): leave prediction unset or make them agree."
            )
        self.prediction: str = check_prediction(prediction or configured or "epsilon")
        self.sampler: TimestepSampler = UniformSampler(self.schedule.num_timesteps)
        self.weights: LossWeights = ConstantWeights()
        self.tau: int | None = None
        self.last: StepRecord | None = None
        self._drawn: Tensor | None = None  # what sample() returned last: loss() compares t with it (identity)
        self._warned_undrawn = False

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def to(self, device: torch.device | str) -> TimestepStrategy:
        """Move the sampler's and the weights' tables to ``device``."""
        self.sampler.to(device)
        self.weights.to(device)
        return self

    def sample(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """``n`` time steps (long, (n,)) on ``device`` (default: where the sampler is).

        The tables move to ``device`` on first use there; the device comparison is host-side.
        """
        if isinstance(n, Tensor):  # e.g. sample(x0, device); its repr would flood the message
            raise TypeError(
                f"n is the number of time steps to draw, got a tensor of shape {tuple(n.shape)}: "
                "pass the batch size, sample(len(x0), x0.device)."
            )
        n = check_int(n, "n (the number of time steps to draw)", minimum=0, hint="pass the batch size, len(x0)")
        if device is not None:
            device = torch.device(device)
            if not (_same_device(self.sampler.device, device) and _same_device(self.weights.device, device)):
                self.to(device)
        self._drawn = self.sampler.sample(n)
        return self._drawn

    def loss(self, t: Tensor, weighted: Tensor, unweighted: Tensor | None = None) -> Tensor:
        """The scalar training loss ``mean(imp(t) * (w(t) * weighted + unweighted))``.

        ``weighted`` / ``unweighted`` are per-sample losses shaped (B,) like ``t`` (anything else
        is an error). ``t`` must be the tensor ``sample`` returned: its values are range-checked only
        on the CPU (reading them on an accelerator would synchronise every step), and a t that
        ``sample`` did not return warns once when a non-uniform sampler is installed, since that
        sampler then never chooses the time steps. Records ``self.last`` for the monitor and the NaN guard.
        """
        loss, applied = weighted_loss(self.sampler, self.weights, t, weighted, unweighted)
        if t is not self._drawn and not isinstance(self.sampler, UniformSampler) and not self._warned_undrawn:
            self._warned_undrawn = True
            warnings.warn(
                f"TimestepStrategy.loss got time steps that TimestepStrategy.sample did not return, so the installed "
                f"{type(self.sampler).__name__} does not choose the t this model trains on (t from torch.randint is "
                "uniform whatever a callback installed). Draw t with `t = self.timesteps.sample(len(x), x.device)` and "
                "pass that tensor to loss unchanged; if t derives from sample()'s draw on purpose, ignore this warning.",
                stacklevel=2,
            )
        total = weighted if unweighted is None else weighted + unweighted
        self.last = StepRecord(t.detach(), total.detach(), applied.detach())
        return loss

    def __repr__(self) -> str:
        return (
            f"TimestepStrategy(schedule={self.schedule!r}, prediction={self.prediction!r}, "
            f"sampler={type(self.sampler).__name__}, weights={type(self.weights).__name__}, tau={self.tau})"
        )


def _same_device(current: torch.device, wanted: torch.device) -> bool:
    """Host-side comparison. A bare ``cuda`` means the current CUDA device; tensors' devices carry an index."""
    if wanted.index is None and wanted.type == "cuda":
        wanted = _normalise_device(wanted)
    return current == wanted
