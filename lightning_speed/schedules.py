"""Noise schedules: betas in, every per-step quantity SpeeD needs out.

All tables are computed once in float64 on the CPU. Consumers that run in the training
step (the diffusion process, the time-step strategies) copy what they need into float32
device buffers; nothing here is touched per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

SCHEDULE_NAMES = ("linear", "quadratic", "cosine", "constant")


def linear_betas(num_timesteps: int) -> Tensor:
    """DDPM's linear schedule, 1e-4 to 0.02 at T = 1000; both ends scale by 1000 / T."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def quadratic_betas(num_timesteps: int) -> Tensor:
    """sqrt(beta) linear between sqrt(1e-4) and sqrt(0.02)."""
    return torch.linspace(1e-4**0.5, 0.02**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def constant_betas(num_timesteps: int, beta: float = 0.02) -> Tensor:
    """The same beta at every step (an ablation in the paper)."""
    return torch.full((num_timesteps,), beta, dtype=torch.float64)


_BUILDERS = {
    "linear": linear_betas,
    "quadratic": quadratic_betas,
    "cosine": cosine_betas,
    "constant": constant_betas,
}


class NoiseSchedule:
    """A discrete DDPM noise schedule over t = 0 .. T-1.

    Build one by name (``NoiseSchedule.from_name("linear", 1000)``) or from explicit betas.
    Attributes are float64 CPU tensors of length T.
    """

    def __init__(self, betas: Tensor | Sequence[float], name: str = "custom") -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
        if betas.numel() < 2:
            raise ValueError(f"A noise schedule needs at least 2 betas, got {betas.numel()}.")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas >= 1).any():
            raise ValueError(
                "Every beta must lie strictly between 0 and 1; "
                f"got min {betas.min().item():.3g}, max {betas.max().item():.3g}."
            )
        self.name = name
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000) -> NoiseSchedule:
        """One of ``linear``, ``quadratic``, ``cosine``, ``constant``."""
        if name not in _BUILDERS:
            raise ValueError(
                f"Unknown noise schedule {name!r}. Choose one of {', '.join(SCHEDULE_NAMES)}, "
                "or pass a list of betas."
            )
        if int(num_timesteps) < 2:
            raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}.")
        return cls(_BUILDERS[name](int(num_timesteps)), name=name)

    @classmethod
    def create(cls, schedule: str | Sequence[float] | NoiseSchedule, num_timesteps: int = 1000) -> NoiseSchedule:
        """Accept whatever a config may say: a name, a list of betas, or a schedule."""
        if isinstance(schedule, NoiseSchedule):
            return schedule
        if isinstance(schedule, str):
            return cls.from_name(schedule, num_timesteps)
        return cls(schedule)

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar)."""
        return self.alpha_bar / (1.0 - self.alpha_bar)

    @property
    def psi(self) -> Tensor:
        """Psi(t) = Var[x_t | x_0] = 1 - alpha_bar_t, per dimension."""
        return 1.0 - self.alpha_bar

    @property
    def psi_rate(self) -> Tensor:
        """d/dt Psi(t) by central differences (one-sided at the ends), as numpy.gradient."""
        return torch.gradient(self.psi)[0]

    @property
    def increment_mean_scale(self) -> Tensor:
        """sqrt(alpha_bar_{t+1}) - sqrt(alpha_bar_t): the mean of x_{t+1} - x_t is this times x_0.

        The last entry (no t+1) is set to 0.
        """
        root = self.alpha_bar.sqrt()
        return torch.cat([root[1:] - root[:-1], root.new_zeros(1)])

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, num_timesteps={self.num_timesteps})"
