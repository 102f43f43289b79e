"""Lightning callbacks: time-step strategies (SpeeD and baselines), monitoring and evaluation.

Strategy callbacks are named for what they do: ``...Sampling`` installs where t comes from,
``...Weighting`` how each t's loss counts, ``SpeeD`` both with one tau, ``Compose`` any sampling
callback with any weighting callback.
"""

from lightning_speed.callbacks.ema import EMAWeightAveraging
from lightning_speed.callbacks.fid import FIDCallback
from lightning_speed.callbacks.guard import CheckpointOnSignal, DivergenceError, DivergenceGuard
from lightning_speed.callbacks.monitor import TimestepMonitor
from lightning_speed.callbacks.samples import SampleGridCallback
from lightning_speed.callbacks.strategies import (
    AsymmetricSampling,
    AsymmetricTimestepSampling,
    ChangeAwareWeighting,
    CLTSSampling,
    Compose,
    CurriculumSampling,
    EDMLogNormalSampling,
    LaplaceLogSNRSampling,
    LogitNormalSampling,
    LossAwareSampling,
    LossWeightingCallback,
    MinSNRWeighting,
    P2Weighting,
    SpeeD,
    StrategyCallback,
    TimestepSamplingCallback,
)

__all__ = [
    "CheckpointOnSignal",
    "DivergenceError",
    "DivergenceGuard",
    "AsymmetricSampling",
    "AsymmetricTimestepSampling",
    "CLTSSampling",
    "ChangeAwareWeighting",
    "Compose",
    "CurriculumSampling",
    "EDMLogNormalSampling",
    "EMAWeightAveraging",
    "FIDCallback",
    "LaplaceLogSNRSampling",
    "LogitNormalSampling",
    "LossAwareSampling",
    "LossWeightingCallback",
    "MinSNRWeighting",
    "P2Weighting",
    "SampleGridCallback",
    "SpeeD",
    "StrategyCallback",
    "TimestepMonitor",
    "TimestepSamplingCallback",
]
