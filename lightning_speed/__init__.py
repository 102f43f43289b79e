"""lightning-speed: SpeeD time-step strategies for diffusion training in PyTorch Lightning."""

from lightning_speed.module import DiffusionModule
from lightning_speed.process import GaussianDiffusion
from lightning_speed.schedules import NoiseSchedule

__all__ = ["DiffusionModule", "GaussianDiffusion", "NoiseSchedule"]
__version__ = "0.1.0"
