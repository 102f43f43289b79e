"""Lightning callbacks: time-step strategies (SpeeD and baselines), monitoring and evaluation.

``TimestepCallback`` installs the strategies of ``lightning_speed.timesteps`` (one, or one sampling and
one weighting); ``SpeeD(...)`` is its one-line form for SpeeD. ``StepProgressBar`` counts steps against
``max_steps``.
"""

from lightning_speed.callbacks.ema import EMAWeightAveraging
from lightning_speed.callbacks.fid import FIDCallback
from lightning_speed.callbacks.guard import CheckpointOnSignal, DivergenceError, DivergenceGuard
from lightning_speed.callbacks.monitor import TimestepMonitor
from lightning_speed.callbacks.progress import StepProgressBar
from lightning_speed.callbacks.samples import SampleGridCallback
from lightning_speed.callbacks.strategies import SpeeD, TimestepCallback

__all__ = [
    "CheckpointOnSignal",
    "DivergenceError",
    "DivergenceGuard",
    "EMAWeightAveraging",
    "FIDCallback",
    "SampleGridCallback",
    "SpeeD",
    "StepProgressBar",
    "TimestepCallback",
    "TimestepMonitor",
]
