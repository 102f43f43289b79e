"""Learned-variance math of improved DDPM (Nichol & Dhariwal 2021), as short pure functions.

Notation as in ``lightning_speed.schedules``: betas b_t, alpha_t = 1 - b_t, ab_t = prod_{s<=t} alpha_s,
t = 0 .. T-1, and ab_{-1} = 1 (the step before the first is clean data).

What lives here:

- the posterior q(x_{t-1} | x_t, x0) of the forward process (DDPM eq. 6-7), as per-t tables;
- the learned variance of improved DDPM (eq. 15): the network outputs v in [-1, 1] and
  log Sigma_t = frac log b_t + (1 - frac) log beta_tilde_t with frac = (v + 1) / 2;
- the variational bound's terms (eq. 4-5 of improved DDPM): the Gaussian KL for t > 0 and the
  decoder's discretized Gaussian log-likelihood of 8-bit data for t = 0, in bits per dimension;
- respacing: a sub-sequence of the time steps becomes a shorter chain with betas
  1 - ab_{t_i} / ab_{t_{i-1}} (improved DDPM section 4), with the map back to the original t.

Tables are float64 CPU tensors computed once from a schedule; move them with ``tables.to(device,
dtype)`` before the training step. The per-sample functions only gather and broadcast (no
host-device syncs) and work in the dtype of their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_speed.schedules import NoiseSchedule

LOG2 = math.log(2.0)


# -- the posterior q(x_{t-1} | x_t, x0) ----------------------------------------------------------
class PosteriorTables(NamedTuple):
    """Per-t tables (length T) of the forward process's posterior and the learned-variance range.

    q(x_{t-1} | x_t, x0) = N(coef_x0_t x0 + coef_xt_t x_t, variance_t)  (DDPM eq. 6-7) with
        coef_x0_t = b_t sqrt(ab_{t-1}) / (1 - ab_t),
        coef_xt_t = (1 - ab_{t-1}) sqrt(alpha_t) / (1 - ab_t),
        variance_t = beta_tilde_t = b_t (1 - ab_{t-1}) / (1 - ab_t)   (0 at t = 0).
    ``log_variance`` is log beta_tilde_t with the t = 0 entry replaced by log beta_tilde_1, as
    improved DDPM does, since log 0 is not usable as the lower end of the learned range.
    ``log_beta`` (log b_t) is the upper end of that range.
    """

    coef_x0: Tensor
    coef_xt: Tensor
    variance: Tensor
    log_variance: Tensor
    log_beta: Tensor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PosteriorTables:
        """The same tables on ``device`` in ``dtype`` (e.g. float32 buffers next to the model)."""
        return PosteriorTables(*(table.to(device=device, dtype=dtype) for table in self))


def posterior_tables(schedule: NoiseSchedule) -> PosteriorTables:
    """Float64 tables of q(x_{t-1} | x_t, x0) for every t of ``schedule`` (see ``PosteriorTables``)."""
    betas = schedule.betas.to(torch.float64)
    alpha_bar = schedule.alpha_bar.to(torch.float64)
    alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    one_minus = 1.0 - alpha_bar
    variance = betas * (1.0 - alpha_bar_prev) / one_minus
    log_variance = torch.log(torch.cat([variance[1:2], variance[1:]]))
    return PosteriorTables(
        coef_x0=betas * alpha_bar_prev.sqrt() / one_minus,
        coef_xt=(1.0 - alpha_bar_prev) * (1.0 - betas).sqrt() / one_minus,
        variance=variance,
        log_variance=log_variance,
        log_beta=torch.log(betas),
    )


def extract(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``table[t]`` shaped (B, 1, ..., 1) to broadcast against ``like`` (B, ...), in ``like``'s dtype."""
    return table[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def posterior_mean(tables: PosteriorTables, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """Mean of q(x_{t-1} | x_t, x0) (DDPM eq. 7). With a predicted x0 this is the model's mean."""
    return extract(tables.coef_x0, t, x_t) * x0 + extract(tables.coef_xt, t, x_t) * x_t


# -- the learned variance (improved DDPM eq. 15) ----------------------------------------------
def interpolate_log_variance(v: Tensor, min_log: Tensor, max_log: Tensor) -> Tensor:
    """log Sigma = frac max_log + (1 - frac) min_log with frac = (v + 1) / 2.

    ``v`` is the network's raw variance output; v = -1 gives ``min_log``, v = 1 gives ``max_log``.
    It is not clamped: values outside [-1, 1] extrapolate, as in improved DDPM.
    """
    frac = (v + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def learned_log_variance(tables: PosteriorTables, v: Tensor, t: Tensor) -> Tensor:
    """The model's log variance of p(x_{t-1} | x_t): ``v`` interpolates between log beta_tilde_t
    (clipped at t = 0) and log b_t."""
    return interpolate_log_variance(v, extract(tables.log_variance, t, v), extract(tables.log_beta, t, v))


# -- the terms of the variational bound -----------------------------------------------------------
def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats:

    1/2 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1).
    """
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) ~ 1/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the approximation improved DDPM
    (and DDPM before it) uses for the decoder; its absolute error is below 2e-4."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) in nats, elementwise, for 8-bit data rescaled to [-1, 1] under N(mean, e^(2 log_scale)).

    Each of the 256 values owns the bin [x - 1/255, x + 1/255]; the lowest bin extends to -inf
    and the highest to +inf (improved DDPM eq. 13 via DDPM section 3.3), so the probabilities
    of the 256 values sum to 1. Probabilities are floored at 1e-12 before the log.
    """
    centered = x - mean
    inv_scale = torch.exp(-log_scale)
    cdf_upper = approx_standard_normal_cdf(inv_scale * (centered + 1.0 / 255.0))
    cdf_lower = approx_standard_normal_cdf(inv_scale * (centered - 1.0 / 255.0))
    log_lowest = torch.log(cdf_upper.clamp(min=1e-12))
    log_highest = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_inner = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_lowest, torch.where(x > 0.999, log_highest, log_inner))


def mean_over_sample(values: Tensor) -> Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return values.flatten(1).mean(dim=1)


def vlb_terms(
    tables: PosteriorTables, x0: Tensor, x_t: Tensor, t: Tensor, model_mean: Tensor, model_log_variance: Tensor
) -> Tensor:
    """Per-sample term of the variational bound in bits per dimension, shape (B,).

    For t > 0: L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)); for t = 0:
    L_0 = -log p(x0 | x_1), the discretized decoder likelihood with the model's mean and variance
    (improved DDPM eq. 4-5). Each is averaged over all non-batch dimensions and divided by log 2.

    ``model_mean`` is detached here: as in improved DDPM's hybrid loss, L_vlb trains only the
    variance while L_simple trains the mean. Pass the mean from ``posterior_mean`` with the
    predicted x0 and the log variance from ``learned_log_variance``.
    """
    model_mean = model_mean.detach()
    true_mean = posterior_mean(tables, x0, x_t, t)
    true_log_variance = extract(tables.log_variance, t, x_t)
    kl = mean_over_sample(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance))
    decoder_nll = -mean_over_sample(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance))
    return torch.where(t == 0, decoder_nll, kl) / LOG2


# -- respacing (improved DDPM section 4) --------------------------------------------------------
class Respaced(NamedTuple):
    """A shorter chain over kept time steps: ``schedule`` indexes i = 0 .. n-1, and the network
    is called with the original step ``timesteps[i]`` (a long tensor, increasing)."""

    schedule: NoiseSchedule
    timesteps: Tensor


def respaced_timesteps(num_timesteps: int, steps: int) -> Tensor:
    """``steps`` evenly spaced original time steps out of 0 .. T-1, first 0 and last T-1.

    The rule of improved DDPM's ``space_timesteps`` with one section: a fractional stride
    (T - 1) / (steps - 1) accumulated from 0 and each position rounded to the nearest integer
    (Python's round, ties to even). 250 of T = 1000 gives 0, 4, 8, ..., 164, 169, ..., 995, 999:
    strides of 4 with a stride of 5 after 164, 497 and 830.
    """
    num_timesteps, steps = int(num_timesteps), int(steps)
    if not 1 <= steps <= num_timesteps:
        raise ValueError(
            f"Cannot respace {num_timesteps} diffusion steps into {steps}: choose between 1 and "
            f"{num_timesteps} steps (the respaced chain keeps a subset of the original steps)."
        )
    stride = (num_timesteps - 1) / (steps - 1) if steps > 1 else 1.0
    kept, position = [], 0.0
    for _ in range(steps):
        kept.append(round(position))
        position += stride
    return torch.tensor(kept, dtype=torch.long)


def respace(schedule: NoiseSchedule, timesteps: int | Sequence[int] | Tensor) -> Respaced:
    """The chain that visits only ``timesteps`` (or that many evenly spaced steps, given an int).

    Its alpha_bar at index i equals the original alpha_bar at ``timesteps[i]``, because its betas
    are b'_i = 1 - ab_{t_i} / ab_{t_{i-1}} (with ab before the first kept step taken as 1).
    Posterior tables built from the returned schedule give the respaced q(x_{t_{i-1}} | x_{t_i}, x0).
    """
    T = schedule.num_timesteps
    kept = torch.as_tensor(timesteps, dtype=torch.long).cpu()
    if kept.ndim == 0:  # a number of steps
        kept = respaced_timesteps(T, int(kept))
    kept = torch.sort(kept.flatten()).values
    if kept.numel() < 2:
        raise ValueError(f"A respaced chain needs at least 2 time steps, got {kept.tolist()}.")
    if kept[0] < 0 or kept[-1] >= T or (kept[1:] == kept[:-1]).any():
        raise ValueError(
            f"Respacing needs distinct time steps in [0, {T - 1}]; got {kept.numel()} steps from "
            f"{kept[0].item()} to {kept[-1].item()}{' with repeats' if (kept[1:] == kept[:-1]).any() else ''}."
        )
    alpha_bar = schedule.alpha_bar.to(torch.float64)[kept]
    previous = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    betas = 1.0 - alpha_bar / previous
    name = f"{getattr(schedule, 'name', 'custom')}-respaced-{kept.numel()}"
    return Respaced(NoiseSchedule(betas, name=name), kept)
