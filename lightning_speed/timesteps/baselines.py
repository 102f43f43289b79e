"""The baselines SpeeD is compared with, as the same kind of strategy objects.

Weighting strategies (tables over t, gathered per step):

* ``P2Weighting``: w(t) = scale / (k + SNR(t))^gamma (Choi et al. 2022; official k = 1, gamma = 1, scale 1), on
  the epsilon loss it was defined on; a v- or x0-prediction's loss is weighted by the same objective,
  w(t) SNR / (1 + SNR) or w(t) SNR (``epsilon_loss_scale``).
  With scale 5 it is what the SpeeD code's ``min_snr`` weighting evaluates to, 5 / (1 + SNR(t)): that
  code stacks (SNR, 5), takes a minimum and keeps element [0], the constant 5, so its Min-SNR-5 is
  five times P2 (4.61 at t = 500 and 5.0 at t = 999 on the linear schedule, where Min-SNR-5 gives 1).
* ``MinSNRWeighting``: Min-SNR-gamma (Hang et al. 2023), gamma = 5. The clamp min(SNR, gamma)
  is defined on the x0-space loss; expressed for the loss the network is trained on:
  epsilon-prediction w = min(SNR, gamma) / SNR, v-prediction w = min(SNR, gamma) / (SNR + 1),
  x0-prediction w = min(SNR, gamma).

Both are finite at SNR = 0 (a zero-terminal-SNR schedule's last step): epsilon-prediction's
min(SNR, gamma) / SNR is 1 for every SNR <= gamma and is computed as min(gamma / SNR, 1), which
is 1 there too; P2 needs k > 0 on such a schedule (1 / SNR^gamma is infinite at SNR = 0).

On a flow both weight the velocity MSE ||v_hat - v||^2, whose x0 and eps errors are
||x0_hat - x0||^2 = t^2 ||v_hat - v||^2 and ||eps_hat - eps||^2 = (1 - t)^2 ||v_hat - v||^2 (docs/flow_matching.md):
Min-SNR w(t) = min(SNR, gamma) t^2 = min((1 - t)^2, gamma t^2), P2 w(t) = scale (1 - t)^2 / (k + SNR(t))^gamma
(k > 0: SNR reaches 0 at t = 1).

Sampling strategies (on a flow, t = Q(u) for uniform u with the schedule's shift applied after Q, as SD3's
training applies it):

* ``LogitNormalSampling`` (SD3, Esser et al. 2024): u ~ N(mean, std^2), t = round(sigmoid(u) (T - 1));
  SD3's location m = 0 and scale s = 1 are ``mean`` and ``std``. On a flow t = sigmoid(u); a shift s then
  equals a mean of mean + log s.
* ``ModeSampling`` (SD3's mode sampling, flows only): t = f(1 - u), f(u) = 1 - u - scale (cos^2(pi u / 2) - 1 + u);
  f is a decreasing bijection of [0, 1] exactly for scale in [-1, 2 / (pi - 2)] (SD3: 1.29).
* ``CosMapSampling`` (SD3's CosMap, flows only): t = 1 - 1 / (tan(pi u / 2) + 1), density 2 / (pi (1 - 2t + 2t^2)).
* ``CLTSSampling``: curriculum p(t) = (1 - a) U(t) + a N(t; mu, sigma) with a = min(step / total_steps, 1),
  total_steps by default the run's length (trainer.max_steps), so that the curriculum completes in any run.
  mu = 300 (official) and sigma = 200 are given in steps of a T = 1000 process and scale by
  T / 1000. Our choice of sigma = 200: the Gaussian's +-1.5 sigma band [0, 600] covers the
  acceleration and deceleration areas of the linear schedule (peak 219, pivot 642) while its
  tail still reaches the convergence area, so the curriculum concentrates on the informative
  steps without starving any t (the mixture keeps the uniform part until a = 1 anyway).
  The Gaussian is evaluated at the integers 0..T-1 and renormalised (truncated).
  The SpeeD code's own CLTS evaluates exp(-((t - mu)^2) / 2 * T^2): by operator precedence a
  Gaussian of width 1 / T, so all of its mass sits on t = mu. sigma = 0.001 (1 / T in steps of a
  T = 1000 process) reproduces it exactly: exp(-5e5 (t - 300)^2) underflows to 0 at every other t.
  The distribution is a lerp between two fixed CDF tables, recomputed on the device from a
  Python step count (``set_step``) without syncs.
* ``LossAwareSampling`` (Nichol & Dhariwal 2021, "loss-second-moment"): keeps the last
  ``history`` losses per t in a (T, history) device buffer; once every t has a full history
  p(t) is proportional to sqrt(mean(L_t^2)), mixed with ``uniform_prob`` uniform; before that
  it is uniform. Each sample's loss is multiplied by 1 / (T p(t)) so the objective stays
  unbiased. ``update`` is vectorised (sort + scatter) and sync-free, and handles repeated t
  in a batch deterministically: occurrences are written in batch order, so the buffer ends
  up holding the last ``history`` losses of each t. Non-finite losses are ignored. On a flow the history is
  kept on ``bins`` bins of equal width in the unshifted time u (t = shift(u); equal bins of t without a shift):
  a bin b is drawn with p_b, u uniform inside it, so 1 / (bins p_b) keeps the objective of the shifted
  uniform default unbiased.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor
from typing_extensions import override

from lightning_speed import flow
from lightning_speed.flow import FlowSchedule
from lightning_speed.schedules import NoiseSchedule, Prediction, check_prediction
from lightning_speed.timesteps.base import (
    FLOW_EDGE, SamplingStrategy, TableSampling, TableWeighting, as_flow_times, binned_flow_cdf, check_run_length,
    flow_bin, inverse_cdf_sample, probabilities_to_cdf, sample_binned_flow,
)
from lightning_speed.validation import check_int, check_number


MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))
"""The scales for which SD3's mode map is a monotone bijection of [0, 1]."""
PAPER_CLTS_STEPS = 50_000
"""The paper's CLTS length: a = step / 50000."""


def logit_normal_quantile(u: Tensor, mean: float, std: float) -> Tensor:
    """The unshifted flow time sigmoid(mean + std ndtri(u)) of a logit-normal density."""
    return torch.sigmoid(mean + std * torch.special.ndtri(u))


def logit_normal_cdf(t: Tensor, mean: float, std: float) -> Tensor:
    """The CDF of a logit-normal density at unshifted flow times ``t`` (float64)."""
    return torch.special.ndtr((torch.logit(t) - mean) / std)


def check_min_snr(gamma: float) -> float:
    return check_number(gamma, "gamma", above=0, hint="the paper uses 5")


def _check_clts_gaussian(mu: float, sigma: float) -> tuple[float, float]:
    """The target Gaussian's centre and width, in steps of a T = 1000 process (scaled by T / 1000).

    The centre must be a time step, in [0, 1000): far outside, the truncated Gaussian is a sliver of
    its tail (mu = 5000 puts every t in the last hundred steps) or underflows to zero everywhere
    (NaN probabilities, every draw t = T - 1).
    """
    return (
        check_number(
            mu, "mu", at_least=0, below=1000,
            hint="it is the centre time step in steps of a T = 1000 process (scaled by T / 1000); "
            "the official value is 300",
        ),
        check_number(sigma, "sigma", above=0, hint="use e.g. 200 (steps of a T = 1000 process)"),
    )


# ------------------------------------------------------------------------------ weights
def p2_weights(schedule: NoiseSchedule, k: float = 1.0, gamma: float = 1.0, scale: float = 1.0) -> Tensor:
    """P2 weighting scale / (k + SNR)^gamma, float64 (T,)."""
    snr = schedule.snr
    if k == 0 and gamma > 0 and bool((snr == 0).any()):
        raise ValueError(
            f"P2 with k = 0 is infinite where SNR = 0, and the {schedule.name} schedule reaches SNR = 0 at "
            f"t = {schedule.num_timesteps - 1} (zero terminal SNR): use k > 0 (the official value is 1)."
        )
    return scale / (k + snr) ** gamma


def epsilon_loss_scale(schedule: NoiseSchedule, prediction: Prediction) -> Tensor:
    """||eps_hat - eps||^2 over the squared error of ``prediction`` at each t, float64 (T,): 1 for epsilon, since
    eps = alpha v + sigma x_t gives alpha^2 = SNR / (1 + SNR) for v, and x0 = (x_t - sigma eps) / alpha gives SNR
    for x0. A weighting defined on the epsilon loss times this is the same objective on the other losses."""
    snr, prediction = schedule.snr, check_prediction(prediction)
    if prediction == "epsilon":
        return torch.ones_like(snr)
    return snr / (snr + 1.0) if prediction == "v" else snr


def flow_p2_weight(t: Tensor, k: float = 1.0, gamma: float = 1.0, scale: float = 1.0) -> Tensor:
    """P2 on a flow's velocity loss: scale (1 - t)^2 / (k + SNR(t))^gamma (0 at t = 0, where SNR is inf)."""
    return scale * (1 - t) ** 2 / (k + flow.snr(t)) ** gamma


def flow_min_snr_weight(t: Tensor, gamma: float = 5.0) -> Tensor:
    """Min-SNR-gamma on a flow's velocity loss: min(SNR, gamma) t^2 = min((1 - t)^2, gamma t^2)."""
    return torch.minimum((1 - t) ** 2, gamma * t**2)


class P2Weighting(TableWeighting):
    """Perception-prioritised weighting (Choi et al. 2022): w(t) = scale / (k + SNR(t))^gamma on the epsilon loss;
    on a v- or x0-prediction's loss times SNR / (1 + SNR) or SNR, on a flow's velocity loss times (1 - t)^2, the same
    objective (see the module docstring).

    Args:
        k: the offset (official 1; 0 needs a schedule whose SNR stays above 0, so never on a flow).
        gamma: the exponent (official 1).
        scale: 1 is P2; 5 (with k 1, gamma 1) is the SpeeD code's ``min_snr`` weighting (see the module
            docstring), which ``configs/study/official_code_min_snr.yaml`` trains.
    """

    processes = ("ddpm", "flow")
    uses_prediction = True

    def __init__(self, k: float = 1.0, gamma: float = 1.0, scale: float = 1.0) -> None:
        self.k = check_number(k, "P2's k", at_least=0, hint="the official value is 1")
        self.gamma = check_number(gamma, "P2's gamma", at_least=0, hint="the official value is 1")
        self.scale = check_number(scale, "P2's scale", above=0,
                                  hint="1 is P2; 5 is the SpeeD code's 'min_snr', 5 / (1 + SNR)")

    @override
    def build(self, schedule: NoiseSchedule, prediction: str) -> None:
        self.set_weights(p2_weights(schedule, self.k, self.gamma, self.scale) * epsilon_loss_scale(schedule, prediction))

    @override
    def build_flow(self, schedule: FlowSchedule) -> None:
        if self.k == 0 and self.gamma > 0:
            raise ValueError(
                "P2 with k = 0 is infinite at t = 1 of a flow, where SNR = 0: use k > 0 (the official value is 1)."
            )
        # The weights are computed per step from float32 t: they must stay finite there, up to t = 1 - 2^-24.
        t = torch.cat([torch.linspace(FLOW_EDGE, 1 - FLOW_EDGE, 4097), 1 - torch.logspace(-7.2, -1, 256)]).float()
        if not bool(torch.isfinite(flow_p2_weight(t, self.k, self.gamma, self.scale)).all()):
            raise ValueError(
                f"{self!r} gives loss weights beyond float32's range (3.4e38) near t = 1 of a flow, where SNR -> 0 and "
                "the weight approaches scale (1 - t)^2 / k^gamma: choose a larger k or a smaller gamma."
            )

    @override
    def flow_weight(self, t: Tensor) -> Tensor:
        return flow_p2_weight(t, self.k, self.gamma, self.scale)


def min_snr_weights(schedule: NoiseSchedule, gamma: float = 5.0, prediction: Prediction = "epsilon") -> Tensor:
    """Min-SNR-gamma weights for the given parameterisation, float64 (T,); finite at SNR = 0."""
    snr = schedule.snr
    prediction = check_prediction(prediction)
    if prediction == "epsilon":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR, and 1 at SNR = 0 (gamma / 0 = inf)
    clamped = snr.clamp(max=gamma)
    if prediction == "v":
        return clamped / (snr + 1.0)
    return clamped


class MinSNRWeighting(TableWeighting):
    """Min-SNR-gamma weighting (Hang et al. 2023) for epsilon-, v- or x0-prediction, and for a flow's velocity.

    The weights depend on what the network predicts: the prediction ``bind`` is given, which
    ``TimestepStrategy`` takes from its ``prediction`` (``DiffusionModule`` passes its own).

    Args:
        gamma: the SNR clamp (5).
    """

    uses_prediction = True
    processes = ("ddpm", "flow")

    def __init__(self, gamma: float = 5.0) -> None:
        self.gamma = check_min_snr(gamma)

    @override
    def build(self, schedule: NoiseSchedule, prediction: str) -> None:
        self.set_weights(min_snr_weights(schedule, self.gamma, prediction))

    @override
    def flow_weight(self, t: Tensor) -> Tensor:
        return flow_min_snr_weight(t, self.gamma)


# -------------------------------------------------------------------------------- samplers
def logit_normal_probabilities(num_timesteps: int, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Exact P(t) of t = round(sigmoid(u) (T - 1)), u ~ N(mean, std^2), float64 (T,)."""
    T = int(num_timesteps)
    edges = (torch.arange(T + 1, dtype=torch.float64) - 0.5) / (T - 1)  # t covers [t - 0.5, t + 0.5)
    edges = edges.clamp(0.0, 1.0)
    u = torch.logit(edges)  # -inf at 0, +inf at 1
    cdf = torch.special.ndtr((u - mean) / std)
    return cdf[1:] - cdf[:-1]


class LogitNormalSampling(TableSampling):
    """Logit-normal time steps (SD3): t = round(sigmoid(u) (T - 1)), u ~ N(mean, std^2); on a flow
    t = shift(sigmoid(u)).

    Args:
        mean: SD3's location m (0).
        std: SD3's scale s (1).
    """

    processes = ("ddpm", "flow")

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        self.mean = check_number(mean, "mean", hint="SD3 uses 0")
        self.std = check_number(std, "std", above=0, hint="SD3 uses 1")

    @override
    def build(self, schedule: NoiseSchedule, prediction: str) -> None:
        self.set_probabilities(logit_normal_probabilities(schedule.num_timesteps, self.mean, self.std))

    @override
    def sample(self, n: int) -> Tensor:
        if self.process == "flow":
            return self.sample_flow(n)
        u = torch.randn(n, device=self.device, generator=self.generator, dtype=torch.float32) * self.std + self.mean
        return torch.round(torch.sigmoid(u) * (self.num_timesteps - 1)).long()

    @override
    def quantile(self, u: Tensor) -> Tensor:
        return self.schedule.warp(logit_normal_quantile(u, self.mean, self.std))

    @override
    def cdf_at(self, t: Any) -> Tensor:
        return logit_normal_cdf(self.schedule.unwarp(as_flow_times(t)), self.mean, self.std)


class FlowSampling(SamplingStrategy):
    """Base of the samplers that exist on flows only: t = shift(Q(u)) with the unshifted quantile ``_map``
    and CDF ``_cdf`` (float64) of the subclass."""

    processes = ("flow",)

    def _map(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _cdf(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    @override
    def sample(self, n: int) -> Tensor:
        return self.sample_flow(n)

    @override
    def probabilities(self) -> Tensor:
        return self.flow_probabilities()

    @override
    def quantile(self, u: Tensor) -> Tensor:
        return self.schedule.warp(self._map(u))

    @override
    def cdf_at(self, t: Any) -> Tensor:
        return self._cdf(self.schedule.unwarp(as_flow_times(t)))


class ModeSampling(FlowSampling):
    """SD3's mode sampling on a flow, t = f(1 - u) with f(u) = 1 - u - scale (cos^2(pi u / 2) - 1 + u).

    Args:
        scale: in [-1, 2 / (pi - 2)] (SD3: 1.29); larger scales put more mass around t = 1/2, 0 is uniform.
    """

    def __init__(self, scale: float = 1.29) -> None:
        low, high = MODE_SCALE_RANGE
        self.scale = check_number(
            scale, "scale", at_least=low, at_most=high,
            hint="outside this range SD3's mode map is not monotone, so it is no distribution on [0, 1]; SD3 uses 1.29",
        )

    def _mode(self, u: Tensor) -> Tensor:
        return 1 - u - self.scale * (torch.cos(0.5 * math.pi * u) ** 2 - 1 + u)

    @override
    def _map(self, u: Tensor) -> Tensor:
        return self._mode(1 - u)

    @override
    def _cdf(self, t: Tensor) -> Tensor:
        # F(t) = 1 - f^-1(t); f decreases from 1 to 0, so bisect for f(u) = t.
        low, high = torch.zeros_like(t), torch.ones_like(t)
        for _ in range(60):
            mid = 0.5 * (low + high)
            above = self._mode(mid) > t
            low, high = torch.where(above, mid, low), torch.where(above, high, mid)
        return 1 - 0.5 * (low + high)


class CosMapSampling(FlowSampling):
    """SD3's CosMap on a flow, t = 1 - 1 / (tan(pi u / 2) + 1)."""

    @override
    def _map(self, u: Tensor) -> Tensor:
        return 1 - 1 / (torch.tan(0.5 * math.pi * u) + 1)

    @override
    def _cdf(self, t: Tensor) -> Tensor:
        return torch.atan2(t, 1 - t) * (2 / math.pi)  # (2 / pi) atan(t / (1 - t)), 1 at t = 1


def clts_gaussian(num_timesteps: int, mu: float = 300.0, sigma: float = 200.0) -> Tensor:
    """The curriculum's target: N(t; mu, sigma) at t = 0..T-1, renormalised; mu, sigma in T=1000 units."""
    T = check_int(num_timesteps, "num_timesteps", minimum=1)
    mu, sigma = _check_clts_gaussian(mu, sigma)
    scale = T / 1000.0
    t = torch.arange(T, dtype=torch.float64)
    density = torch.exp(-0.5 * ((t - mu * scale) / (sigma * scale)) ** 2)
    total = float(density.sum())  # built once, on the host: not in the training step
    if not (math.isfinite(total) and total > 0):
        raise ValueError(
            f"CLTS: N(t; mu={mu:g}, sigma={sigma:g}) puts no probability on any time step t = 0..{T - 1} (T = {T}; "
            f"its density underflows between the integers), so there is no distribution to sample: use a larger "
            f"sigma (e.g. 200, in steps of a T = 1000 process)."
        )
    return density / total


class CLTSSampling(TableSampling):
    """Curriculum time-step sampling: uniform at step 0, moving to N(mu, sigma) by ``total_steps``.

    Args:
        mu: centre of the target Gaussian in steps of a T = 1000 process (official 300; scales with T).
        sigma: its width, same units (our choice 200: see the module docstring).
        total_steps: optimizer steps until the curriculum reaches the Gaussian; None: the run's, ``trainer.max_steps``
            (the paper's 50000 where ``set_step`` is given no max_steps, outside a Trainer).

    ``set_step(step, max_steps)`` moves it (``TimestepCallback`` calls it at every batch from ``trainer.global_step``
    and ``trainer.max_steps``); the tables stay on the device and nothing syncs. A ``total_steps`` beyond max_steps
    warns: the run ends with the curriculum at a = max_steps / total_steps.
    """

    def __init__(self, mu: float = 300.0, sigma: float = 200.0, total_steps: int | None = None) -> None:
        self.mu, self.sigma = _check_clts_gaussian(mu, sigma)
        self.total_steps = None if total_steps is None else check_int(
            total_steps, "total_steps", minimum=1, hint="the paper uses 50000; null: trainer.max_steps")
        self.anneal_steps = PAPER_CLTS_STEPS if total_steps is None else self.total_steps
        self._warned_max_steps: int | None = None
        self._resumed_anneal_steps: int | None = None  # a checkpoint's annealing length, until the run's is known

    @override
    def build(self, schedule: NoiseSchedule, prediction: str) -> None:
        T = schedule.num_timesteps
        uniform = torch.full((T,), 1.0 / T, dtype=torch.float64)
        target = clts_gaussian(T, self.mu, self.sigma)
        self.uniform_probs, self.target_probs = uniform.float(), target.float()
        self.uniform_cdf = probabilities_to_cdf(uniform).float()
        self.target_cdf = probabilities_to_cdf(target).float()
        self.set_step(0)

    @property
    def progress(self) -> float:
        """The mixing weight a = min(step / anneal_steps, 1)."""
        return min(self.step / self.anneal_steps, 1.0)

    @override
    def set_step(self, step: int, max_steps: int | None = None) -> None:
        """Move the curriculum to optimizer step ``step`` of a run of ``max_steps`` (Python ints: no sync)."""
        self.step = check_int(step, "step", minimum=0, hint="the optimizer step, trainer.global_step")
        if max_steps is not None:
            self._follow_run(max_steps)
        a = self.progress
        self.cdf = torch.lerp(self.uniform_cdf, self.target_cdf, a)
        self.probs = torch.lerp(self.uniform_probs, self.target_probs, a)

    def _follow_run(self, max_steps: int) -> None:
        """Anneal over ``max_steps`` without a ``total_steps``; warn once when a ``total_steps`` outlasts it."""
        if self.total_steps is None:
            check_run_length(max_steps, "CLTSSampling anneals over trainer.max_steps when total_steps is null",
                             ", or total_steps (the paper's 50000)")
            resumed, self._resumed_anneal_steps = self._resumed_anneal_steps, None
            if resumed is not None and resumed != max_steps and self.step > 0:
                warnings.warn(
                    f"CLTSSampling resumed at step {self.step} with trainer.max_steps={max_steps}, but it was "
                    f"annealing over {resumed} steps (total_steps null: the run's length): its mixing weight moves "
                    f"from a = {min(self.step / resumed, 1):.2f} to {min(self.step / max_steps, 1):.2f}. Set "
                    f"total_steps: {resumed} to keep the curriculum.",
                    UserWarning, stacklevel=3,
                )
            self.anneal_steps = max_steps
        elif 0 < max_steps < self.total_steps and max_steps != self._warned_max_steps:
            self._warned_max_steps = max_steps
            warnings.warn(
                f"CLTSSampling(total_steps={self.total_steps}) anneals past trainer.max_steps={max_steps}: the run "
                f"ends with the curriculum at a = {max_steps / self.total_steps:.2f}, not at its Gaussian. Set "
                "total_steps to null (the run's length) or to max_steps; keep it for the paper's a = step / 50000 "
                "in a shorter run.",
                UserWarning, stacklevel=3,
            )

    @override
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "step": self.step, "anneal_steps": self.anneal_steps}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if self.total_steps is None and "anneal_steps" in state:  # compared with the resumed run's max_steps
            self.anneal_steps = self._resumed_anneal_steps = int(state["anneal_steps"])
        self.set_step(int(state.get("step", 0)))


class LossAwareSampling(TableSampling):
    """Importance sampling by the loss's second moment per t (improved DDPM).

    Args:
        history: losses kept per t (10 in the paper); sampling stays uniform until every t has them.
        uniform_prob: share of the uniform distribution mixed in once warm (0.001).
        bins: on a flow, the number of bins of time with a loss history (see the module docstring; 100 fill
            their history of 10 within a few thousand draws); unused on a discrete schedule, which keeps one
            history per time step.

    Samples are re-weighted by 1 / (T p(t)) inside ``TimestepStrategy.loss``, so the objective stays
    unbiased; it combines with any weighting (the weights multiply).

    Several processes (DDP): ``all_gather`` is a function that returns a tensor of every rank stacked,
    shaped (world_size, *shape) (``TimestepCallback`` sets ``lightning_speed.callbacks.strategies.gather_from_ranks``
    when the world is larger than one). ``update`` then records the losses of all ranks, in rank order,
    so every rank keeps the same history and draws from the same p(t) with its own generator. The
    gather is one collective per step on the device, without a host sync; all ranks must pass the
    same batch size at each step (as DDP's DistributedSampler and drop_last loaders give).
    """

    all_gather: Callable[[Tensor], Tensor] | None = None
    processes = ("ddpm", "flow")

    def __init__(self, history: int = 10, uniform_prob: float = 0.001, bins: int = 100) -> None:
        self.history = check_int(history, "history", minimum=1, hint="the paper keeps 10 losses per t")
        self.uniform_prob = check_number(uniform_prob, "uniform_prob", above=0, at_most=1,
                                         hint="the paper mixes in 0.001")
        self.bins = check_int(bins, "bins", minimum=1, hint="the number of bins of flow time with a loss history")

    @override
    def build(self, schedule: NoiseSchedule, prediction: str) -> None:
        self.start_history(schedule.num_timesteps)

    @override
    def build_flow(self, schedule: FlowSchedule) -> None:
        self.start_history(self.bins)

    def slot_of(self, t: Tensor) -> Tensor:
        """The history slot of each t: t itself on a discrete schedule, its bin on a flow (long, on t's device)."""
        if self.process != "flow":
            return t
        return flow_bin(self.schedule, t, self.bins)

    @override
    def sample(self, n: int) -> Tensor:
        if self.process != "flow":
            return inverse_cdf_sample(self.cdf, n, self.generator)
        return sample_binned_flow(self.schedule, self.cdf, n, self.generator)

    @override
    def cdf_at(self, t: Any) -> Tensor:
        """P(drawn t <= t) on a flow under the current bin probabilities (piecewise linear in the unshifted time)."""
        return binned_flow_cdf(self.schedule, self.probs, t)

    def start_history(self, num_timesteps: int) -> None:
        """An empty history for ``num_timesteps`` values of t (uniform p until it fills)."""
        T = self.num_timesteps = num_timesteps
        # Row T is a scratch row: writes that must not land (non-finite losses, occurrences beyond
        # the last `history` of a t in one batch) go there, so every real write is unique.
        # float32 whatever the default dtype: bound under bf16 (e.g. in Trainer.init_module) its history would round
        self._buffer = torch.zeros(T + 1, self.history, dtype=torch.float32)
        self._counts = torch.zeros(T + 1, dtype=torch.long)
        self._uniform = torch.full((T,), 1.0 / T, dtype=torch.float32)
        self.probs = self._uniform.clone()
        self.cdf = probabilities_to_cdf(self._uniform.double()).float()

    # -- views ------------------------------------------------------------------------
    @property
    def loss_history(self) -> Tensor:
        """(T, history) ring buffer of the latest losses per t."""
        return self._buffer[:-1]

    @property
    def counts(self) -> Tensor:
        """(T,) number of losses seen per t (saturates nowhere; slots wrap around)."""
        return self._counts[:-1]

    @property
    def warm(self) -> Tensor:
        """Device bool scalar: every t has a full history."""
        return (self.counts >= self.history).all()

    # -- the protocol -----------------------------------------------------------------
    @override
    def importance_weight(self, t: Tensor) -> Tensor:
        return 1.0 / (self.num_timesteps * self.probs[self.slot_of(t)])

    @override
    def update(self, t: Tensor, losses: Tensor) -> None:
        T, H = self.num_timesteps, self.history
        t = self.slot_of(t.reshape(-1)).to(self._counts.device)
        losses = losses.reshape(-1).detach().to(self._buffer.device, self._buffer.dtype)
        if self.all_gather is not None:  # one collective: t is exact in float32 (T < 2**24)
            both = self.all_gather(torch.stack([t.to(losses.dtype), losses]))  # (world, 2, B)
            both = both.reshape(-1, 2, t.numel()).transpose(0, 1).reshape(2, -1)  # rank-major
            t, losses = both[0].round().long(), both[1]
        key = torch.where(torch.isfinite(losses), t, torch.full_like(t, T))
        key, order = torch.sort(key, stable=True)  # groups of equal t, batch order inside each
        losses = losses[order]
        pos = torch.arange(key.numel(), device=key.device)
        is_start = torch.ones_like(key, dtype=torch.bool)
        is_start[1:] = key[1:] != key[:-1]
        group_start = torch.cummax(torch.where(is_start, pos, torch.zeros_like(pos)), dim=0).values
        rank = pos - group_start  # occurrence index of this t within the batch
        sizes = torch.zeros_like(self._counts).scatter_add_(0, key, torch.ones_like(key))
        keep = (rank >= sizes[key] - H) & (key < T)
        slot = (self._counts[key] + rank) % H
        row = torch.where(keep, key, torch.full_like(key, T))
        slot = torch.where(keep, slot, torch.zeros_like(slot))
        self._buffer.index_put_((row, slot), losses)
        self._counts += sizes
        self._refresh()

    def _refresh(self) -> None:
        """Recompute p (and its CDF) from the buffer; uniform until warm (torch.where, no sync)."""
        second_moment = self.loss_history.pow(2).mean(dim=1).sqrt()
        total = second_moment.sum()
        learned = second_moment / total.clamp_min(torch.finfo(total.dtype).tiny)
        learned = learned * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        use = self.warm & (total > 0)
        self.probs = torch.where(use, learned, self._uniform)
        self.cdf = probabilities_to_cdf(self.probs)

    # -- checkpointing ----------------------------------------------------------------
    @override
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "history": self.loss_history.cpu().clone(), "counts": self.counts.cpu().clone()}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if "history" in state:
            history = torch.as_tensor(state["history"], dtype=self._buffer.dtype)
            if tuple(history.shape) != (self.num_timesteps, self.history):
                raise ValueError(
                    f"The checkpoint's loss history has shape {tuple(history.shape)} but this sampler keeps "
                    f"({self.num_timesteps}, {self.history}): resume with the same T and history."
                )
            self._buffer[:-1] = history.to(self._buffer.device)
            self._counts[:-1] = torch.as_tensor(state["counts"], dtype=torch.long).to(self._counts.device)
            self._refresh()
