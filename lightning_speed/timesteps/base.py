"""The seam of the training step: where time steps come from and how each one's loss counts.

A strategy is a small object that holds its settings (validated in ``__init__``) and plays one or
two roles: a ``SamplingStrategy`` draws ``t`` for a batch, a ``WeightingStrategy`` turns ``t`` into
per-sample loss weights (``SpeeD`` plays both). ``bind(schedule, prediction)`` builds its tables
for a schedule; ``TimestepStrategy`` holds one bound strategy per role and is the only object a
training step talks to::

    self.timesteps = TimestepStrategy(self.scheduler)         # in __init__
    t = self.timesteps.sample(len(x), x.device)               # instead of torch.randint
    loss = self.timesteps.loss(t, per_sample_mse)             # instead of per_sample_mse.mean()

``lightning_speed.callbacks.TimestepCallback`` binds and installs strategies into ``timesteps``.

Everything runs once per step with tensors only: no host-device synchronisation (no
``.item()``, ``.cpu()``, ``.tolist()``, boolean masking or ``torch.multinomial``'s validity
check). Table strategies draw by inverse-CDF lookup (``torch.rand`` + ``torch.searchsorted``).

On a flow (``TimestepStrategy(flow.FlowSchedule(shift))`` or a diffusers ``FlowMatchEulerDiscreteScheduler``)
the same strategies draw float flow times t in (0, 1) (float32) and weight by closed forms of t: a
strategy names the processes it has a form for in ``processes`` and builds its flow form in ``build_flow``.
Flow draws are inverse-CDF maps t = ``quantile(u)`` of uniform u, with the schedule's shift applied to
the default (uniform) density, and ``cdf_at(t)`` gives their exact distribution.

Strategies are not ``nn.Module``: holding one on a LightningModule must not change the model's
parameters, buffers or checkpoint keys (EMA weight averaging pairs the model's buffers by
position, and a checkpoint must load with or without the callbacks). Their tables are plain
tensors that ``.to(device)`` moves; ``TimestepStrategy.sample`` moves them to the batch's device.
Sampling strategies save their state (seed, RNG, statistics) through ``extra_state`` / ``load_extra_state``.
"""

from __future__ import annotations

import inspect
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor
from typing_extensions import Self, override

from lightning_speed import flow
from lightning_speed.flow import FlowSchedule
from lightning_speed.schedules import (
    NoiseSchedule, Prediction, as_schedule, check_prediction, prediction_of, resolve_tau,
)
from lightning_speed.validation import check_int, is_integer_tensor


def _normalise_device(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` so device comparisons with generators are exact."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def inverse_cdf_sample(cdf: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``n`` indices from the categorical distribution whose cumulative table is ``cdf``.

    ``cdf`` must be non-decreasing and end at 1. Entries with zero probability are never drawn
    (``right=True`` skips ties). Sync-free on every device, unlike ``torch.multinomial``.
    """
    return inverse_cdf(cdf, torch.rand(n, device=cdf.device, dtype=cdf.dtype, generator=generator))


def inverse_cdf(cdf: Tensor, u: Tensor) -> Tensor:
    """The index whose cumulative table ``cdf`` first exceeds each ``u`` in [0, 1) (``inverse_cdf_sample``'s lookup)."""
    return torch.searchsorted(cdf, u.to(cdf.dtype), right=True).clamp_(max=cdf.numel() - 1)


def as_flow_times(t: Any) -> Tensor:
    """Flow times given to a ``cdf_at`` as a float64 CPU tensor, clamped to [0, 1] (where every CDF is 0 or 1)."""
    return torch.as_tensor(t, dtype=torch.float64).cpu().clamp(0.0, 1.0)


def check_run_length(max_steps: Any, anneals: str, alternative: str = "") -> int:
    """``max_steps`` of the run a curriculum anneals over (``anneals`` says how); a run of no set length is refused."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(
            f"{anneals}, but max_steps is {max_steps}: set trainer.max_steps (e.g. --trainer.max_steps 50000)"
            f"{alternative}."
        )
    return max_steps


def sample_binned_flow(schedule: FlowSchedule, bin_cdf: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` flow times from bins of equal width in the unshifted time: a bin by inverse CDF, a uniform point
    inside it, then the schedule's shift (the adaptive samplers' flow form)."""
    bins = bin_cdf.numel()
    b = inverse_cdf_sample(bin_cdf, n, generator)
    u = torch.rand(n, device=bin_cdf.device, generator=generator, dtype=torch.float32)
    return schedule.warp((b + u) / bins)


def flow_bin(schedule: FlowSchedule, t: Tensor, bins: int) -> Tensor:
    """The bin of each flow time among ``bins`` equal widths of the unshifted time (long, on t's device)."""
    return (schedule.unwarp(t) * bins).long().clamp_(0, bins - 1)


def binned_flow_cdf(schedule: FlowSchedule, bin_probs: Tensor, t: Any) -> Tensor:
    """P(drawn t <= t) for ``sample_binned_flow``: piecewise linear in the unshifted time (float64, CPU)."""
    probs = bin_probs.detach().double().cpu()
    bins = probs.numel()
    cumulative = torch.cat([probs.new_zeros(1), probs.cumsum(0)])
    x = schedule.unwarp(as_flow_times(t)) * bins
    j = x.floor().long().clamp(0, bins - 1)
    return cumulative[j] + probs[j] * (x - j)


SEED_RANGE = (-(2**63), 2**64)
"""The seeds ``torch.Generator.manual_seed`` takes: [-2^63, 2^64)."""

PROBABILITY_BINS = 1000
"""Equal bins of [0, 1] in which ``probabilities()`` reports the distribution of flow times."""

FLOW_EDGE = 2.0**-24
"""Flow times are drawn in [FLOW_EDGE, 1 - FLOW_EDGE] (float32's spacing below 1): open at both ends, where
SNR is infinite or 0, for mass 2^-24 that float32 rounding would otherwise put there."""

FLOW_SAMPLING = (
    "UniformSampling, LogitNormalSampling, ModeSampling, CosMapSampling, LossAwareSampling, LossDecreaseSampling, "
    "LaplaceLogSNRSampling, EDMLogNormalSampling, CurriculumSampling, StratifiedSampling"
)
FLOW_WEIGHTING = "ConstantWeighting, MinSNRWeighting, P2Weighting"


def process_of(schedule: NoiseSchedule | FlowSchedule) -> str:
    """``"flow"`` for a flow schedule, ``"ddpm"`` for a discrete one."""
    return "flow" if isinstance(schedule, FlowSchedule) else "ddpm"


def _no_form_message(strategy: Strategy, schedule: NoiseSchedule | FlowSchedule) -> str:
    name = type(strategy).__name__
    if isinstance(schedule, FlowSchedule):
        return (
            f"{name} has no flow form: it is defined on the time steps of a discrete DDPM schedule, and {schedule!r} "
            f"is a flow with continuous t in [0, 1]. On a flow use {FLOW_SAMPLING} or SpeeD to sample and "
            f"{FLOW_WEIGHTING} or SpeeD to weight."
        )
    return (
        f"{name} is a density of flow time t in [0, 1] and has no form on the discrete {schedule.name} schedule "
        f"(T = {schedule.num_timesteps}): bind it to a flow, TimestepStrategy(FlowSchedule(shift)), or use "
        "LogitNormalSampling on a DDPM schedule."
    )


def probabilities_to_cdf(probs: Tensor) -> Tensor:
    """Normalised cumulative table of non-negative weights, ending exactly at 1 (same dtype)."""
    cdf = torch.cumsum(probs, dim=0)
    return cdf / cdf[-1:]


# ---------------------------------------------------------------------------------- strategies
class Strategy(ABC):
    """A time-step strategy: settings given to ``__init__`` (validated there, stored under their argument
    names) and the tables ``bind`` builds from a schedule.

    ``bind(schedule, prediction)`` is where a schedule meets the settings, for every strategy: it resolves
    ``tau`` (the one place "auto" becomes a time step or a flow time: ``resolved_tau``) and calls ``build``
    for a discrete schedule or ``build_flow`` for a flow, which subclasses implement. ``schedule`` is a
    ``NoiseSchedule``, a ``flow.FlowSchedule`` or anything ``as_schedule`` reads. A strategy binds only to the
    processes in ``processes``; the others are a clear error. Every tensor attribute follows ``to(device)``.
    """

    tau: Any = None
    """Where the convergence area starts ("auto", a time step, or a flow time in (0, 1)); None: no such setting."""
    processes: ClassVar[tuple[str, ...]] = ("ddpm",)
    """The processes it has a form for: "ddpm" (discrete time steps) and/or "flow" (continuous flow time)."""
    uses_prediction: ClassVar[bool] = False
    """Whether the tables depend on what the network predicts (Min-SNR's do)."""
    schedule: NoiseSchedule | FlowSchedule | None = None
    """The schedule bound last (None before ``bind``)."""
    process: str | None = None
    """``"ddpm"`` or ``"flow"``: the process of the schedule bound last."""
    num_timesteps: int | None = None
    resolved_tau: int | float | None = None
    """``tau`` as a time step of the bound schedule or a flow time on a flow (None without a tau or before ``bind``)."""
    device: torch.device = torch.device("cpu")

    @property
    def roles(self) -> tuple[str, ...]:
        """What installing it changes: ``"sampling"`` (where t comes from) and/or ``"weighting"``."""
        return tuple(
            role for role, base in (("sampling", SamplingStrategy), ("weighting", WeightingStrategy))
            if isinstance(self, base)
        )  # fmt: skip

    def bind(self, schedule: Any, prediction: Prediction | None = None) -> Self:
        """Build this strategy's tables for ``schedule`` (on the CPU; ``to`` moves them) and return it.

        ``prediction``: what the network predicts; None is epsilon on a DDPM schedule and the velocity on a flow.
        """
        schedule = as_schedule(schedule)
        process = process_of(schedule)
        if process not in self.processes:
            raise ValueError(_no_form_message(self, schedule))
        setting = self.tau_setting(process)
        self.device = torch.device("cpu")
        if process == "flow":
            check_flow_prediction(prediction)
            resolved = None if setting is None else flow.resolve_tau(setting)
            self.schedule, self.process, self.num_timesteps, self.resolved_tau = schedule, process, None, resolved
            self.build_flow(schedule)
        else:
            try:
                resolved = None if setting is None else resolve_tau(setting, schedule)
            except ValueError as err:
                if getattr(self, "tau", setting) is not None:
                    raise
                raise ValueError(f"{type(self).__name__}: {err} tau was not given, so it is the default {setting}, "
                                 "chosen for T = 1000 steps: give tau ('auto' follows the schedule).") from None
            self.schedule, self.process, self.num_timesteps = schedule, process, schedule.num_timesteps
            self.resolved_tau = resolved
            self.build(schedule, check_prediction(prediction or "epsilon"))
        return self

    def tau_setting(self, process: str) -> Any:
        """The tau to resolve on ``process`` ("ddpm" or "flow"): ``tau`` by default."""
        return self.tau

    def build(self, schedule: NoiseSchedule, prediction: str) -> None:
        """Build the tables for a discrete ``schedule`` (``resolved_tau`` is set); nothing by default."""

    def build_flow(self, schedule: FlowSchedule) -> None:
        """Build the flow form for ``schedule`` (``resolved_tau`` is a flow time); nothing by default."""

    def to(self, device: torch.device | str) -> Self:
        device = _normalise_device(device)
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
        self.device = device
        return self

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes that do not exist: the tables of a strategy not bound yet.
        if not name.startswith("__") and self.__dict__.get("schedule") is None:
            raise AttributeError(
                f"{type(self).__name__} has no {name} before it is bound to a schedule: call "
                f"{type(self).__name__}(...).bind(schedule) (TimestepCallback does at setup)."
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        names = [n for n in inspect.signature(type(self).__init__).parameters if n not in ("self", "args", "kwargs")]
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n, None)!r}' for n in names)})"


def check_flow_prediction(prediction: Any) -> str:
    """A flow's network predicts the velocity: None or "velocity"."""
    if prediction not in (None, "velocity"):
        raise ValueError(
            f"prediction={prediction!r}, but a flow's network predicts the velocity v = eps - x0 (the target of "
            "flow.loss): leave prediction unset (or 'velocity') for a flow schedule."
        )
    return "velocity"


class SamplingStrategy(Strategy):
    """Draws integer time steps in ``[0, num_timesteps)`` on ``self.device``, or flow times in [0, 1] (float32)
    on a flow.

    Randomness: after ``manual_seed(seed)`` the strategy owns a ``torch.Generator`` on its
    device, so its draws can be replayed and resumed. The generator is created lazily on the
    current device; when the strategy moves to another device *type* (CPU -> CUDA) the stream
    restarts from the seed, since CPU and CUDA generator states are not interchangeable.
    Without a seed it uses the global RNG of its device.
    """

    _generator: torch.Generator | None = None
    _seed: int | None = None
    # (device type, CPU byte tensor) restored from a checkpoint, applied when the generator is
    # (re)built on a device of that type.
    _pending_rng: tuple[str, Tensor] | None = None

    # -- randomness ---------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        """Give the strategy its own generator, so its draws can be replayed and resumed."""
        seed = check_int(seed, "seed")
        if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:  # torch.Generator refuses it only at the first draw
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), the seeds torch.Generator takes, got {seed}: "
                             "use a smaller seed, e.g. seed % 2**63.")
        self._seed = seed
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
        """Return ``n`` time steps as a long tensor on ``self.device`` (flow times, float32, on a flow)."""

    @abstractmethod
    def probabilities(self) -> Tensor:
        """The current sampling distribution over t (for logging and tests); on a flow, the mass in each of
        ``PROBABILITY_BINS`` equal bins of [0, 1] (``flow_probabilities``)."""

    # -- the flow form: t = quantile(u), u ~ U[0, 1) ---------------------------------------
    def quantile(self, u: Tensor) -> Tensor:
        """The flow time drawn for uniform ``u`` (the inverse of ``cdf_at``, shift included), on u's device."""
        raise NotImplementedError(f"{type(self).__name__} draws no flow times by quantile.")

    def cdf_at(self, t: Any) -> Tensor:
        """P(drawn t <= t) on a flow, float64 on the CPU."""
        raise NotImplementedError(f"{type(self).__name__} has no flow CDF.")

    def sample_flow(self, n: int) -> Tensor:
        """``n`` flow times by inverse CDF, float32 on ``self.device``."""
        return self.quantile(torch.rand(n, device=self.device, generator=self.generator, dtype=torch.float32))

    def flow_probabilities(self) -> Tensor:
        """The mass of each of ``PROBABILITY_BINS`` equal bins of [0, 1] under ``cdf_at`` (float32, on the device)."""
        edges = torch.linspace(0.0, 1.0, PROBABILITY_BINS + 1, dtype=torch.float64)
        return torch.diff(self.cdf_at(edges)).clamp_min(0.0).float().to(self.device)

    def importance_weight(self, t: Tensor) -> Tensor | None:
        """Per-sample factor that keeps the objective unbiased (``None`` when not needed)."""
        return None

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Observe the detached per-sample losses of the step (for adaptive strategies)."""

    def set_step(self, step: int, max_steps: int | None = None) -> None:
        """Follow training: the optimizer step (a Python int, no sync) and ``trainer.max_steps``; for curricula."""

    @property
    def acts_in_loss(self) -> bool:
        """Whether it acts inside ``TimestepStrategy.loss`` (importance weights or a loss history), not only
        in choosing t."""
        kind = type(self)
        base = SamplingStrategy
        return kind.update is not base.update or kind.importance_weight is not base.importance_weight

    # -- checkpointing --------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any] | None:
        if self._pending_rng is not None:
            device_type, state = self._pending_rng
            return {"device_type": device_type, "state": state.clone()}
        if self._generator is not None:
            return {"device_type": self._generator.device.type, "state": self._generator.get_state()}
        return None

    def extra_state(self) -> dict[str, Any]:
        """State that must survive a resume: the seed and generator state (CPU tensors and plain values only)."""
        return {"seed": self._seed, "rng": self._rng_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned."""
        if state.get("seed") is None:
            return
        self.manual_seed(state["seed"])
        rng = state.get("rng")
        if rng is not None:
            self._pending_rng = (str(rng["device_type"]), torch.as_tensor(rng["state"]).cpu())


class WeightingStrategy(Strategy):
    """Maps time steps (or flow times) to per-sample loss weights."""

    @abstractmethod
    def weight(self, t: Tensor) -> Tensor:
        """Weights shaped like ``t``, on ``t``'s device."""

    def flow_weight(self, t: Tensor) -> Tensor:
        """The weights of flow times t, a closed form of t on t's device (weightings with a flow form)."""
        raise NotImplementedError(f"{type(self).__name__} has no flow form.")


class TableSampling(SamplingStrategy):
    """Base of the strategies that draw t from a distribution held in two device tables, set by ``set_probabilities``:
    ``probs`` (float32, for logging) and its cumulative ``cdf`` (float32, last entry exactly 1), drawn from by
    inverse-CDF lookup."""

    probs: Tensor
    cdf: Tensor

    def set_probabilities(self, probs: Tensor) -> None:
        """Hold the distribution ``probs`` over t (non-negative weights, normalised here in float64)."""
        probs = torch.as_tensor(probs, dtype=torch.float64).flatten().cpu()
        if probs.numel() < 1 or not torch.isfinite(probs).all() or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(
                f"{type(self).__name__}: time-step probabilities must be finite, non-negative and not all zero."
            )
        probs = probs / probs.sum()
        self.probs = probs.float()
        self.cdf = probabilities_to_cdf(probs).float()

    @override
    def sample(self, n: int) -> Tensor:
        if self.process == "flow":
            return self.sample_flow(n)
        return inverse_cdf_sample(self.cdf, n, self.generator)

    @override
    def probabilities(self) -> Tensor:
        return self.flow_probabilities() if self.process == "flow" else self.probs


class TableWeighting(WeightingStrategy):
    """Base of the weightings looked up from a table over t held on the device: ``table`` (float32), set in
    ``build`` by ``set_weights``; on a flow, ``flow_weight(t)``."""

    table: Tensor

    def set_weights(self, weights: Tensor) -> None:
        weights = torch.as_tensor(weights, dtype=torch.float64).flatten().cpu()
        if weights.numel() < 1 or not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError(f"{type(self).__name__}: loss weights must be finite and non-negative.")
        check_float32_weights(self, weights)
        self.table = weights.float()

    @override
    def weight(self, t: Tensor) -> Tensor:
        return self.flow_weight(t) if self.process == "flow" else self.table[t]


def check_float32_weights(strategy: WeightingStrategy, weights: Tensor) -> None:
    """Loss weights are applied in float32: one beyond its range would be inf in the loss (float64 ``weights``)."""
    largest = float(weights.max())
    if largest > torch.finfo(torch.float32).max:
        raise ValueError(
            f"{strategy!r} gives loss weights up to {largest:.3g}, beyond float32's range (3.4e38), so the loss would be "
            "inf at those t: choose settings with smaller weights (e.g. a larger k or a smaller gamma)."
        )


class WrappedSampling(SamplingStrategy):
    """Base of the sampling strategies that draw through another one, ``self.inner`` (a curriculum's early
    strategy, a stratified sampler's marginal): its tau is the inner's, binding binds the inner (which refuses a
    process it has no form for), ``to`` moves both, and the inner's state is saved in ``extra_state`` under
    ``inner_state_key``."""

    processes = ("ddpm", "flow")
    inner_state_key: ClassVar[str] = "inner"

    def __init__(self, inner: SamplingStrategy) -> None:
        self.inner = inner

    @property
    @override
    def tau(self) -> Any:
        return self.inner.tau

    @override
    def tau_setting(self, process: str) -> Any:
        return self.inner.tau_setting(process)

    @override
    def build(self, schedule: NoiseSchedule, prediction: str) -> None:
        self.inner.bind(schedule, prediction)

    @override
    def build_flow(self, schedule: FlowSchedule) -> None:
        self.inner.bind(schedule)

    @override
    def to(self, device: torch.device | str) -> Self:
        self.inner.to(device)
        return super().to(device)

    @override
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), self.inner_state_key: self.inner.extra_state()}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.inner.load_extra_state(state.get(self.inner_state_key, {}))


class UniformSampling(SamplingStrategy):
    """t ~ U{0 .. T-1}: the DDPM default and the baseline everything is compared with.

    On a flow: t = shift(u), u ~ U[0, 1), with the schedule's shift (rectified flow's default; SD3's with a shift).
    """

    processes = ("ddpm", "flow")

    @override
    def sample(self, n: int) -> Tensor:
        if self.process == "flow":
            return self.sample_flow(n)
        return torch.randint(0, self.num_timesteps, (n,), device=self.device, generator=self.generator)

    @override
    def probabilities(self) -> Tensor:
        if self.process == "flow":
            return self.flow_probabilities()
        # float32 whatever the default dtype (bf16 inside a bf16-true step): a stratified draw inverts its CDF
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, device=self.device, dtype=torch.float32)

    @override
    def quantile(self, u: Tensor) -> Tensor:
        return self.schedule.warp(u)

    @override
    def cdf_at(self, t: Any) -> Tensor:
        return self.schedule.unwarp(as_flow_times(t))


class ConstantWeighting(WeightingStrategy):
    """w(t) = 1: the plain DDPM objective (the plain velocity MSE on a flow)."""

    processes = ("ddpm", "flow")

    @override
    def weight(self, t: Tensor) -> Tensor:
        return torch.ones(t.shape, device=t.device)


def split_roles(strategies: Strategy | Sequence[Strategy]) -> tuple[SamplingStrategy | None, WeightingStrategy | None]:
    """The strategy that samples and the one that weights among ``strategies`` (one strategy or a list).

    At most one per role (a sampling and a weighting strategy combine; ``SpeeD`` plays both), and each
    strategy must play one at least.
    """
    sequence = isinstance(strategies, Sequence) and not isinstance(strategies, str)
    items = list(strategies) if sequence else [strategies]
    for item in items:
        if not isinstance(item, Strategy):
            given = f"the class {item.__name__}" if isinstance(item, type) else type(item).__name__
            raise TypeError(
                f"Time-step strategies come from lightning_speed.timesteps (e.g. SpeeD(), LogitNormalSampling(), "
                f"MinSNRWeighting()), got {given}."
            )
    if not items:
        raise ValueError("No time-step strategy given: give one or two (one sampling, one weighting), or none at all "
                         "(null) for uniform t with unit weights.")
    for item in items:
        if not item.roles:
            raise ValueError(f"{item!r} neither samples nor weights (uniform t, unit weights): leave it out, or give "
                             "null for the uniform baseline.")
    found = []
    for role in ("sampling", "weighting"):
        playing = [item for item in items if role in item.roles]
        if len(playing) > 1:
            raise ValueError(
                f"Only one {role} strategy can be active, but {len(playing)} are given: "
                f"{', '.join(type(item).__name__ for item in playing)}. Keep one of them (a sampling and a weighting "
                "strategy do combine; SpeeD plays both roles)."
            )
        found.append(playing[0] if playing else None)
    return found[0], found[1]


# ---------------------------------------------------------------------------------- the loss
def _check_timesteps(t: Any, num_timesteps: int) -> None:
    """Type, dtype and shape are host metadata. Values are read only on the CPU, where that costs no
    sync; on an accelerator a check would synchronise every step, so there t must come from ``sample``."""
    if not isinstance(t, Tensor):
        raise TypeError(
            f"t must be a 1-D integer tensor of time steps (B,), got {type(t).__name__}: "
            "pass what TimestepStrategy.sample returned."
        )
    if t.ndim != 1 or not is_integer_tensor(t) or t.dtype == torch.uint8:  # uint8 indexes as a mask
        raise ValueError(
            f"t must be a 1-D integer tensor of time steps (B,), got {t.dtype} of shape {tuple(t.shape)}: "
            "pass what TimestepStrategy.sample returned (torch.long; uint8 would index the tables as a mask)."
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


def _binding(strategy: Strategy) -> tuple[str | None, int | None]:
    """The process and T of the schedule a strategy is bound to (T from the schedule: a flow sampler's own
    ``num_timesteps`` may count bins)."""
    return strategy.process, getattr(strategy.schedule, "num_timesteps", None)


def _bound(strategy: Strategy) -> str:
    return "not bound" if strategy.process is None else f"bound to {strategy.schedule!r}"


def weighted_loss(
    sampler: SamplingStrategy,
    weights: WeightingStrategy,
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
    if _binding(weights) != _binding(sampler):
        raise ValueError(
            f"{type(sampler).__name__} is {_bound(sampler)} but {type(weights).__name__} is {_bound(weights)}: the "
            "weights of t would be read from another schedule's table. Bind both to the same schedule, e.g. "
            "TimestepStrategy(schedule).install(sampling, weighting)."
        )
    if sampler.process == "flow":
        flow.check_times(t)
    else:
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
    """The time-step seam of a training step: one sampling and one weighting strategy, bound to a schedule.

    Args:
        schedule: a ``NoiseSchedule``, an ``alphas_cumprod`` tensor, or an object with one
            (a diffusers scheduler). Zero terminal SNR and half precision are accepted. For flow matching
            a ``flow.FlowSchedule(shift)`` or a diffusers ``FlowMatchEulerDiscreteScheduler`` (its shift):
            ``sample`` then returns float32 flow times in (0, 1) and ``loss`` takes them.
        prediction: what the network predicts (``epsilon``, ``v`` or ``x0``); weightings that
            depend on it (Min-SNR) are bound with it. None: a diffusers scheduler's
            ``config.prediction_type`` (``v_prediction`` is ``v``, ``sample`` is ``x0``), else ``epsilon``;
            on a flow always ``velocity``.

    ``sampler`` (default ``UniformSampling``: uniform with the shift on a flow) and ``weights`` (default
    ``ConstantWeighting``) are the installed strategies (``install``; the same object twice for ``SpeeD``);
    ``tau`` is theirs, as a time step or a flow time (None when neither has one). ``last`` is the latest
    step's ``StepRecord``.
    """

    def __init__(self, schedule: Any, prediction: Prediction | None = None) -> None:
        self.schedule: NoiseSchedule | FlowSchedule = as_schedule(schedule)
        if isinstance(self.schedule, FlowSchedule):
            self.prediction: str = check_flow_prediction(prediction)
            self._init_strategies()
            return
        configured = prediction_of(schedule)  # a diffusers scheduler knows what its model predicts
        if prediction is not None and configured is not None and check_prediction(prediction) != configured:
            raise ValueError(
                f"prediction={prediction!r} but the scheduler was configured with prediction_type "
                f"{schedule.config.prediction_type!r} ({configured!r} here): leave prediction unset or make them agree."
            )
        self.prediction = check_prediction(prediction or configured or "epsilon")
        self._init_strategies()

    def _init_strategies(self) -> None:
        self.sampler: SamplingStrategy = UniformSampling().bind(self.schedule, self.prediction)
        self.weights: WeightingStrategy = ConstantWeighting().bind(self.schedule, self.prediction)
        self.last: StepRecord | None = None
        self._drawn: Tensor | None = None  # what sample() returned last: loss() compares t with it (identity)
        self._warned_undrawn = False

    @property
    def process(self) -> str:
        """``"ddpm"`` (integer time steps) or ``"flow"`` (float flow times)."""
        return process_of(self.schedule)

    @property
    def num_timesteps(self) -> int | None:
        """T of a discrete schedule; None on a flow."""
        return getattr(self.schedule, "num_timesteps", None)

    @property
    def tau(self) -> int | float | None:
        """The installed strategies' convergence threshold, a time step or a flow time (None when neither has one)."""
        return self.sampler.resolved_tau if self.sampler.resolved_tau is not None else self.weights.resolved_tau

    def install(self, sampling: SamplingStrategy | None = None, weighting: WeightingStrategy | None = None) -> None:
        """Bind ``sampling`` and ``weighting`` to this schedule and prediction and use them; a role given None
        keeps what it holds. The two must agree on tau: one convergence threshold holds for both."""
        for given, role, base in ((sampling, "sampling", SamplingStrategy), (weighting, "weighting", WeightingStrategy)):
            if given is None or isinstance(given, base) and role in given.roles:
                continue
            # A SpeeD(k=1, dual=False) is a SamplingStrategy that samples uniform t: installed as the sampler, its
            # weights would be silently left out. Its settings (repr) say why it does not play the role.
            name = repr(given) if isinstance(given, base) else type(given).__name__
            plays = (("it plays " + " and ".join(given.roles) if given.roles else "it neither samples nor weights")
                     if isinstance(given, Strategy) else "not a time-step strategy")
            raise TypeError(f"install({role}=...) takes a {base.__name__}, but {name} does no {role} ({plays}): "
                            "pass it in the role it plays.")
        sampler = self.sampler if sampling is None else sampling
        weights = self.weights if weighting is None else weighting
        for strategy in dict.fromkeys(s for s in (sampling, weighting) if s is not None):
            strategy.bind(self.schedule, self.prediction)
        taus = (sampler.resolved_tau, weights.resolved_tau)
        if None not in taus and taus[0] != taus[1]:
            raise ValueError(
                f"The time-step strategies disagree on tau ({type(sampler).__name__} samples with tau={taus[0]}, "
                f"{type(weights).__name__} weights with tau={taus[1]}); one convergence threshold must hold for "
                "sampling, weighting and the monitor. Give both the same tau, or one SpeeD(tau=...) for both roles."
            )
        self.sampler, self.weights = sampler, weights

    def to(self, device: torch.device | str) -> TimestepStrategy:
        """Move the sampler's and the weights' tables to ``device``."""
        self.sampler.to(device)
        self.weights.to(device)
        return self

    def sample(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """``n`` time steps (long, (n,)) on ``device`` (default: where the sampler is); on a flow, flow times
        (float32, (n,)) in [2^-24, 1 - 2^-24].

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
        t = self.sampler.sample(n)
        self._drawn = t.clamp_(FLOW_EDGE, 1.0 - FLOW_EDGE) if self.sampler.process == "flow" else t
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
        if t is not self._drawn and not isinstance(self.sampler, UniformSampling) and not self._warned_undrawn:
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
            f"sampler={self.sampler!r}, weights={self.weights!r}, tau={self.tau})"
        )


def _same_device(current: torch.device, wanted: torch.device) -> bool:
    """Host-side comparison. A bare ``cuda`` means the current CUDA device; tensors' devices carry an index."""
    if wanted.index is None and wanted.type == "cuda":
        wanted = _normalise_device(wanted)
    return current == wanted
