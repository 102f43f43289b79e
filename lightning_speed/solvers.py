"""Image generation from a trained denoiser: short pure functions over a diffusion process.

A solver walks a respaced chain, a sub-sequence of the T time steps in improved DDPM's spacing
(``solver_steps=250`` over T = 1000 is IDDPM-250), from pure noise to data. At each kept step it
turns the network output into estimates (x0, eps) and takes one step to the next kept step:

- ``ddim_step``: DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 has DDPM's
  posterior variance on the respaced chain. With learned sigma DDIM uses the mean only.
- ``ddpm_step``: ancestral DDPM on the respaced chain: the mean of q(x_s | x_t, x0_hat) plus
  noise with the chain's posterior variance, or with learned sigma the variance interpolated
  between the respaced betas and posterior variances (improved DDPM, section 4).
- ``dpmpp_2m_step``: DPM-Solver++(2M) (Lu et al. 2022, algorithm 2), deterministic, on the same respaced chain
  (improved DDPM's steps, evenly spaced in t from T-1 to 0: ``steps`` network calls, as DDIM). In the half log-SNR
  lambda = log(sqrt(ab) / sqrt(1 - ab)) it is a DDIM step whose x0 is extrapolated linearly from this and the
  previous step's estimates. First order (DDIM's step) are the first step (no previous estimate), the readout
  from t = 0 (lambda = inf) and the step into t = 0: even spacing in t makes that one long in lambda at any step
  count (sigma^2 grows like t + 1 near 0 on the linear schedule), where extrapolating x0 overshoots (diffusers'
  ``lower_order_final``). Its error falls with the square of the step where DDIM's falls linearly, until that
  first-order last step dominates (past about 100 steps on the linear schedule). Clipping acts on each x0
  before the extrapolation; with learned sigma it uses the mean only.

Classifier-free guidance (``guided``) wraps the network into a denoiser before it reaches a solver.
The loop indexes device tables with Python ints and draws noise on the device: no host syncs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_speed import variance
from lightning_speed.process import Denoiser, GaussianDiffusion

Solver = Literal["ddim", "ddpm", "dpmpp_2m"]
SOLVERS: tuple[str, ...] = get_args(Solver)

Network = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
"""A backbone as called by the module: ``network(x_t, t, labels)``."""


def guided(network: Network, labels: Tensor | None, null_label: int | None, scale: float) -> Denoiser:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)`` from one batched call.

    Only the prediction's channels (those of x) are guided; learned-variance channels are taken
    from the conditional half, as DiT does. ``scale == 1`` or no labels: the plain network.
    """
    if labels is None or scale == 1.0:
        return lambda x, t: network(x, t, labels)
    null = torch.full_like(labels, null_label)

    def model(x: Tensor, t: Tensor) -> Tensor:
        cond, uncond = network(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        c = x.shape[1]
        mixed = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([mixed, cond[:, c:]], dim=1)

    return model


def ddim_step(x0: Tensor, eps: Tensor, ab_t: Tensor, ab_s: Tensor, eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - ab_s) / (1 - ab_t) (1 - ab_t / ab_s)) (DDIM eq. 12 and 16)."""
    sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).clamp(min=0).sqrt()
    x_s = ab_s.sqrt() * x0 + (1 - ab_s - sigma**2).clamp(min=0).sqrt() * eps
    return x_s if noise is None else x_s + sigma * noise


def ddpm_step(
    x_t: Tensor, x0: Tensor, coef_x0: Tensor, coef_xt: Tensor, log_variance: Tensor, noise: Tensor | None = None
) -> Tensor:
    """x_s ~ N(coef_x0 x0 + coef_xt x_t, exp(log_variance)): the posterior mean at the predicted x0
    plus noise with the given variance (none for the last step, ``noise=None``)."""
    mean = coef_x0 * x0 + coef_xt * x_t
    return mean if noise is None else mean + (0.5 * log_variance).exp() * noise


def dpmpp_2m_step(x_t: Tensor, x0: Tensor, previous_x0: Tensor, ab_t: Tensor, ab_s: Tensor, ratio: Tensor) -> Tensor:
    """x_s = sqrt(ab_s) D + sqrt((1 - ab_s) / (1 - ab_t)) (x_t - sqrt(ab_t) D), D = x0 + ratio / 2 (x0 - previous_x0),
    with ratio = h / h_previous, this step in lambda over the previous one. It is DPM-Solver++(2M)'s update
    x_s = sigma_s / sigma_t x_t - alpha_s (e^-h - 1) D, D = (1 + 1 / 2r) x0 - 1 / 2r previous_x0, r = 1 / ratio
    (Lu et al. 2022, algorithm 2), with e^-h = alpha_t sigma_s / (sigma_t alpha_s): DDIM's step at x0 = D."""
    d = x0 + 0.5 * ratio * (x0 - previous_x0)
    return ab_s.sqrt() * d + ((1 - ab_s) / (1 - ab_t)).sqrt() * (x_t - ab_t.sqrt() * d)


def multistep_ratios(alpha_bar: Tensor) -> Tensor:
    """``ratio[i]`` of ``dpmpp_2m_step`` for the step from index i to i - 1 of a chain walked from its last index
    down: h_i / h_(i+1) with h_i = lambda_(i-1) - lambda_i; 0 where the step is first order (i = n-1, 1, 0).
    Zero terminal SNR (lambda = -inf at the start) makes h_previous infinite and the ratio 0: first order."""
    ab = alpha_bar.to(torch.float64)
    lam = 0.5 * (ab.log() - (-ab).log1p())
    h = lam[:-1] - lam[1:]  # h[i - 1] = lambda_(i-1) - lambda_i
    ratio = torch.zeros_like(ab)
    ratio[2:-1] = h[1:-1] / h[2:]
    return ratio


def check_solver(solver: str, steps: int, eta: float | None, num_timesteps: int | None) -> None:
    """Clear errors for a solver name, a step count and an eta that cannot work together (``num_timesteps``
    None: T is not known yet, as when an evaluation callback is built, so steps are not bounded by it)."""
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; choose one of {', '.join(map(repr, SOLVERS))}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2 or (num_timesteps is not None and steps > num_timesteps):
        bound = "of at least 2" if num_timesteps is None else f"from 2 to T = {num_timesteps}"
        raise ValueError(
            f"solver_steps must be an integer {bound} (the respaced chain keeps that many of the T steps), got {steps!r}."
        )
    if solver != "ddim" and eta is not None:
        raise ValueError(
            "eta applies to the ddim solver only (ddim with eta=1 uses DDPM's fixed variance); the ddpm solver "
            "steps with the posterior variance, or the learned one with learn_sigma, and dpmpp_2m is deterministic: "
            "leave eta unset."
        )
    if eta is not None and not 0 <= eta <= 1:  # past 1, sigma^2 can exceed 1 - alpha_bar_s: no DDIM step exists
        raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM's variance), got {eta!r}.")


@torch.no_grad()
def sample_loop(
    process: GaussianDiffusion,
    model: Denoiser,
    noise: Tensor,
    solver: Solver = "ddim",
    steps: int = 50,
    eta: float | None = None,
    clip_denoised: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Generate from pure noise ``x_T = noise`` with ``solver`` on ``steps`` respaced steps.

    ``clip_denoised`` clamps each step's predicted x0 to [-1, 1], the range of pixel data (improved DDPM); the last
    step returns that x0, so the samples lie in [-1, 1]. Latents have no such bound and are sampled unclipped (DiT).
    """
    if not isinstance(process, GaussianDiffusion):
        raise TypeError(
            f"solvers.sample_loop samples a GaussianDiffusion (DDPM), got {type(process).__name__}: a rectified flow "
            "samples with flow.sample_loop(model, noise, 'euler' or 'heun', steps, shift)."
        )
    check_solver(solver, steps, eta, process.num_timesteps)
    chain = variance.respace(process.schedule, steps)
    tables = variance.posterior_tables(chain.schedule).to(noise.device, torch.float32)
    alpha_bar = chain.schedule.alpha_bar.to(noise.device, torch.float32)
    ratios = multistep_ratios(chain.schedule.alpha_bar).to(noise.device, torch.float32)
    kept = chain.timesteps.tolist()  # original time steps, ascending (a CPU tensor: no sync)
    channels = noise.shape[1]
    x, previous_x0 = noise, None
    for i in reversed(range(len(kept))):
        t = torch.full((x.shape[0],), kept[i], device=x.device, dtype=torch.long)
        out = process.check_output(model(x, t), x).float()
        prediction, v = out.split(channels, dim=1) if process.learn_sigma else (out, None)
        x0, eps = process.split_prediction(prediction, x, t)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            # Keep eps consistent with the clipped x0 so the DDIM direction stays on the manifold.
            eps = (x - alpha_bar[i].sqrt() * x0) / (1 - alpha_bar[i]).sqrt()
        stochastic = i > 0 and (solver == "ddpm" or (eta or 0.0) > 0)
        z = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype) if stochastic else None
        ab_s = alpha_bar[i - 1] if i > 0 else alpha_bar.new_ones(())
        if solver == "ddpm":
            log_var = tables.log_variance[i] if v is None else variance.interpolate_log_variance(
                v, tables.log_variance[i], tables.log_beta[i])
            x = ddpm_step(x, x0, tables.coef_x0[i], tables.coef_xt[i], log_var, z)
        elif solver == "dpmpp_2m" and 1 < i < len(kept) - 1:
            x = dpmpp_2m_step(x, x0, previous_x0, alpha_bar[i], ab_s, ratios[i])
        else:  # ddim, and dpmpp_2m's first-order steps: the first, the one into t = 0 and the one from it
            x = ddim_step(x0, eps, alpha_bar[i], ab_s, eta or 0.0, z)
        previous_x0 = x0
    return x
