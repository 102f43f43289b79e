"""Lightning callbacks that install time-step strategies on a LightningModule.

Each callback builds one strategy from the module's noise schedule in ``setup`` and assigns
it to ``pl_module.timestep_sampler`` (sampling callbacks) or ``pl_module.loss_weighting``
(weighting callbacks); ``on_fit_start`` moves it to the module's device. One sampling and one
weighting callback combine (e.g. SpeeD = AsymmetricTimestepSampling + ChangeAwareWeighting);
two of the same kind raise a ``ValueError`` at setup.

A module adopts these callbacks by exposing ``noise_schedule`` (a NoiseSchedule) or an
``alphas_cumprod`` tensor, plus ``timestep_sampler`` and ``loss_weighting`` attributes used in
its training step through ``lightning_speed.timesteps.weighted_loss`` (the protocol).

Checkpointing: a sampling callback's ``state_dict`` holds its sampler's seed, RNG state and
statistics (loss history, curriculum step). Lightning 2.x restores callbacks after ``setup``
and before the first training step (``Trainer._run``: setup hook -> restore modules and
callbacks -> strategy.setup -> on_fit_start; strategies with ``restore_checkpoint_after_setup``
restore right after ``on_fit_start``). ``load_state_dict`` therefore applies the state to the
installed sampler at once; a state loaded before ``setup`` is kept and applied when the
sampler is built. The RNG state is applied when the generator is (re)built on the device,
so a CUDA generator's state restores on CUDA.

Seeding: ``seed=None`` derives the sampler's seed from ``torch.initial_seed()`` at setup, so
``seed_everything`` makes runs reproducible; the global rank is mixed in so DDP ranks draw
different time steps.
"""

from __future__ import annotations

import zlib
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_speed.analysis import check_tau_spec
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.timesteps import baselines as _baselines
from lightning_speed.timesteps import speed as _speed
from lightning_speed.timesteps.base import (
    ConstantWeighting,
    DeviceTables,
    LossWeighting,
    TimestepSampler,
    UniformSampler,
)

PROTOCOL_HINT = (
    "A LightningModule adopts lightning_speed's time-step callbacks by exposing `noise_schedule` "
    "(a lightning_speed.schedules.NoiseSchedule) or `alphas_cumprod` (a 1-D tensor), plus "
    "`timestep_sampler` and `loss_weighting` attributes that its training_step uses: "
    "`t = self.timestep_sampler.sample(n)` and "
    "`loss, w = weighted_loss(self.timestep_sampler, self.loss_weighting, t, per_sample_loss)`."
)


# ---------------------------------------------------------------------------- schedule lookup
def schedule_from_alphas_cumprod(alphas_cumprod: Tensor) -> NoiseSchedule:
    """Wrap cumulative alpha products in a NoiseSchedule (betas = 1 - ab_t / ab_{t-1}, ab_{-1} = 1)."""
    ab = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).flatten()
    previous = torch.cat([ab.new_ones(1), ab[:-1]])
    betas = 1.0 - ab / previous
    try:
        return NoiseSchedule(betas, name="alphas_cumprod")
    except ValueError as err:
        raise ValueError(
            f"alphas_cumprod must be strictly decreasing values in (0, 1) with at least 2 entries: {err}"
        ) from err


def find_schedule(pl_module: pl.LightningModule) -> NoiseSchedule:
    """The module's schedule: ``noise_schedule`` if it has one, else ``alphas_cumprod``."""
    schedule = getattr(pl_module, "noise_schedule", None)
    if isinstance(schedule, NoiseSchedule):
        return schedule
    if schedule is not None and isinstance(getattr(schedule, "alphas_cumprod", None), Tensor):
        return schedule_from_alphas_cumprod(schedule.alphas_cumprod)  # e.g. a diffusers scheduler
    alphas_cumprod = getattr(pl_module, "alphas_cumprod", None)
    if isinstance(alphas_cumprod, Tensor):
        return schedule_from_alphas_cumprod(alphas_cumprod)
    raise ValueError(
        f"{type(pl_module).__name__} offers no noise schedule: add a `noise_schedule` attribute "
        "(lightning_speed.schedules.NoiseSchedule, e.g. NoiseSchedule.from_name('linear', 1000)) or an "
        "`alphas_cumprod` tensor attribute (e.g. a registered buffer). " + PROTOCOL_HINT
    )


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())


# ---------------------------------------------------------------------------------- base class
class _StrategyCallback(Callback):
    """Shared logic: find the schedule, build, check conflicts, install, move, checkpoint."""

    attribute: ClassVar[str]
    kind: ClassVar[str]

    def __init__(self) -> None:
        self.strategy: DeviceTables | None = None
        self._pending_state: dict[str, Any] | None = None

    # subclasses: build the strategy object for this module
    def build(self, schedule: NoiseSchedule, pl_module: pl.LightningModule) -> DeviceTables:
        raise NotImplementedError

    def _kind_base(self) -> type:
        raise NotImplementedError

    def _check_conflicts(self, trainer: pl.Trainer) -> None:
        same_kind = [cb for cb in trainer.callbacks if isinstance(cb, self._kind_base())]
        if len(same_kind) > 1:
            names = ", ".join(type(cb).__name__ for cb in same_kind)
            raise ValueError(
                f"Only one {self.kind} strategy can be active, but trainer.callbacks has {len(same_kind)}: "
                f"{names}. Keep one of them (a sampling and a weighting strategy do combine)."
            )

    def _check_protocol(self, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, self.attribute):
            raise ValueError(
                f"{type(self).__name__} installs `{self.attribute}` but {type(pl_module).__name__} has no such "
                f"attribute, so its training_step would never use it. " + PROTOCOL_HINT
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_conflicts(trainer)
        self._check_protocol(pl_module)
        schedule = find_schedule(pl_module)
        current = getattr(pl_module, self.attribute)
        if self.strategy is None or current is not self.strategy:
            # First fit, or a new module: build fresh tables (a repeated fit keeps the same object).
            if current is not None and type(current) not in (UniformSampler, ConstantWeighting):
                rank_zero_warn(
                    f"{type(self).__name__} replaces the {type(current).__name__} that "
                    f"{type(pl_module).__name__}.{self.attribute} already held."
                )
            self.strategy = self.build(schedule, pl_module)
            self._configure(trainer)
        if self._pending_state is not None:
            self._apply_pending()
        setattr(pl_module, self.attribute, self.strategy)

    def _configure(self, trainer: pl.Trainer) -> None:
        """Hook for extra set-up after build (seeding)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.strategy is not None:
            self.strategy.to(pl_module.device)

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.strategy is None:
            return {"strategy": self._pending_state} if self._pending_state is not None else {}
        return {"strategy": self.strategy.extra_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict.get("strategy")
        if self.strategy is not None:
            self._apply_pending()

    def _apply_pending(self) -> None:
        assert self.strategy is not None and self._pending_state is not None
        self.strategy.load_extra_state(self._pending_state)
        self._pending_state = None


class TimestepSamplingCallback(_StrategyCallback):
    """Base of the callbacks that install a ``TimestepSampler`` as ``pl_module.timestep_sampler``.

    Args:
        seed: seed of the sampler's own generator; ``None`` derives one from ``torch.initial_seed()``
            at setup (so ``seed_everything`` makes runs reproducible). The global rank is mixed in.
    """

    attribute = "timestep_sampler"
    kind = "time-step sampling"

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}.")
        self.seed = seed

    def _kind_base(self) -> type:
        return TimestepSamplingCallback

    def build(self, schedule: NoiseSchedule, pl_module: pl.LightningModule) -> TimestepSampler:
        raise NotImplementedError

    def sampler_seed(self, trainer: pl.Trainer) -> int:
        """The seed the sampler gets on this rank."""
        if self.seed is not None:
            base = self.seed
        else:
            base = torch.initial_seed() + _stable_hash(type(self).__name__)
        return (base + 1_000_003 * trainer.global_rank) % (2**63)

    def _configure(self, trainer: pl.Trainer) -> None:
        assert isinstance(self.strategy, TimestepSampler)
        self.strategy.manual_seed(self.sampler_seed(trainer))


class LossWeightingCallback(_StrategyCallback):
    """Base of the callbacks that install a ``LossWeighting`` as ``pl_module.loss_weighting``."""

    attribute = "loss_weighting"
    kind = "loss weighting"

    def _kind_base(self) -> type:
        return LossWeightingCallback

    def build(self, schedule: NoiseSchedule, pl_module: pl.LightningModule) -> LossWeighting:
        raise NotImplementedError


# ------------------------------------------------------------------------------------- SpeeD
class AsymmetricTimestepSampling(TimestepSamplingCallback):
    """SpeeD's asymmetric sampling: draw t < tau k times more often than the convergence area.

    Args:
        tau: first time step of the convergence area (700 in the paper for linear T = 1000), or
            "auto" to derive it from the module's schedule (642 for linear T = 1000).
        k: suppression intensity (5; the paper's ablation: 1, 5, 10, 25).
        dual: pair each drawn t with m - t / t - m around the schedule's pivot m (official default).
        seed: the sampler's own seed (None: from ``torch.initial_seed()``).
    """

    def __init__(self, tau: int | str = 700, k: float = 5.0, dual: bool = True, seed: int | None = None) -> None:
        super().__init__(seed)
        self.tau = check_tau_spec(tau)
        self.k = _speed.check_k(k)
        self.dual = bool(dual)

    def build(self, schedule: NoiseSchedule, pl_module: pl.LightningModule) -> TimestepSampler:
        return _speed.AsymmetricSampler(schedule, self.tau, self.k, self.dual)


class ChangeAwareWeighting(LossWeightingCallback):
    """SpeeD's change-aware weighting: w(t) in [1 - lam, lam] following d/dt Psi below tau, 1 above.

    Args:
        lam: lambda in [0.5, 1] (0.6).
        tau: where the weights become 1; an int or "auto" (the schedule's pivot).
    """

    def __init__(self, lam: float = 0.6, tau: int | str = 700) -> None:
        super().__init__()
        self.lam = _speed.check_lam(lam)
        self.tau = check_tau_spec(tau)

    def build(self, schedule: NoiseSchedule, pl_module: pl.LightningModule) -> LossWeighting:
        return _speed.ChangeAwareWeights(schedule, self.lam, self.tau)


# --------------------------------------------------------------------------------- baselines
_TINY = NoiseSchedule([0.1, 0.2], name="validation")  # to validate arguments at construction


class P2Weighting(LossWeightingCallback):
    """P2 weighting (Choi et al. 2022): w(t) = 1 / (k + SNR(t))^gamma; official k = 1, gamma = 1."""

    def __init__(self, k: float = 1.0, gamma: float = 1.0) -> None:
        super().__init__()
        _baselines.P2Weights(_TINY, k, gamma)  # ValueError on bad k / gamma, before any training
        self.k, self.gamma = float(k), float(gamma)

    def build(self, schedule: NoiseSchedule, pl_module: pl.LightningModule) -> LossWeighting:
        return _baselines.P2Weights(schedule, self.k, self.gamma)


class MinSNRWeighting(LossWeightingCallback):
    """Min-SNR-gamma weighting (Hang et al. 2023), gamma = 5.

    Args:
        gamma: the SNR clamp.
        prediction: ``epsilon`` (w = min(SNR, gamma) / SNR), ``v`` (min(SNR, gamma) / (SNR + 1)) or
            ``x0`` (min(SNR, gamma)). ``None`` (default) reads the module's ``prediction`` attribute
            (DiffusionModule has one), falling back to ``epsilon``; an explicit value must agree with it.
    """

    def __init__(self, gamma: float = 5.0, prediction: str | None = None) -> None:
        super().__init__()
        _baselines.MinSNRWeights(_TINY, gamma)  # ValueError on a bad gamma
        self.gamma = float(gamma)
        self.prediction = _baselines.check_prediction(prediction) if prediction is not None else None

    def resolve_prediction(self, pl_module: pl.LightningModule) -> str:
        """The parameterisation the weights are computed for."""
        module_prediction = getattr(pl_module, "prediction", None)
        if module_prediction is not None:
            module_prediction = _baselines.check_prediction(module_prediction)
        if self.prediction is not None and module_prediction is not None and self.prediction != module_prediction:
            raise ValueError(
                f"MinSNRWeighting(prediction={self.prediction!r}) but {type(pl_module).__name__} trains with "
                f"prediction={module_prediction!r}: the weights depend on the parameterisation, so leave "
                "prediction unset (it is read from the module) or make the two agree."
            )
        return self.prediction or module_prediction or "epsilon"

    def build(self, schedule: NoiseSchedule, pl_module: pl.LightningModule) -> LossWeighting:
        return _baselines.MinSNRWeights(schedule, self.gamma, self.resolve_prediction(pl_module))


class LogitNormalSampling(TimestepSamplingCallback):
    """Logit-normal time steps (SD3): t = round(sigmoid(u) (T - 1)), u ~ N(mean, std^2).

    Args:
        mean: SD3's location m (0).
        std: SD3's scale s (1).
        seed: the sampler's own seed (None: from ``torch.initial_seed()``).
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0, seed: int | None = None) -> None:
        super().__init__(seed)
        _baselines.LogitNormalSampler(2, mean, std)  # ValueError on bad arguments
        self.mean, self.std = float(mean), float(std)

    def build(self, schedule: NoiseSchedule, pl_module: pl.LightningModule) -> TimestepSampler:
        return _baselines.LogitNormalSampler(schedule.num_timesteps, self.mean, self.std)


class CLTSSampling(TimestepSamplingCallback):
    """Curriculum time-step sampling: p = (1 - a) U + a N(mu, sigma), a = min(global_step / total_steps, 1).

    Args:
        mu: centre of the target Gaussian in steps of a T = 1000 process (official 300; scales with T).
        sigma: its width, same units (our choice 200: see ``lightning_speed.timesteps.baselines``).
        total_steps: optimizer steps until the curriculum reaches the Gaussian (50000).
        seed: the sampler's own seed (None: from ``torch.initial_seed()``).
    """

    def __init__(self, mu: float = 300.0, sigma: float = 200.0, total_steps: int = 50_000, seed: int | None = None) -> None:
        super().__init__(seed)
        _baselines.CLTSSampler(2, mu, sigma, total_steps)  # ValueError on bad arguments
        self.mu, self.sigma, self.total_steps = float(mu), float(sigma), int(total_steps)

    def build(self, schedule: NoiseSchedule, pl_module: pl.LightningModule) -> TimestepSampler:
        return _baselines.CLTSSampler(schedule.num_timesteps, self.mu, self.sigma, self.total_steps)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # trainer.global_step is a Python int (restored on resume): updating the tables never syncs.
        if self.strategy is not None:
            self.strategy.set_step(trainer.global_step)


class LossAwareSampling(TimestepSamplingCallback):
    """Loss-aware importance sampling (improved DDPM): p(t) ~ sqrt(E[L_t^2]) once every t has a history.

    Args:
        history: losses kept per t (10).
        uniform_prob: uniform share mixed into p once warm (0.001).
        seed: the sampler's own seed (None: from ``torch.initial_seed()``).

    Samples are re-weighted by 1 / (T p(t)) inside ``weighted_loss``, so the objective stays
    unbiased; it combines with any weighting callback (the weights multiply). Under DDP each
    rank keeps its own history.
    """

    def __init__(self, history: int = 10, uniform_prob: float = 0.001, seed: int | None = None) -> None:
        super().__init__(seed)
        _baselines.LossAwareSampler(2, history, uniform_prob)  # ValueError on bad arguments
        self.history, self.uniform_prob = int(history), float(uniform_prob)

    def build(self, schedule: NoiseSchedule, pl_module: pl.LightningModule) -> TimestepSampler:
        return _baselines.LossAwareSampler(schedule.num_timesteps, self.history, self.uniform_prob)


__all__ = [
    "AsymmetricTimestepSampling",
    "CLTSSampling",
    "ChangeAwareWeighting",
    "LogitNormalSampling",
    "LossAwareSampling",
    "LossWeightingCallback",
    "MinSNRWeighting",
    "P2Weighting",
    "TimestepSamplingCallback",
    "find_schedule",
    "schedule_from_alphas_cumprod",
]
