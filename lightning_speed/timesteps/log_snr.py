"""Time-step densities shaped in log-SNR: tables over a discrete schedule's steps, closed forms on a flow.

Continuous-time recipes draw the log-SNR lambda = log(alpha_bar / (1 - alpha_bar)) from a density
p(lambda). On a discrete schedule, step t stands for the lambdas nearer to lambda_t than to its
neighbours': the interval between the midpoints (lambda_(t-1) + lambda_t) / 2 and
(lambda_t + lambda_(t+1)) / 2, open to +inf at t = 0 and to -inf at t = T - 1. Its probability is the
density's mass there, P(t) = F(upper) - F(lower) with F the CDF in lambda, so P sums to 1 exactly
(the edges telescope); a zero-terminal-SNR last step (lambda = -inf) gets none. Draws are inverse-CDF
lookups of the table (``TableSampling``), sync-free.

* ``LaplaceLogSNRSampling`` (Hang et al. 2024, "Improved noise schedule for diffusion training"):
  p(lambda) = exp(-|lambda - mu| / b) / (2 b), their best mu = 0, b = 0.5.
* ``EDMLogNormalSampling`` (Karras et al. 2022, EDM's training noise levels): ln sigma ~ N(p_mean, p_std^2),
  p_mean = -1.2, p_std = 1.2, where sigma^2 = (1 - alpha_bar) / alpha_bar = 1 / SNR (the VP process
  rescaled to EDM's x_0 + sigma eps). Then lambda = -2 ln sigma ~ N(-2 p_mean, (2 p_std)^2).

Both densities are symmetric about a centre c; a step's mass right of c is computed from the upper
tail, F(2c - lower) - F(2c - upper), so the tiny probabilities of the steps far out keep their digits.

On a rectified flow x_t = (1 - t) x_0 + t eps, lambda = -2 logit(t) and sigma = t / (1 - t), so both
densities are densities of logit(t) in closed form, drawn by inverse CDF like the other flow samplers
(the schedule's shift applied after, which lowers every lambda by 2 log shift):

* Laplace(mu, b) in lambda is logit(t) ~ Laplace(-mu / 2, b / 2);
* EDM's ln sigma ~ N(p_mean, p_std^2) is logit(t) ~ N(p_mean, p_std^2): ``LogitNormalSampling(p_mean, p_std)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from typing_extensions import override

from lightning_speed.schedules import NoiseSchedule
from lightning_speed.timesteps.base import TableSampling, as_flow_times
from lightning_speed.timesteps.baselines import logit_normal_cdf, logit_normal_quantile
from lightning_speed.validation import check_number


def check_laplace(mu: float, b: float) -> tuple[float, float]:
    return (
        check_number(mu, "mu (the Laplace centre in log-SNR)", hint="Hang et al. use 0"),
        check_number(b, "b (the Laplace scale in log-SNR)", above=0, hint="Hang et al. use 0.5"),
    )


def check_edm(p_mean: float, p_std: float) -> tuple[float, float]:
    return (
        check_number(p_mean, "p_mean (the mean of ln sigma)", hint="EDM uses -1.2"),
        check_number(p_std, "p_std (the standard deviation of ln sigma)", above=0, hint="EDM uses 1.2"),
    )


def log_snr_edges(schedule: NoiseSchedule) -> Tensor:
    """The log-SNR interval edges of every step, float64 (T + 1,), decreasing from +inf to -inf."""
    lam = torch.log(schedule.snr)  # -inf at a zero-terminal-SNR last step
    inf = torch.full((1,), math.inf, dtype=torch.float64)
    return torch.cat([inf, 0.5 * (lam[:-1] + lam[1:]), -inf])


def symmetric_log_snr_probabilities(schedule: NoiseSchedule, cdf: Callable[[Tensor], Tensor], centre: float) -> Tensor:
    """P(t) of a log-SNR density symmetric about ``centre`` with CDF ``cdf``, float64 (T,)."""
    edges = log_snr_edges(schedule)
    upper, lower = edges[:-1], edges[1:]
    right = cdf(2 * centre - lower) - cdf(2 * centre - upper)  # upper tail: 1 - F(x) = F(2c - x)
    return torch.where(lower >= centre, right, cdf(upper) - cdf(lower))


def laplace_cdf(x: Tensor, centre: float, scale: float) -> Tensor:
    """The CDF of Laplace(centre, scale) at ``x``."""
    return torch.where(x < centre, 0.5 * torch.exp((x - centre) / scale), 1.0 - 0.5 * torch.exp((centre - x) / scale))


def laplace_quantile(u: Tensor, centre: float, scale: float) -> Tensor:
    """The inverse of ``laplace_cdf``: -inf at u = 0."""
    return centre - scale * torch.sign(u - 0.5) * torch.log1p(-2.0 * (u - 0.5).abs())


def normal_cdf(x: Tensor, mean: float, std: float) -> Tensor:
    # erfc rather than torch.special.ndtr, which loses the far lower tail (relative error 2e-2 at z = -8)
    return 0.5 * torch.special.erfc((mean - x) / (std * math.sqrt(2.0)))


def laplace_log_snr_probabilities(schedule: NoiseSchedule, mu: float = 0.0, b: float = 0.5) -> Tensor:
    """P(t) of a Laplace(mu, b) density in log-SNR on ``schedule``, float64 (T,)."""
    mu, b = check_laplace(mu, b)
    return symmetric_log_snr_probabilities(schedule, lambda x: laplace_cdf(x, mu, b), mu)


def edm_log_normal_probabilities(schedule: NoiseSchedule, p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """P(t) of EDM's ln sigma ~ N(p_mean, p_std^2) on ``schedule`` (sigma^2 = 1 / SNR), float64 (T,)."""
    p_mean, p_std = check_edm(p_mean, p_std)
    centre, scale = -2.0 * p_mean, 2.0 * p_std  # lambda = -2 ln sigma
    return symmetric_log_snr_probabilities(schedule, lambda x: normal_cdf(x, centre, scale), centre)


class LaplaceLogSNRSampling(TableSampling):
    """t drawn so that its log-SNR follows Laplace(mu, b) (Hang et al. 2024); on a flow, logit(t) ~ Laplace(-mu / 2,
    b / 2) before the shift. See the module docstring.

    Args:
        mu: the centre in log-SNR (0: SNR 1).
        b: the scale in log-SNR (0.5).
    """

    processes = ("ddpm", "flow")

    def __init__(self, mu: float = 0.0, b: float = 0.5) -> None:
        self.mu, self.b = check_laplace(mu, b)

    @override
    def build(self, schedule: NoiseSchedule, prediction: str) -> None:
        self.set_probabilities(laplace_log_snr_probabilities(schedule, self.mu, self.b))

    @override
    def quantile(self, u: Tensor) -> Tensor:
        return self.schedule.warp(torch.sigmoid(laplace_quantile(u, -self.mu / 2, self.b / 2)))

    @override
    def cdf_at(self, t: Any) -> Tensor:
        return laplace_cdf(torch.logit(self.schedule.unwarp(as_flow_times(t))), -self.mu / 2, self.b / 2)


class EDMLogNormalSampling(TableSampling):
    """t drawn so that ln sigma = -log-SNR / 2 follows N(p_mean, p_std^2) (EDM); on a flow, where ln sigma = logit(t),
    the logit-normal density with mean p_mean and std p_std, before the shift. See the module docstring.

    Args:
        p_mean: mean of ln sigma (-1.2).
        p_std: standard deviation of ln sigma (1.2).
    """

    processes = ("ddpm", "flow")

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        self.p_mean, self.p_std = check_edm(p_mean, p_std)

    @override
    def build(self, schedule: NoiseSchedule, prediction: str) -> None:
        self.set_probabilities(edm_log_normal_probabilities(schedule, self.p_mean, self.p_std))

    @override
    def quantile(self, u: Tensor) -> Tensor:
        return self.schedule.warp(logit_normal_quantile(u, self.p_mean, self.p_std))

    @override
    def cdf_at(self, t: Any) -> Tensor:
        return logit_normal_cdf(self.schedule.unwarp(as_flow_times(t)), self.p_mean, self.p_std)
