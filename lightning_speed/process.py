"""The diffusion process: forward noising, prediction targets, and samplers.

``GaussianDiffusion`` holds a schedule's tables as float32 buffers on the model's device
and does everything per step with gathers and broadcasting: no host syncs.

Sampling is one loop, k-diffusion style: walk a descending sub-sequence of time steps,
turn the network output into (x0, eps) estimates, and step with DDIM's update. With
``eta = 0`` the step is deterministic DDIM; with ``eta = 1`` it is DDPM's ancestral step
(its noise is exactly the posterior variance of q(x_s | x_t, x0) for the respaced chain).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_speed.schedules import NoiseSchedule

PREDICTIONS = ("epsilon", "v", "x0")
SAMPLERS = ("ddim", "ddpm")

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""A network as the sampler sees it: ``model(x_t, t) -> prediction``."""


def _expand(values: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample values (B,) to broadcast against ``like`` (B, ...)."""
    return values.view(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion(nn.Module):
    """Forward process, targets and samplers of a discrete DDPM schedule."""

    def __init__(self, schedule: NoiseSchedule, prediction: str = "epsilon") -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"Unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}.")
        self.schedule = schedule
        self.prediction = prediction
        self.num_timesteps = schedule.num_timesteps
        ab = schedule.alpha_bar
        # Non-persistent: derived from the schedule, so checkpoints stay small and portable.
        self.register_buffer("alpha_bar", ab.float(), persistent=False)
        self.register_buffer("sqrt_alpha_bar", ab.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alpha_bar", (1 - ab).sqrt().float(), persistent=False)

    # -- training ----------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
        return _expand(self.sqrt_alpha_bar[t], x0) * x0 + _expand(self.sqrt_one_minus_alpha_bar[t], x0) * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network is trained to output for this parameterisation."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "x0":
            return x0
        # v = sqrt(ab) eps - sqrt(1 - ab) x0  (Salimans & Ho 2022)
        return _expand(self.sqrt_alpha_bar[t], x0) * noise - _expand(self.sqrt_one_minus_alpha_bar[t], x0) * x0

    def training_losses(self, model: Denoiser, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Per-sample mean squared error of the prediction, shape (B,)."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t)
        err = (out.float() - self.target(x0, noise, t).float()) ** 2
        return err.flatten(1).mean(dim=1)

    # -- from a prediction to (x0, eps) -------------------------------------------------------
    def split_prediction(self, out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Return (x0_hat, eps_hat) implied by the network output at x_t."""
        a = _expand(self.sqrt_alpha_bar[t], x_t)
        s = _expand(self.sqrt_one_minus_alpha_bar[t], x_t)
        if self.prediction == "epsilon":
            eps = out
            x0 = (x_t - s * eps) / a
        elif self.prediction == "x0":
            x0 = out
            eps = (x_t - a * x0) / s
        else:  # v
            x0 = a * x_t - s * out
            eps = s * x_t + a * out
        return x0, eps

    # -- sampling ----------------------------------------------------------------------
    def timestep_sequence(self, steps: int) -> Tensor:
        """``steps`` evenly spaced time steps from T-1 down to 0 (descending, long)."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"Sampling steps must be in [1, {self.num_timesteps}], got {steps}.")
        seq = torch.linspace(self.num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()
        return seq.to(self.alpha_bar.device)

    def ddim_step(self, x_t: Tensor, x0: Tensor, eps: Tensor, t: int, s: int, eta: float, noise: Tensor | None) -> Tensor:
        """One DDIM update from t to s < t (s = -1 means the clean end, alpha_bar = 1).

        ``noise`` is the fresh Gaussian for the stochastic part; ``None`` when eta = 0 or s = -1.
        """
        ab_t = self.alpha_bar[t]
        ab_s = self.alpha_bar[s] if s >= 0 else ab_t.new_ones(())
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).clamp(min=0).sqrt()
        direction = (1 - ab_s - sigma**2).clamp(min=0).sqrt() * eps
        x_s = ab_s.sqrt() * x0 + direction
        if noise is not None:
            x_s = x_s + sigma * noise
        return x_s

    @torch.no_grad()
    def sample(
        self,
        model: Denoiser,
        noise: Tensor,
        steps: int = 50,
        eta: float = 0.0,
        clip_denoised: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Generate from pure noise ``x_T = noise``; ``eta = 0`` is DDIM, ``eta = 1`` DDPM."""
        x = noise
        seq = self.timestep_sequence(steps).tolist()  # host list once, before the loop
        for i, t in enumerate(seq):
            s = seq[i + 1] if i + 1 < len(seq) else -1
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            x0, eps = self.split_prediction(model(x, t_batch).float(), x, t_batch)
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
                # Keep eps consistent with the clipped x0 so the DDIM direction stays on the manifold.
                eps = (x - self.sqrt_alpha_bar[t] * x0) / self.sqrt_one_minus_alpha_bar[t]
            z = None
            if eta > 0 and s >= 0:
                z = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
            x = self.ddim_step(x, x0, eps, t, s, eta, z)
        return x

    def ddim_sample(self, model: Denoiser, noise: Tensor, steps: int = 50, **kwargs) -> Tensor:
        """Deterministic DDIM (eta = 0): the same noise gives the same images."""
        return self.sample(model, noise, steps=steps, eta=0.0, **kwargs)

    def ddpm_sample(self, model: Denoiser, noise: Tensor, steps: int | None = None, **kwargs) -> Tensor:
        """Ancestral DDPM sampling, on all T steps or a respaced subset of ``steps``."""
        return self.sample(model, noise, steps=steps or self.num_timesteps, eta=1.0, **kwargs)
