"""Time-step strategies: where t comes from (``...Sampling``) and how each t's loss counts (``...Weighting``).

Each strategy holds its settings and builds its tables when bound to a schedule; ``SpeeD`` plays
both roles with one tau. ``base`` holds the protocol and ``TimestepStrategy`` (the one object a
training step uses), ``speed`` SpeeD, ``baselines`` the methods SpeeD is compared with, ``log_snr``
densities shaped in log-SNR (Laplace, EDM's log-normal) as tables over t, ``curriculum`` a shaped
strategy annealed to uniform t, ``stratified`` another strategy's marginal drawn with low-discrepancy
(stratified) u, ``adaptive`` sampling by each bin's recent loss decrease.
``lightning_speed.callbacks.TimestepCallback`` installs them on a LightningModule's ``timesteps``. The same strategies bind to a flow (``flow.FlowSchedule``) where they have a
flow form (``Strategy.processes``); ``ModeSampling`` and ``CosMapSampling`` exist on flows only.
"""

from lightning_speed.timesteps.adaptive import LossDecreaseSampling
from lightning_speed.timesteps.base import (
    ConstantWeighting,
    SamplingStrategy,
    StepRecord,
    Strategy,
    TableSampling,
    TableWeighting,
    TimestepStrategy,
    UniformSampling,
    WeightingStrategy,
    WrappedSampling,
    split_roles,
    weighted_loss,
)
from lightning_speed.timesteps.baselines import (
    CLTSSampling,
    CosMapSampling,
    LogitNormalSampling,
    LossAwareSampling,
    MinSNRWeighting,
    ModeSampling,
    P2Weighting,
    clts_gaussian,
    logit_normal_probabilities,
    min_snr_weights,
    p2_weights,
)
from lightning_speed.timesteps.curriculum import CurriculumSampling
from lightning_speed.timesteps.log_snr import (
    EDMLogNormalSampling,
    LaplaceLogSNRSampling,
    edm_log_normal_probabilities,
    laplace_log_snr_probabilities,
)
from lightning_speed.timesteps.speed import (
    AsymmetricDensity, SpeeD, asymmetric_probabilities, change_aware_weights, dual_pairs,
)
from lightning_speed.timesteps.stratified import StratifiedSampling

__all__ = [
    "AsymmetricDensity",
    "CLTSSampling",
    "ConstantWeighting",
    "CosMapSampling",
    "CurriculumSampling",
    "EDMLogNormalSampling",
    "LaplaceLogSNRSampling",
    "LogitNormalSampling",
    "LossAwareSampling",
    "LossDecreaseSampling",
    "MinSNRWeighting",
    "ModeSampling",
    "P2Weighting",
    "SamplingStrategy",
    "SpeeD",
    "StepRecord",
    "StratifiedSampling",
    "Strategy",
    "TableSampling",
    "TableWeighting",
    "TimestepStrategy",
    "UniformSampling",
    "WeightingStrategy",
    "WrappedSampling",
    "asymmetric_probabilities",
    "change_aware_weights",
    "clts_gaussian",
    "dual_pairs",
    "edm_log_normal_probabilities",
    "laplace_log_snr_probabilities",
    "logit_normal_probabilities",
    "min_snr_weights",
    "p2_weights",
    "split_roles",
    "weighted_loss",
]
