"""Rectified flow in continuous time: the process, its loss, its time shift, its samplers and its SpeeD facts.

The process (t = 0 is data, t = 1 is noise, as in SD3):

    x_t = (1 - t) x0 + t eps,   t in [0, 1],   eps ~ N(0, I)

The network predicts the velocity v = dx_t/dt = eps - x0; the training loss is the per-sample mean
squared error of that prediction. SNR(t) = ((1 - t) / t)^2, log-SNR(t) = 2 log((1 - t) / t) = -2 logit(t):
+inf at t = 0, -inf at t = 1.

Time shift (SD3, Esser et al. 2024): t' = shift t / (1 + (shift - 1) t), i.e. logit(t') = logit(t) + log(shift),
which lowers the log-SNR of every t by 2 log(shift); shift > 1 moves time towards noise, as higher
resolutions need. ``resolution_shift`` gives the shift that diffusers' Flux pipelines compute from an
image's token count (shift = exp(mu), mu linear in the token count).

``FlowSchedule(shift)`` is the flow's schedule: ``TimestepStrategy(FlowSchedule(shift))`` binds the time-step
strategies of ``lightning_speed.timesteps`` to flow time (a diffusers ``FlowMatchEulerDiscreteScheduler`` gives its
shift the same way).

Sampling integrates dx/dt = v from t = 1 (pure noise) to t = 0 on a ``time_grid`` with ``euler`` or ``heun``,
short pure functions in the style of k-diffusion that call ``model(x, t)`` with t a float tensor (B,).

SpeeD's analysis on the flow (derived in docs/flow_matching.md). Var[x_t | x0] = t^2 grows at a rate that
never falls, because the flow is not variance-preserving; what the network can infer from x_t depends only
on the SNR, so the analysis uses the scale-free noise share

    psi(t) = 1 / (1 + SNR(t)) = t^2 / (t^2 + (1 - t)^2)

(the Psi = 1 - alpha_bar of the variance-preserving process with the same SNR). Its rate
d psi / dt = 2 t (1 - t) / (t^2 + (1 - t)^2)^2 rises to its peak at t = 1/2 and decays to 0 at t = 1:

* acceleration: t < 1/2;
* deceleration: 1/2 <= t < tau;
* convergence: t >= tau. ``tau="auto"`` is the official pivot rule in the flow's own time: the first t where
  d sqrt(psi) / dt falls below 0.1 (the discrete rule's 1e-4 per step of T = 1000, per unit of normalised
  time), t = 0.921: the log-SNR between steps 695 and 696 of the linear DDPM schedule (the paper's tau 700 is at t = 0.923).

Values of t are checked where that costs nothing: always their dtype and shape, their range only on the CPU
(reading values on an accelerator would synchronise the device every step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args

import torch
from torch import Tensor, nn

from lightning_speed.process import DiffusionLosses, expand
from lightning_speed.validation import check_int, check_number

Velocity = Callable[[Tensor, Tensor], Tensor]
"""A network as the flow sees it: ``model(x_t, t) -> v`` with t a float tensor (B,) in [0, 1]."""

FlowSolver = Literal["euler", "heun"]
FLOW_SOLVERS: tuple[str, ...] = get_args(FlowSolver)

FlowTau = Union[float, Literal["auto"]]
"""The flow time where the convergence area starts, in (0, 1), or "auto" (``auto_tau()``, 0.921)."""

PSI_RATE_PEAK = 0.5
"""argmax_t d psi / dt: where the acceleration area ends (SNR = 1)."""
PIVOT_THRESHOLD = 0.1
"""The official pivot threshold per unit of normalised time (1e-4 per step at T = 1000)."""


# ---------------------------------------------------------------------------------- checks
def check_shift(shift: Any) -> float:
    """A time shift: a finite number > 0 (1 leaves t unchanged)."""
    return check_number(
        shift, "shift", above=0,
        hint="t' = shift t / (1 + (shift - 1) t) needs shift > 0; 1 is no shift, SD3 uses 3.0 at 1024 px",
    )


def is_flow_scheduler(source: Any) -> bool:
    """Whether ``source`` is a diffusers flow-matching scheduler: a ``config.shift`` and no ``alphas_cumprod``
    (``FlowMatchEulerDiscreteScheduler``), or a solver with ``config.use_flow_sigmas`` (Wan's UniPC), whose
    ``alphas_cumprod`` is not the process it samples."""
    config = getattr(source, "config", None)
    if getattr(config, "use_flow_sigmas", False):
        return True
    return getattr(config, "shift", None) is not None and not hasattr(source, "alphas_cumprod")


def configured_shift(scheduler: Any) -> float | None:
    """A flow scheduler's fixed shift (``config.shift``, or ``config.flow_shift`` with flow sigmas); None with
    dynamic shifting, where its pipelines choose the shift per resolution."""
    config = scheduler.config
    if getattr(config, "use_dynamic_shifting", False):
        return None
    return float(config.flow_shift if getattr(config, "use_flow_sigmas", False) else config.shift)


def _check_range(t: Tensor, name: str) -> None:
    """Values in [0, 1], read only on the CPU (free there; a sync on an accelerator)."""
    if t.device.type == "cpu" and t.numel() > 0:
        low, high = (float(v) for v in torch.aminmax(t.detach()))
        if not (0.0 <= low and high <= 1.0):  # also false for NaN
            raise ValueError(
                f"{name} must hold flow times in [0, 1] (0 data, 1 noise), got values from {low:g} to {high:g}: "
                "draw t with TimestepStrategy(FlowSchedule(shift)).sample; discrete steps s of a T-step schedule "
                "are not flow times."
            )


def check_times(t: Any, name: str = "t", batch: int | None = None) -> Tensor:
    """``t`` if it is a 1-D floating tensor of flow times (of length ``batch`` when given)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a 1-D floating tensor of flow times in [0, 1], got {type(t).__name__}.")
    if not t.is_floating_point():
        raise ValueError(
            f"{name} must hold flow times in [0, 1] as floats, got {t.dtype}: the flow's time is continuous; draw it "
            "with TimestepStrategy(FlowSchedule(shift)).sample, not as integer steps."
        )
    if t.ndim != 1 or (batch is not None and t.numel() != batch):
        shape = "(B,)" if batch is None else f"({batch},), one per sample"
        raise ValueError(f"{name} must be shaped {shape}, got {tuple(t.shape)}.")
    _check_range(t, name)
    return t


def _as_times(t: float | Tensor, name: str) -> float | Tensor:
    """A Python number or a tensor of flow times, range-checked (tensors on the CPU only)."""
    if isinstance(t, Tensor):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating-point flow times in [0, 1], got {t.dtype}.")
        _check_range(t, name)
        return t
    return check_number(t, name, at_least=0.0, at_most=1.0, hint="flow times run from 0 (data) to 1 (noise)")


# ---------------------------------------------------------------------------------- the process
def _time_like(t: Tensor, like: Tensor) -> Tensor:
    """t shaped to broadcast over ``like`` in at least float32: half precision would round it (bf16 by up to 2^-9 in
    [0.5, 1)), so x_t would not be the one at the t the network is told; bf16 data gives float32 results (as the DDPM's
    float32 tables do)."""
    return expand(t.to(torch.promote_types(like.dtype, torch.float32)), like)


def q_sample(x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps, t (B,) broadcast over each sample."""
    t = _time_like(t, x0)
    return (1 - t) * x0 + t * noise


def velocity(x0: Tensor, noise: Tensor) -> Tensor:
    """The training target v = dx_t/dt = eps - x0 (the same at every t), in at least float32 as ``q_sample``'s x_t:
    a bf16 difference would round by up to 2^-9 of its size, so even the exact velocity would show a loss."""
    return at_least_float32(noise) - at_least_float32(x0)


def snr(t: Tensor) -> Tensor:
    """SNR(t) = ((1 - t) / t)^2: inf at t = 0, 0 at t = 1."""
    return ((1 - t) / t) ** 2


def log_snr(t: Tensor) -> Tensor:
    """log SNR(t) = -2 logit(t): +inf at t = 0, -inf at t = 1."""
    return -2 * torch.logit(t)


def time_from_snr(value: Tensor | float) -> Tensor:
    """The flow time with this SNR, t = 1 / (1 + sqrt(SNR)); e.g. ``time_from_snr(schedule.snr[700])`` is the
    flow time whose x_t is as noisy as step 700's of a discrete schedule (0.923 for linear T = 1000)."""
    value = torch.as_tensor(value, dtype=torch.float64)
    if (value < 0).any() or value.isnan().any():
        raise ValueError("SNR values must be >= 0 (inf is t = 0).")
    return 1 / (1 + value.sqrt())


def split_prediction(v: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) implied by a velocity prediction at x_t: x0 = x_t - t v, eps = x_t + (1 - t) v."""
    t = _time_like(t, x_t)
    return x_t - t * v, x_t + (1 - t) * v


def check_output(out: Any, x: Tensor) -> Tensor:
    """``out`` if it is a floating tensor shaped like the network's input ``x`` (host metadata only)."""
    if not isinstance(out, Tensor) or not out.is_floating_point():
        what = type(out).__name__ if not isinstance(out, Tensor) else str(out.dtype)
        raise TypeError(
            f"The network must return its velocity prediction as a floating-point tensor, got {what}: return the "
            "tensor itself (from a diffusers model, its `.sample`)."
        )
    if out.shape != x.shape:
        raise ValueError(
            f"The network must return a velocity shaped like its input {tuple(x.shape)}, got {tuple(out.shape)}: "
            "set its out_channels to the data's channels (a flow has no learned variance)."
        )
    return out


def loss(model: Velocity, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
    """Per-sample MSE of the velocity prediction, (B,) in float32 whatever the autocast."""
    check_times(t, batch=x0.shape[0])
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = q_sample(x0, t, noise)
    out = check_output(model(x_t, t), x_t).float()
    return (out - velocity(x0, noise).float()).pow(2).flatten(1).mean(1)


class RectifiedFlow(nn.Module):
    """The flow process behind the same seam as ``GaussianDiffusion``: ``training_losses(model, x0, t, noise)``.

    It holds no parameters or buffers (a checkpoint's keys do not change with it). ``prediction`` is always
    "velocity" and ``learn_sigma`` False; t is a float tensor (B,) in [0, 1].
    """

    prediction = "velocity"
    learn_sigma = False

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return q_sample(x0, t, noise)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | None = None) -> Tensor:
        return velocity(x0, noise)

    def split_prediction(self, out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return split_prediction(out, x_t, t)

    def check_output(self, out: Any, x: Tensor) -> Tensor:
        return check_output(out, x)

    def training_losses(self, model: Velocity, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> DiffusionLosses:
        """Per-sample losses (B,): the velocity MSE, with no VLB term."""
        return DiffusionLosses(loss(model, x0, t, noise))


# ---------------------------------------------------------------------------------- time shift
def apply_shift(t: Tensor, shift: float) -> Tensor:
    """shift t / (1 + (shift - 1) t), without checks (the samplers' hot path)."""
    return shift * t / (1 + (shift - 1) * t)


def remove_shift(t: Tensor, shift: float) -> Tensor:
    """The inverse of ``apply_shift``, t / (shift - (shift - 1) t), without checks (exact at 0 and 1)."""
    return t / (shift - (shift - 1) * t)


def shift_time(t: float | Tensor, shift: float) -> float | Tensor:
    """SD3's time shift t' = shift t / (1 + (shift - 1) t); maps [0, 1] onto itself, 0 -> 0 and 1 -> 1."""
    shift = check_shift(shift)
    return apply_shift(_as_times(t, "t"), shift)


def unshift_time(t: float | Tensor, shift: float) -> float | Tensor:
    """The inverse of ``shift_time``: t = t' / (shift - (shift - 1) t')."""
    shift = check_shift(shift)
    return remove_shift(_as_times(t, "t"), shift)


def resolution_shift(
    num_tokens: int,
    base_tokens: int = 256,
    max_tokens: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The resolution-dependent shift exp(mu), mu linear in the image's token count (diffusers' Flux pipelines,
    with ``FlowMatchEulerDiscreteScheduler``'s default ends): mu = base_shift at ``base_tokens``, max_shift at
    ``max_tokens``, extended linearly beyond. A DiT-style model has (H / p) (W / p) tokens for latents of size
    H x W and patch size p (Flux at 1024 px: 128 x 128 latents, p = 2, 4096 tokens, shift exp(1.15) = 3.16).
    """
    num_tokens = check_int(num_tokens, "num_tokens", minimum=1, hint="the image's token count, (H / p) (W / p)")
    base_tokens = check_int(base_tokens, "base_tokens", minimum=1)
    max_tokens = check_int(max_tokens, "max_tokens", minimum=1)
    if max_tokens <= base_tokens:
        raise ValueError(f"max_tokens ({max_tokens}) must be larger than base_tokens ({base_tokens}).")
    base_shift, max_shift = check_number(base_shift, "base_shift"), check_number(max_shift, "max_shift")
    mu = base_shift + (max_shift - base_shift) * (num_tokens - base_tokens) / (max_tokens - base_tokens)
    return math.exp(mu)


class FlowSchedule:
    """The schedule of rectified flow in continuous time, x_t = (1 - t) x0 + t eps, with SD3's time shift.

    What ``NoiseSchedule`` is to a DDPM: ``TimestepStrategy(FlowSchedule(shift))`` binds the strategies of
    ``lightning_speed.timesteps`` to flow time, so they draw float t in (0, 1) and weight by closed forms of t.
    ``shift`` is applied to every draw of the default (uniform) sampling and of the samplers built on it, as
    SD3 and diffusers apply it to the training times; SpeeD's areas and every weight are functions of the
    process time t (after the shift), since they describe the noise level of x_t.
    """

    name = "flow"

    def __init__(self, shift: float = 1.0) -> None:
        self.shift = check_shift(shift)

    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) = ((1 - t) / t)^2 of the process time t (the shift does not change it)."""
        return snr(t)

    def log_snr(self, t: Tensor) -> Tensor:
        return log_snr(t)

    def shift_time(self, u: float | Tensor) -> float | Tensor:
        """u in [0, 1] -> the shifted time t = shift u / (1 + (shift - 1) u) (checked)."""
        return shift_time(u, self.shift)

    def unshift_time(self, t: float | Tensor) -> float | Tensor:
        """The inverse of ``shift_time`` (checked)."""
        return unshift_time(t, self.shift)

    def warp(self, u: Tensor) -> Tensor:
        """``shift_time`` without checks, for draws in the training step (no host reads)."""
        return u if self.shift == 1.0 else apply_shift(u, self.shift)

    def unwarp(self, t: Tensor) -> Tensor:
        """``unshift_time`` without checks."""
        return t if self.shift == 1.0 else remove_shift(t, self.shift)

    @classmethod
    def from_scheduler(cls, scheduler: Any, num_tokens: int | None = None) -> FlowSchedule:
        """The schedule of a diffusers flow-matching scheduler: its fixed shift (``configured_shift``), or with
        dynamic shifting the shift it applies to images of ``num_tokens`` tokens, as its pipelines compute it:
        mu linear in the token count between the config's (base_image_seq_len, base_shift) and
        (max_image_seq_len, max_shift), then shift exp(mu) (``time_shift_type`` "exponential") or mu ("linear").
        That token rule is diffusers' ``calculate_shift`` (Flux, SD3, LTX-Video); a pipeline with its own (CogView4's
        sqrt rule, Flux.2's step-dependent one) needs its shift stated, ``FlowSchedule(exp(mu))``."""
        name, config = type(scheduler).__name__, scheduler.config
        prediction = getattr(config, "prediction_type", None)
        if getattr(config, "use_flow_sigmas", False) and prediction != "flow_prediction":
            raise ValueError(
                f"{name} has flow sigmas but prediction_type {prediction!r}: a flow's network here predicts the "
                "velocity v = eps - x0, diffusers' 'flow_prediction'. Configure the scheduler with it."
            )
        shift = configured_shift(scheduler)
        if num_tokens is not None:
            if shift is not None:
                raise ValueError(f"{name} has the fixed shift {shift:g}, not one per resolution: leave num_tokens out.")
            ends = [getattr(config, key, None) for key in
                    ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")]
            if None in ends:
                raise ValueError(f"{name}'s config does not say how its shift follows the token count: state the "
                                 "shift to train with, TimestepStrategy(FlowSchedule(shift)).")
            shift = resolution_shift(num_tokens, *ends)
            return cls(math.log(shift) if getattr(config, "time_shift_type", "exponential") == "linear" else shift)
        if shift is None:
            raise ValueError(
                f"{name} uses dynamic shifting (use_dynamic_shifting=True): its pipelines choose the shift per image "
                f"resolution, so config.{'flow_shift' if getattr(config, 'use_flow_sigmas', False) else 'shift'} is "
                "not the shift of its training times. State the shift to train with: "
                "TimestepStrategy(FlowSchedule.from_scheduler(self.scheduler, num_tokens=...)) for the shift it "
                "applies to images of num_tokens tokens ((H / p) (W / p) for latents H x W and patch size p), or "
                "FlowSchedule(1.0) for its unshifted training sigmas."
            )
        return cls(shift)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlowSchedule) and other.shift == self.shift

    def __hash__(self) -> int:
        return hash(("flow", self.shift))

    def __repr__(self) -> str:
        return f"FlowSchedule(shift={self.shift:g})"


# ---------------------------------------------------------------------------------- sampling
def time_grid(steps: int, shift: float = 1.0) -> Tensor:
    """``steps + 1`` flow times from 1 to 0 (float64, on the CPU): equal steps, then shifted."""
    steps = check_int(steps, "steps", minimum=1, hint="the number of solver steps")
    return apply_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), check_shift(shift))


def _grid_values(grid: Tensor | Sequence[float]) -> list[float]:
    """The grid as Python floats (one host copy per sampling call, never per step), checked."""
    times = torch.as_tensor(grid, dtype=torch.float64).cpu()
    if times.ndim != 1 or times.numel() < 2 or not (times[1:] < times[:-1]).all() or times.min() < 0 or times.max() > 1:
        raise ValueError(
            "The time grid must hold at least 2 strictly decreasing flow times in [0, 1] (from noise towards data), "
            f"got {times.tolist() if times.numel() <= 8 else tuple(times.shape)}: use flow.time_grid(steps, shift)."
        )
    return times.tolist()


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is in half precision (float32 and float64 stay): flow times, and solver states whose
    increments (s - t) v fall below half precision's spacing (bf16 noise would hardly move)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _at(x: Tensor, t: float) -> Tensor:
    """The time t as the model's (B,) float tensor, in the dtype of the state ``x`` (float32 or float64)."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)


@torch.no_grad()
def euler(model: Velocity, x: Tensor, grid: Tensor | Sequence[float]) -> Tensor:
    """Integrate dx/dt = model(x, t) along ``grid`` (decreasing flow times) with Euler steps."""
    times, x = _grid_values(grid), at_least_float32(x)
    for t, s in zip(times[:-1], times[1:]):
        x = x + (s - t) * model(x, _at(x, t))
    return x


@torch.no_grad()
def heun(model: Velocity, x: Tensor, grid: Tensor | Sequence[float]) -> Tensor:
    """Integrate dx/dt = model(x, t) along ``grid`` with Heun's method (second order, two evaluations a step).

    A step into t = 0 is an Euler step, as in k-diffusion: it saves the evaluation at t = 0, where training
    draws (logit-normal) put almost no mass; the global error stays second order.
    """
    times, x = _grid_values(grid), at_least_float32(x)
    for t, s in zip(times[:-1], times[1:]):
        v = model(x, _at(x, t))
        x_next = x + (s - t) * v
        if s > 0:
            x_next = x + (s - t) * 0.5 * (v + model(x_next, _at(x, s)))
        x = x_next
    return x


@torch.no_grad()
def sample_loop(
    model: Velocity, noise: Tensor, solver: FlowSolver = "euler", steps: int = 50, shift: float = 1.0
) -> Tensor:
    """Generate from ``noise`` (x at t = 1) with ``solver`` on ``time_grid(steps, shift)``."""
    if solver not in FLOW_SOLVERS:
        raise ValueError(f"Unknown flow solver {solver!r}; choose one of {', '.join(map(repr, FLOW_SOLVERS))}.")
    integrate = euler if solver == "euler" else heun
    return integrate(lambda x, t: check_output(model(x, t), x), noise, time_grid(steps, shift))


# ---------------------------------------------------------------------------------- SpeeD's facts
def psi(t: Tensor) -> Tensor:
    """The noise share psi(t) = 1 / (1 + SNR) = t^2 / (t^2 + (1 - t)^2)."""
    return t**2 / (t**2 + (1 - t) ** 2)


def psi_rate(t: Tensor) -> Tensor:
    """d psi / dt = 2 t (1 - t) / (t^2 + (1 - t)^2)^2: 0 at both ends, 2 at its peak t = 1/2."""
    return 2 * t * (1 - t) / (t**2 + (1 - t) ** 2) ** 2


def _sqrt_psi_rate(t: float) -> float:
    """d sqrt(psi) / dt = (1 - t) / (t^2 + (1 - t)^2)^(3/2)."""
    return (1 - t) / (t * t + (1 - t) ** 2) ** 1.5


def auto_tau(threshold: float = PIVOT_THRESHOLD) -> float:
    """The pivot: the first t where d sqrt(psi) / dt < threshold (0.9210 for 0.1).

    d sqrt(psi) / dt is 1 at t = 0, rises to its maximum at t = (7 - sqrt(17)) / 8 and falls to 0 at t = 1, so
    for a threshold in (0, 1) the first crossing is the one root after that maximum, found by bisection.
    """
    threshold = check_number(threshold, "threshold", above=0, below=1, hint="the official rule's value is 0.1")
    low, high = (7 - math.sqrt(17)) / 8, 1.0
    for _ in range(100):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if _sqrt_psi_rate(mid) >= threshold else (low, mid)
    return high


def check_tau(tau: Any, name: str = "tau") -> float | str:
    """A flow tau: "auto" or a number in (0, 1)."""
    if isinstance(tau, str):
        if tau.strip().lower() != "auto":
            raise ValueError(f"{name} must be a flow time in (0, 1) or 'auto', got {tau!r}.")
        return "auto"
    hint = "it is the flow time where the convergence area starts, or 'auto' (0.921)"
    if not isinstance(tau, bool) and isinstance(tau, (int, float)) and tau >= 1:
        hint = (
            f"{tau} looks like a discrete time step; the flow's tau is a time in (0, 1): use 'auto', or "
            "flow.time_from_snr(schedule.snr[step]) for the flow time with that step's SNR (0.923 for step 700 "
            "of the linear T = 1000 schedule)"
        )
    return check_number(tau, name, above=0, below=1, hint=hint)


def resolve_tau(tau: Any, name: str = "tau") -> float:
    """A numeric tau in (0, 1), or ``auto_tau()`` for "auto"."""
    tau = check_tau(tau, name)
    return auto_tau() if tau == "auto" else tau


AREA_NAMES = ("acceleration", "deceleration", "convergence")


@dataclass(frozen=True)
class FlowAreas:
    """The three areas of [0, 1]: acceleration [0, peak), deceleration [peak, tau), convergence [tau, 1].

    If tau <= peak the deceleration area is empty and acceleration ends at tau.
    """

    tau: float
    peak: float = PSI_RATE_PEAK

    def bounds(self) -> dict[str, tuple[float, float]]:
        """Each area's (start, end) flow times."""
        edge = min(self.peak, self.tau)
        return dict(zip(AREA_NAMES, ((0.0, edge), (edge, self.tau), (self.tau, 1.0))))

    def labels(self, t: Tensor) -> Tensor:
        """Area index per t (0 acceleration, 1 deceleration, 2 convergence), long, on t's device (no sync)."""
        return (t >= min(self.peak, self.tau)).long() + (t >= self.tau).long()

    def shares(self, cdf: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """The share of draws in each area for a distribution of t with this CDF (e.g. a sampler's ``cdf_at``)."""
        edges = torch.tensor([0.0, min(self.peak, self.tau), self.tau, 1.0], dtype=torch.float64)
        masses = torch.diff(torch.as_tensor(cdf(edges), dtype=torch.float64)).tolist()
        return dict(zip(AREA_NAMES, masses))

    def fractions(self) -> dict[str, float]:
        """The share of uniformly drawn t in each area."""
        return self.shares(lambda t: t)


def flow_areas(tau: FlowTau = "auto") -> FlowAreas:
    """The flow's areas for ``tau`` (a time in (0, 1) or "auto")."""
    return FlowAreas(resolve_tau(tau))
