"""Lightning callbacks: time-step strategies (SpeeD and baselines), monitoring and evaluation."""

from lightning_speed.callbacks.ema import EMAWeightAveraging
from lightning_speed.callbacks.fid import FIDCallback
from lightning_speed.callbacks.monitor import TimestepMonitor
from lightning_speed.callbacks.samples import SampleGridCallback
from lightning_speed.callbacks.strategies import (
    AsymmetricTimestepSampling,
    ChangeAwareWeighting,
    CLTSSampling,
    LogitNormalSampling,
    LossAwareSampling,
    LossWeightingCallback,
    MinSNRWeighting,
    P2Weighting,
    TimestepSamplingCallback,
)

__all__ = [
    "AsymmetricTimestepSampling",
    "CLTSSampling",
    "ChangeAwareWeighting",
    "EMAWeightAveraging",
    "FIDCallback",
    "LogitNormalSampling",
    "LossAwareSampling",
    "LossWeightingCallback",
    "MinSNRWeighting",
    "P2Weighting",
    "SampleGridCallback",
    "TimestepMonitor",
    "TimestepSamplingCallback",
]
