"""Time-step strategies: where t comes from (samplers) and how each t's loss counts (weightings).

``base`` holds the protocol, ``speed`` SpeeD's asymmetric sampling and change-aware weighting,
``baselines`` the methods SpeeD is compared with. All are plain device-resident objects; the
callbacks in ``lightning_speed.callbacks`` install them on a LightningModule.
"""

from lightning_speed.timesteps.base import (
    ConstantWeighting,
    DeviceTables,
    LossWeighting,
    TableSampler,
    TableWeighting,
    TimestepSampler,
    UniformSampler,
    weighted_loss,
)
from lightning_speed.timesteps.baselines import (
    CLTSSampler,
    LogitNormalSampler,
    LossAwareSampler,
    MinSNRWeights,
    P2Weights,
    clts_gaussian,
    logit_normal_probabilities,
    min_snr_weights,
    p2_weights,
)
from lightning_speed.timesteps.speed import (
    AsymmetricSampler,
    ChangeAwareWeights,
    asymmetric_probabilities,
    change_aware_weights,
    dual_pairs,
)

__all__ = [
    "AsymmetricSampler",
    "CLTSSampler",
    "ChangeAwareWeights",
    "ConstantWeighting",
    "DeviceTables",
    "LogitNormalSampler",
    "LossAwareSampler",
    "LossWeighting",
    "MinSNRWeights",
    "P2Weights",
    "TableSampler",
    "TableWeighting",
    "TimestepSampler",
    "UniformSampler",
    "asymmetric_probabilities",
    "change_aware_weights",
    "clts_gaussian",
    "dual_pairs",
    "logit_normal_probabilities",
    "min_snr_weights",
    "p2_weights",
    "weighted_loss",
]
