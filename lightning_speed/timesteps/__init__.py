"""Time-step strategies: where t comes from (``...Sampler``) and how each t's loss counts (``...Weights``).

``base`` holds the protocol and ``TimestepStrategy`` (the one object a training step uses),
``speed`` SpeeD's asymmetric sampling and change-aware weights, ``baselines`` the methods SpeeD
is compared with, ``log_snr`` densities shaped in log-SNR (Laplace, EDM's log-normal) as tables over t,
``curriculum`` a shaped sampler annealed to uniform t. All are plain device-resident objects;
the callbacks in ``lightning_speed.callbacks`` install them on a LightningModule's ``timesteps``.
"""

from lightning_speed.timesteps.base import (
    CDFSampler,
    ConstantWeights,
    DeviceTables,
    LossWeights,
    StepRecord,
    TableSampler,
    TableWeights,
    TimestepSampler,
    TimestepStrategy,
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
from lightning_speed.timesteps.curriculum import CurriculumSampler
from lightning_speed.timesteps.log_snr import (
    EDMLogNormalSampler,
    LaplaceLogSNRSampler,
    edm_log_normal_probabilities,
    laplace_log_snr_probabilities,
)
from lightning_speed.timesteps.speed import (
    AsymmetricSampler,
    ChangeAwareWeights,
    asymmetric_probabilities,
    change_aware_weights,
    dual_pairs,
)
from lightning_speed.validation import renamed

# Former names of the weights classes: importable, but constructing one names the new class.
ConstantWeighting = renamed(ConstantWeights, "ConstantWeighting", __name__)
TableWeighting = renamed(TableWeights, "TableWeighting", __name__)
LossWeighting = renamed(LossWeights, "LossWeighting", __name__)

__all__ = [
    "AsymmetricSampler",
    "CDFSampler",
    "CLTSSampler",
    "ChangeAwareWeights",
    "ConstantWeights",
    "CurriculumSampler",
    "DeviceTables",
    "EDMLogNormalSampler",
    "LaplaceLogSNRSampler",
    "LogitNormalSampler",
    "LossAwareSampler",
    "LossWeights",
    "MinSNRWeights",
    "P2Weights",
    "StepRecord",
    "TableSampler",
    "TableWeights",
    "TimestepSampler",
    "TimestepStrategy",
    "UniformSampler",
    "asymmetric_probabilities",
    "change_aware_weights",
    "clts_gaussian",
    "dual_pairs",
    "edm_log_normal_probabilities",
    "laplace_log_snr_probabilities",
    "logit_normal_probabilities",
    "min_snr_weights",
    "p2_weights",
    "weighted_loss",
]
