"""Lightning callbacks that install time-step strategies into a LightningModule's ``timesteps``.

A module adopts them with three lines (``TIMESTEP_LINES``, shown in every error about them)::

    self.timesteps = TimestepStrategy(schedule)       # __init__: a NoiseSchedule, alphas_cumprod or a diffusers scheduler
    t = self.timesteps.sample(len(x), x.device)       # training_step, instead of torch.randint
    loss = self.timesteps.loss(t, per_sample_loss)    # instead of per_sample_loss.mean()

In ``setup`` each callback builds its strategy object from ``timesteps.schedule`` and puts it in
``timesteps.sampler`` (``...Sampling`` callbacks) or ``timesteps.weights`` (``...Weighting``
callbacks); ``SpeeD`` installs both with one tau. One sampling and one weighting callback
combine; two of the same kind, or two that disagree on tau, are a ``ValueError`` at setup, as is a
strategy built for another schedule than the module's (its ``num_timesteps``, its ``alphas_cumprod``, a
diffusers scheduler it holds). A ``timesteps`` the module replaces after setup fails at fit start, and a
training step that skips ``timesteps.loss`` while weights (or a loss-driven sampler) are installed fails at
its end. The callbacks only glue: the math lives in ``lightning_speed.timesteps``.

Checkpointing: a sampling callback's ``state_dict`` holds its sampler's seed, RNG state and
statistics (loss history, curriculum step). Lightning restores callbacks after ``setup`` and
before the first training step, so ``load_state_dict`` applies the state to the installed
sampler at once; a state loaded before ``setup`` is kept and applied when the sampler is
built. The RNG state is applied when the generator is (re)built on the device, so a CUDA
generator's state restores on CUDA.

Seeding: ``seed=None`` derives the sampler's seed from ``torch.initial_seed()`` at setup, so
``seed_everything`` makes runs reproducible; the global rank is mixed in so DDP ranks draw
different time steps.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_speed.schedules import (
    NoiseSchedule, Prediction, Tau, check_prediction, check_tau, prediction_of, resolve_tau,
)
from lightning_speed.timesteps import baselines, curriculum, log_snr, speed
from lightning_speed.timesteps.base import (
    ConstantWeights,
    DeviceTables,
    LossWeights,
    StepRecord,
    TimestepSampler,
    TimestepStrategy,
    UniformSampler,
)
from lightning_speed.validation import check_int, renamed

TIMESTEP_LINES = (
    "    self.timesteps = TimestepStrategy(schedule)     # in __init__ (from lightning_speed.timesteps); schedule: "
    "a NoiseSchedule, an alphas_cumprod tensor or a diffusers scheduler\n"
    "    t = self.timesteps.sample(len(x), x.device)     # in training_step, instead of torch.randint\n"
    "    loss = self.timesteps.loss(t, per_sample_loss)  # instead of per_sample_loss.mean(); per_sample_loss shaped (B,)"
)


def find_strategy(pl_module: pl.LightningModule, user: str) -> TimestepStrategy:
    """``pl_module.timesteps``, or an error showing the three lines that add it."""
    name = type(pl_module).__name__
    strategy = getattr(pl_module, "timesteps", None)
    if isinstance(strategy, TimestepStrategy):
        return strategy
    old = [attr for attr in ("timestep_sampler", "loss_weighting") if hasattr(pl_module, attr)]
    if old:
        raise TypeError(
            f"{user} needs {name}.timesteps, a lightning_speed.timesteps.TimestepStrategy; {name} has "
            f"{' and '.join(f'`{a}`' for a in old)} instead, which the time-step callbacks no longer use. "
            "Replace them (and weighted_loss) by:\n" + TIMESTEP_LINES
        )
    if strategy is not None:
        raise TypeError(
            f"{user} needs {name}.timesteps to be a lightning_speed.timesteps.TimestepStrategy, got "
            f"{type(strategy).__name__}. Create it with:\n" + TIMESTEP_LINES
        )
    raise TypeError(
        f"{user} works on {name}.timesteps (a lightning_speed.timesteps.TimestepStrategy), but {name} has no "
        "`timesteps` attribute, so its training_step would never use the time-step strategies. Add these three "
        "lines:\n" + TIMESTEP_LINES
    )


SCHEDULE_TOLERANCE = 1e-3
"""Largest |alpha_bar| difference from a schedule the module holds that still counts as the same schedule (or
twice the resolution of a coarser dtype, e.g. a bf16 buffer's): float32 cumulative products of one schedule agree
to about 1e-6, while linear against cosine or diffusers' scaled_linear differ by more than 0.1."""


def _module_schedules(pl_module: pl.LightningModule) -> dict[str, tuple[Any, str, Any]]:
    """The noise schedules a module holds besides its ``timesteps``: an ``alphas_cumprod`` of its own and that of
    every public attribute that has one (a diffusers scheduler), as ``{where: (alpha_bar, what to build from, the
    scheduler or None)}``."""
    name = type(pl_module).__name__
    found = {f"{name}.alphas_cumprod": (getattr(pl_module, "alphas_cumprod", None), "self.alphas_cumprod", None)}
    for attr, value in vars(pl_module).items():
        if attr.startswith("_") or attr == "timesteps" or isinstance(value, (torch.Tensor, torch.nn.Module)):
            continue
        found[f"{name}.{attr}.alphas_cumprod"] = (getattr(value, "alphas_cumprod", None), f"self.{attr}", value)
    return {
        where: found[where] for where, (ab, _, _) in found.items()
        if isinstance(ab, (torch.Tensor, np.ndarray)) and ab.ndim == 1
    }  # fmt: skip


def _check_schedule(pl_module: pl.LightningModule, strategy: TimestepStrategy, user: str) -> None:
    """The strategy's schedule against the module's ``num_timesteps`` and the schedules it holds: t drawn for
    another T would index the module's schedule out of range or at wrong steps, and tau, the sampling table and
    the weights of another schedule would not describe the noise the training step adds; the strategy's prediction
    against a held scheduler's, which Min-SNR's weights depend on. Runs once, at setup."""
    name = type(pl_module).__name__
    T = strategy.num_timesteps
    stated: dict[str, Any] = {f"{name}.num_timesteps": getattr(pl_module, "num_timesteps", None)}
    schedules = _module_schedules(pl_module)
    stated.update({f"len({where})": len(ab) for where, (ab, _, _) in schedules.items()})
    for where, length in stated.items():
        if isinstance(length, int) and not isinstance(length, bool) and length != T:
            raise ValueError(
                f"{user} draws t from {name}.timesteps, built for T = {T} time steps, but {where} is {length}: the "
                f"training step would use t up to {T - 1} with a {length}-step schedule. Build the strategy from the "
                "module's own schedule, e.g. TimestepStrategy(self.alphas_cumprod) or TimestepStrategy(self.scheduler), "
                "or from a NoiseSchedule with the same T."
            )
    for where, (_, source, scheduler) in schedules.items():
        prediction = prediction_of(scheduler)  # diffusers' names in ours: v_prediction is v, sample is x0
        if prediction is not None and prediction != strategy.prediction:
            raise ValueError(
                f"{user}: {name}.timesteps has prediction {strategy.prediction!r}, but {where.removesuffix('alphas_cumprod')}"
                f"config.prediction_type is {scheduler.config.prediction_type!r}: "
                "weights that depend on what the network predicts (Min-SNR's) would be those of another prediction. "
                f"Build the strategy from the scheduler, TimestepStrategy({source}), which reads its prediction_type, "
                f"or state it: TimestepStrategy(..., prediction={prediction!r})."
            )
    ours = strategy.schedule.alpha_bar.double()
    for where, (ab, source, _) in schedules.items():
        theirs = torch.as_tensor(ab).detach()
        if theirs.is_meta:  # not materialised yet (e.g. Trainer.init_module(empty_init=True)): only T is known
            continue
        tolerance = max(SCHEDULE_TOLERANCE, 2 * torch.finfo(theirs.dtype).eps if theirs.is_floating_point() else 0.0)
        theirs = theirs.cpu().double()
        gap = (theirs - ours).abs()
        worst = int(gap.argmax())
        if float(gap[worst]) > tolerance:
            raise ValueError(
                f"{user} draws t from {name}.timesteps, whose {strategy.schedule.name} schedule is not the one in "
                f"{where}: alpha_bar at t = {worst} is {float(ours[worst]):.4g} in the strategy's and "
                f"{float(theirs[worst]):.4g} in the module's. SpeeD's tau, sampling table and weights would describe "
                "another noise schedule than the one the training step noises with. Build the strategy from the "
                f"schedule the training step uses: TimestepStrategy({source}). (A schedule the training step does not "
                "noise with, e.g. a teacher's, is not compared when the attribute's name starts with an underscore.)"
            )


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())


# ---------------------------------------------------------------------------------- bases
class StrategyCallback(Callback, ABC):
    """Installs a sampler and/or loss weights into ``pl_module.timesteps``, keeps their state.

    Subclasses say what they install (``installs_sampler`` / ``installs_weights``) and build it
    (``build_sampler`` / ``build_weights``); ``tau`` is the convergence threshold they use, if any.
    """

    installs_sampler: ClassVar[bool] = False
    installs_weights: ClassVar[bool] = False
    seed_key: ClassVar[str | None] = None
    """Mixed into the seed derived when ``seed=None`` (default: the class name)."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = None if seed is None else check_int(seed, "seed", hint="or null to derive it from the global seed")
        self.tau: int | str | None = None
        self.sampler: TimestepSampler | None = None
        self.weights: LossWeights | None = None
        self._strategy: TimestepStrategy | None = None
        self._pending_state: dict[str, Any] | None = None
        self._seen: StepRecord | None = None  # timesteps.last at the end of the previous step

    def build_sampler(self, strategy: TimestepStrategy) -> TimestepSampler:
        raise NotImplementedError(f"{type(self).__name__} installs no sampler.")

    def build_weights(self, strategy: TimestepStrategy) -> LossWeights:
        raise NotImplementedError(f"{type(self).__name__} installs no loss weights.")

    def resolved_tau(self, schedule: NoiseSchedule) -> int | None:
        """This callback's tau as an int for ``schedule`` (None: it uses none)."""
        return None if self.tau is None else resolve_tau(self.tau, schedule)

    # -- setup --------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = find_strategy(pl_module, type(self).__name__)
        _check_schedule(pl_module, strategy, type(self).__name__)
        self._check_others(trainer, strategy.schedule)
        if self._strategy is not strategy:  # first fit, or a new module (a repeated fit keeps the objects)
            self._build(trainer, pl_module, strategy)
        if self._pending_state is not None:
            self._apply_pending()
        if self.sampler is not None:
            strategy.sampler = self.sampler
        if self.weights is not None:
            strategy.weights = self.weights
        tau = self.resolved_tau(strategy.schedule)
        if tau is not None:
            strategy.tau = tau

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule, strategy: TimestepStrategy) -> None:
        defaults = (("sampler", self.installs_sampler, UniformSampler), ("weights", self.installs_weights, ConstantWeights))
        for attribute, installs, default in defaults:
            current = getattr(strategy, attribute)
            if installs and type(current) is not default:
                rank_zero_warn(
                    f"{type(self).__name__} replaces the {type(current).__name__} that "
                    f"{type(pl_module).__name__}.timesteps.{attribute} already held."
                )
        self.sampler = self.build_sampler(strategy) if self.installs_sampler else None
        self.weights = self.build_weights(strategy) if self.installs_weights else None
        if self.sampler is not None:
            self.sampler.manual_seed(self.sampler_seed(trainer))
        self._strategy = strategy

    def _check_others(self, trainer: pl.Trainer, schedule: NoiseSchedule) -> None:
        """At most one sampling and one weighting strategy, and one tau among them."""
        callbacks = [cb for cb in trainer.callbacks if isinstance(cb, StrategyCallback)]
        for kind, flag in (("time-step sampling", "installs_sampler"), ("loss weighting", "installs_weights")):
            same = [type(cb).__name__ for cb in callbacks if getattr(cb, flag)]
            if len(same) > 1:
                raise ValueError(
                    f"Only one {kind} strategy can be active, but trainer.callbacks has {len(same)}: {', '.join(same)}. "
                    "Keep one of them (a sampling and a weighting strategy do combine; SpeeD installs both)."
                )
        taus = {type(cb).__name__: cb.resolved_tau(schedule) for cb in callbacks if cb.tau is not None}
        if len(set(taus.values())) > 1:
            given = ", ".join(f"{name} tau={tau}" for name, tau in taus.items())
            raise ValueError(
                f"The time-step callbacks disagree on tau ({given}); one convergence threshold must hold for "
                "sampling, weighting and the monitor. Give it once with SpeeD(tau=...), or the same tau to each."
            )

    def sampler_seed(self, trainer: pl.Trainer) -> int:
        """The seed the sampler gets on this rank."""
        base = self.seed if self.seed is not None else torch.initial_seed() + _stable_hash(self.seed_key or type(self).__name__)
        return (base + 1_000_003 * trainer.global_rank) % (2**63)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._strategy is None:
            return
        name = type(pl_module).__name__
        if getattr(pl_module, "timesteps", None) is not self._strategy:
            raise ValueError(
                f"{name}.timesteps was replaced after {type(self).__name__} installed its strategy into it at setup "
                f"(e.g. by {name}.setup or configure_model), so training would draw uniform t and weigh every loss "
                "by 1. Create self.timesteps once, in __init__, and keep that object (sample() moves its tables to "
                "the batch's device)."
            )
        self._strategy.to(pl_module.device)
        self._seen = self._strategy.last  # a record from before this fit is not this fit's step

    def _acts_in_loss(self) -> DeviceTables | None:
        """What this callback installed that acts only inside ``TimestepStrategy.loss``: loss weights, or a
        sampler with importance weights or a loss history (None: a step that averages its loss itself loses nothing)."""
        if self.weights is not None:
            return self.weights
        kind = type(self.sampler)
        if self.sampler is not None and (
            kind.update is not TimestepSampler.update or kind.importance_weight is not TimestepSampler.importance_weight
        ):
            return self.sampler
        return None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Host-side identity checks only. outputs is None or {} when training_step returned None (a skipped batch).
        if self._strategy is None or outputs is None or (isinstance(outputs, dict) and not outputs):
            return
        acting = self._acts_in_loss()
        if acting is not None and self._strategy.last is self._seen:
            name = type(pl_module).__name__
            raise ValueError(
                f"{type(self).__name__}'s {type(acting).__name__} acts through {name}.timesteps.loss, but this "
                "training_step did not call it (e.g. it returned per_sample_loss.mean()), so it was never applied. "
                "Compute the loss with:\n" + TIMESTEP_LINES
            )
        self._seen = self._strategy.last

    # -- checkpointing ----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.sampler is None:
            return {"strategy": self._pending_state} if self._pending_state is not None else {}
        return {"strategy": self.sampler.extra_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict.get("strategy")
        if self.sampler is not None:
            self._apply_pending()

    def _apply_pending(self) -> None:
        if self.sampler is not None and self._pending_state is not None:
            self.sampler.load_extra_state(self._pending_state)
        self._pending_state = None


class TimestepSamplingCallback(StrategyCallback):
    """Base of the callbacks that install a ``TimestepSampler`` as ``pl_module.timesteps.sampler``.

    Args:
        seed: seed of the sampler's own generator; ``None`` derives one from ``torch.initial_seed()``
            at setup (so ``seed_everything`` makes runs reproducible). The global rank is mixed in.
    """

    # Subclasses repeat their sampler's arguments in __init__ (jsonargparse reads that signature; bad values
    # fail when the config is parsed) and build the sampler from them, so their bodies look alike.
    installs_sampler = True

    @abstractmethod
    @override
    def build_sampler(self, strategy: TimestepStrategy) -> TimestepSampler: ...


class LossWeightingCallback(StrategyCallback):
    """Base of the callbacks that install ``LossWeights`` as ``pl_module.timesteps.weights``."""

    # Subclasses repeat their weights' arguments in __init__ (jsonargparse reads that signature; bad values
    # fail when the config is parsed) and build the weights from them, so their bodies look alike.
    installs_weights = True

    def __init__(self) -> None:
        super().__init__(seed=None)

    @abstractmethod
    @override
    def build_weights(self, strategy: TimestepStrategy) -> LossWeights: ...


# ------------------------------------------------------------------------------------- SpeeD
_SPEED_SEED_KEY = "AsymmetricSampling"
"""Seeds for seed=None: shared by SpeeD and AsymmetricSampling, so both draw the same time steps."""


class SpeeD(StrategyCallback):
    """SpeeD: asymmetric time-step sampling and change-aware loss weights, with one tau.

    Args:
        tau: first time step of the convergence area (700 in the paper for linear T = 1000), or
            "auto" to derive it from the module's schedule (642 for linear T = 1000).
        k: suppression intensity: t < tau is drawn k times more often (5; the paper's ablation: 1, 5, 10, 25).
        dual: pair each drawn t with m - t / t - m around the schedule's pivot m (official default).
        lam: lambda in [0.5, 1]; the weights below tau span [1 - lam, lam] (0.6).
        seed: the sampler's own seed (None: from ``torch.initial_seed()``).
    """

    installs_sampler = True
    installs_weights = True
    seed_key = _SPEED_SEED_KEY

    def __init__(self, tau: Tau = 700, k: float = 5.0, dual: bool = True, lam: float = 0.6, seed: int | None = None) -> None:
        super().__init__(seed)
        self.tau = check_tau(tau)
        self.k = speed.check_k(k)
        self.dual = speed.check_dual(dual)
        self.lam = speed.check_lam(lam)

    @override
    def build_sampler(self, strategy: TimestepStrategy) -> TimestepSampler:
        return speed.AsymmetricSampler(strategy.schedule, self.tau, self.k, self.dual)

    @override
    def build_weights(self, strategy: TimestepStrategy) -> LossWeights:
        return speed.ChangeAwareWeights(strategy.schedule, self.lam, self.tau)


class AsymmetricSampling(TimestepSamplingCallback):
    """SpeeD's asymmetric sampling alone (for ablations; ``SpeeD`` installs it with the weights).

    Args:
        tau: first time step of the convergence area, or "auto" (the schedule's pivot).
        k: suppression intensity (5).
        dual: pair each drawn t with its partner around the schedule's pivot (official default).
        seed: the sampler's own seed (None: from ``torch.initial_seed()``).
    """

    seed_key = _SPEED_SEED_KEY

    def __init__(self, tau: Tau = 700, k: float = 5.0, dual: bool = True, seed: int | None = None) -> None:
        super().__init__(seed)
        self.tau = check_tau(tau)
        self.k = speed.check_k(k)
        self.dual = speed.check_dual(dual)

    @override
    def build_sampler(self, strategy: TimestepStrategy) -> TimestepSampler:
        return speed.AsymmetricSampler(strategy.schedule, self.tau, self.k, self.dual)


class ChangeAwareWeighting(LossWeightingCallback):
    """SpeeD's change-aware weights alone: w(t) in [1 - lam, lam] following d/dt Psi below tau, 1 above.

    Args:
        lam: lambda in [0.5, 1] (0.6).
        tau: where the weights become 1; an int or "auto" (the schedule's pivot).
    """

    def __init__(self, lam: float = 0.6, tau: Tau = 700) -> None:
        super().__init__()
        self.lam = speed.check_lam(lam)
        self.tau = check_tau(tau)

    @override
    def build_weights(self, strategy: TimestepStrategy) -> LossWeights:
        return speed.ChangeAwareWeights(strategy.schedule, self.lam, self.tau)


# --------------------------------------------------------------------------------- baselines
class P2Weighting(LossWeightingCallback):
    """P2 weighting (Choi et al. 2022): w(t) = scale / (k + SNR(t))^gamma; official k = 1, gamma = 1, scale 1.

    scale 5 with k 1, gamma 1 is what the SpeeD code's ``min_snr`` weighting computes (see
    ``lightning_speed.timesteps.baselines``); ``configs/study/official_code_min_snr.yaml`` trains it.
    """

    def __init__(self, k: float = 1.0, gamma: float = 1.0, scale: float = 1.0) -> None:
        super().__init__()
        self.k, self.gamma, self.scale = baselines.check_p2(k, gamma, scale)

    @override
    def build_weights(self, strategy: TimestepStrategy) -> LossWeights:
        return baselines.P2Weights(strategy.schedule, self.k, self.gamma, self.scale)


class MinSNRWeighting(LossWeightingCallback):
    """Min-SNR-gamma weighting (Hang et al. 2023), gamma = 5.

    The weights depend on what the network predicts, read from ``pl_module.timesteps.prediction``
    (``TimestepStrategy(schedule, prediction=...)``; DiffusionModule passes its own): ``epsilon``
    (w = min(SNR, gamma) / SNR), ``v`` (min(SNR, gamma) / (SNR + 1)) or ``x0`` (min(SNR, gamma)).

    Args:
        gamma: the SNR clamp.
        prediction: optional; when given it must agree with the strategy's prediction.
    """

    def __init__(self, gamma: float = 5.0, prediction: Prediction | None = None) -> None:
        super().__init__()
        self.gamma = baselines.check_min_snr(gamma)
        self.prediction = None if prediction is None else check_prediction(prediction)

    def resolve_prediction(self, strategy: TimestepStrategy, pl_module: pl.LightningModule | None = None) -> str:
        """The parameterisation the weights are computed for: the strategy's, checked against the others."""
        stated = {"pl_module.timesteps.prediction": strategy.prediction}
        module_prediction = getattr(pl_module, "prediction", None)
        if isinstance(module_prediction, str):
            stated[f"{type(pl_module).__name__}.prediction"] = module_prediction
        if self.prediction is not None:
            stated["MinSNRWeighting(prediction=...)"] = self.prediction
        if len(set(stated.values())) > 1:
            given = ", ".join(f"{where} = {value!r}" for where, value in stated.items())
            raise ValueError(
                f"Min-SNR weights depend on what the network predicts, and the predictions stated disagree ({given}). "
                "State it once, in TimestepStrategy(schedule, prediction=...), and leave MinSNRWeighting's unset."
            )
        return strategy.prediction

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.resolve_prediction(find_strategy(pl_module, type(self).__name__), pl_module)
        super().setup(trainer, pl_module, stage)

    @override
    def build_weights(self, strategy: TimestepStrategy) -> LossWeights:
        return baselines.MinSNRWeights(strategy.schedule, self.gamma, self.resolve_prediction(strategy))


class LogitNormalSampling(TimestepSamplingCallback):
    """Logit-normal time steps (SD3): t = round(sigmoid(u) (T - 1)), u ~ N(mean, std^2).

    Args:
        mean: SD3's location m (0).
        std: SD3's scale s (1).
        seed: the sampler's own seed (None: from ``torch.initial_seed()``).
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0, seed: int | None = None) -> None:
        super().__init__(seed)
        self.mean, self.std = baselines.check_logit_normal(mean, std)

    @override
    def build_sampler(self, strategy: TimestepStrategy) -> TimestepSampler:
        return baselines.LogitNormalSampler(strategy.num_timesteps, self.mean, self.std)


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
        self.mu, self.sigma, self.total_steps = baselines.check_clts(mu, sigma, total_steps)

    @override
    def build_sampler(self, strategy: TimestepStrategy) -> TimestepSampler:
        return baselines.CLTSSampler(strategy.num_timesteps, self.mu, self.sigma, self.total_steps)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # trainer.global_step is a Python int (restored on resume): updating the tables never syncs.
        if isinstance(self.sampler, baselines.CLTSSampler):
            self.sampler.set_step(trainer.global_step)


class LossAwareSampling(TimestepSamplingCallback):
    """Loss-aware importance sampling (improved DDPM): p(t) ~ sqrt(E[L_t^2]) once every t has a history.

    Args:
        history: losses kept per t (10).
        uniform_prob: uniform share mixed into p once warm (0.001).
        seed: the sampler's own seed (None: from ``torch.initial_seed()``).

    Samples are re-weighted by 1 / (T p(t)) inside ``TimestepStrategy.loss``, so the objective
    stays unbiased; it combines with any weighting callback (the weights multiply). Under DDP the
    losses of all ranks are gathered at every step (one all-gather on the device, no host sync),
    so every rank keeps the same history and p(t) and draws its own t from it.
    """

    def __init__(self, history: int = 10, uniform_prob: float = 0.001, seed: int | None = None) -> None:
        super().__init__(seed)
        self.history, self.uniform_prob = baselines.check_loss_aware(history, uniform_prob)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if isinstance(self.sampler, baselines.LossAwareSampler):
            self.sampler.all_gather = gather_from_ranks if trainer.world_size > 1 else None

    @override
    def build_sampler(self, strategy: TimestepStrategy) -> TimestepSampler:
        return baselines.LossAwareSampler(strategy.num_timesteps, self.history, self.uniform_prob)


def gather_from_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every rank stacked, (world_size, *shape), over torch.distributed's default group.

    A plain function rather than the strategy's bound method: the sampler lives in the module, which
    EMAWeightAveraging deep-copies, and a strategy holds process-group handles that cannot be copied.
    """
    world, tensor = torch.distributed.get_world_size(), tensor.contiguous().reshape(-1, *tensor.shape[1:])
    out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))  # concatenated along dim 0, as gloo needs
    torch.distributed.all_gather_into_tensor(out, tensor)
    return out.view(world, *tensor.shape)


# Former name: importable (old configs name it), constructing it names the new class.
AsymmetricTimestepSampling = renamed(
    AsymmetricSampling, "AsymmetricTimestepSampling", __name__,
    note="same arguments; or SpeeD(tau, k, dual, lam) for sampling and weighting with one tau",
)

__all__ = [
    "AsymmetricSampling",
    "AsymmetricTimestepSampling",
    "CLTSSampling",
    "ChangeAwareWeighting",
    "LogitNormalSampling",
    "LossAwareSampling",
    "LossWeightingCallback",
    "MinSNRWeighting",
    "P2Weighting",
    "SpeeD",
    "StrategyCallback",
    "TIMESTEP_LINES",
    "TimestepSamplingCallback",
    "find_strategy",
]


# ------------------------------------------------------------------------ study strategies
class LaplaceLogSNRSampling(TimestepSamplingCallback):
    """t whose log-SNR follows Laplace(mu, b) (Hang et al. 2024), mapped onto the module's schedule.

    Args:
        mu: the centre in log-SNR (0: SNR 1).
        b: the scale in log-SNR (0.5).
        seed: the sampler's own seed (None: from ``torch.initial_seed()``).

    See ``lightning_speed.timesteps.log_snr`` for how a log-SNR density becomes P(t).
    """

    def __init__(self, mu: float = 0.0, b: float = 0.5, seed: int | None = None) -> None:
        super().__init__(seed)
        self.mu, self.b = log_snr.check_laplace(mu, b)

    @override
    def build_sampler(self, strategy: TimestepStrategy) -> TimestepSampler:
        return log_snr.LaplaceLogSNRSampler(strategy.schedule, self.mu, self.b)


class EDMLogNormalSampling(TimestepSamplingCallback):
    """EDM's training noise levels, ln sigma ~ N(p_mean, p_std^2) with sigma^2 = 1 / SNR, mapped onto the schedule.

    Args:
        p_mean: mean of ln sigma (-1.2).
        p_std: standard deviation of ln sigma (1.2).
        seed: the sampler's own seed (None: from ``torch.initial_seed()``).
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, seed: int | None = None) -> None:
        super().__init__(seed)
        self.p_mean, self.p_std = log_snr.check_edm(p_mean, p_std)

    @override
    def build_sampler(self, strategy: TimestepStrategy) -> TimestepSampler:
        return log_snr.EDMLogNormalSampler(strategy.schedule, self.p_mean, self.p_std)


class CurriculumSampling(TimestepSamplingCallback):
    """``early``'s time steps at first, annealed to uniform t by ``switch`` x ``trainer.max_steps``.

    Each sample's t comes from ``early``'s sampler with probability a(step), else uniformly; a goes from 1
    to 0 linearly (``shape="linear"``) or drops at once (``shape="step"``, the two phases of Curriculum
    Sampling). See ``lightning_speed.timesteps.curriculum``.

    Args:
        early: the sampling callback whose sampler draws early t (``AsymmetricSampling``,
            ``LogitNormalSampling``, ...: a fixed distribution); its ``tau`` is the run's. Its seed stays
            unset: this callback seeds it.
        switch: the fraction of ``trainer.max_steps`` at which t is uniform (0.5).
        shape: ``linear`` or ``step``.
        seed: the sampler's own seed (None: from ``torch.initial_seed()``).
    """

    def __init__(self, early: TimestepSamplingCallback, switch: float = 0.5, shape: curriculum.Shape = "linear",
                 seed: int | None = None) -> None:
        super().__init__(seed)
        if not isinstance(early, TimestepSamplingCallback):
            raise TypeError(
                f"early must be a time-step sampling callback such as AsymmetricSampling, got {type(early).__name__}."
            )
        if isinstance(early, (CLTSSampling, LossAwareSampling, CurriculumSampling)):
            raise ValueError(
                f"early must draw from a fixed distribution, got {type(early).__name__}, which changes during training: "
                "use e.g. AsymmetricSampling or LogitNormalSampling."
            )
        if early.seed is not None:
            raise ValueError(
                f"early={type(early).__name__}(seed={early.seed}) would be ignored: CurriculumSampling seeds its early "
                f"sampler. Leave early's seed null and set CurriculumSampling(seed={early.seed})."
            )
        self.early = early
        self.switch = curriculum.check_switch(switch)
        self.shape = curriculum.check_shape(shape)
        self.tau = early.tau
        self.anneal_steps = 1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            max_steps = trainer.max_steps
            if not isinstance(max_steps, int) or max_steps < 1:
                raise ValueError(
                    f"CurriculumSampling anneals to uniform t by switch x trainer.max_steps, but max_steps is {max_steps}: "
                    "set trainer.max_steps (e.g. --trainer.max_steps 50000)."
                )
            self.anneal_steps = max(1, round(self.switch * max_steps))
            if isinstance(self.sampler, curriculum.CurriculumSampler):  # a repeated fit
                self.sampler.anneal_steps = self.anneal_steps
        super().setup(trainer, pl_module, stage)

    @override
    def build_sampler(self, strategy: TimestepStrategy) -> TimestepSampler:
        return curriculum.CurriculumSampler(self.early.build_sampler(strategy), self.anneal_steps, self.shape)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # trainer.global_step is a Python int (restored on resume): the mixing share never syncs.
        if isinstance(self.sampler, curriculum.CurriculumSampler):
            self.sampler.set_step(trainer.global_step)


class Compose(StrategyCallback):
    """One sampling and one weighting callback as one strategy (one ``strategy`` entry of a config).

    Args:
        sampling: a ``...Sampling`` callback (where t comes from).
        weighting: a ``...Weighting`` callback (how each t's loss counts).

    Each part installs and checkpoints as it does alone (same seed, so the same t as the sampling callback
    alone); this callback forwards the hooks they use. Their taus must agree; the run's tau is theirs.
    """

    installs_sampler = True
    installs_weights = True

    def __init__(self, sampling: TimestepSamplingCallback, weighting: LossWeightingCallback) -> None:
        super().__init__(seed=None)
        if not isinstance(sampling, TimestepSamplingCallback):
            raise TypeError(
                f"sampling must be a time-step sampling callback such as AsymmetricSampling, got {type(sampling).__name__}."
            )
        if not isinstance(weighting, LossWeightingCallback):
            raise TypeError(
                f"weighting must be a loss weighting callback such as MinSNRWeighting, got {type(weighting).__name__}."
            )
        taus = [tau for tau in (sampling.tau, weighting.tau) if tau is not None]
        if len(taus) == 2 and type(taus[0]) is type(taus[1]) and taus[0] != taus[1]:
            raise ValueError(
                f"{type(sampling).__name__}(tau={taus[0]!r}) and {type(weighting).__name__}(tau={taus[1]!r}) disagree: one "
                "convergence threshold holds for sampling, weighting and the monitor. Give both the same tau."
            )
        self.sampling, self.weighting = sampling, weighting
        self.tau = taus[0] if taus else None

    def _parts(self) -> tuple[StrategyCallback, StrategyCallback]:
        return self.sampling, self.weighting

    @override
    def resolved_tau(self, schedule: NoiseSchedule) -> int | None:
        resolved = {type(cb).__name__: cb.resolved_tau(schedule) for cb in self._parts() if cb.tau is not None}
        if len(set(resolved.values())) > 1:
            given = ", ".join(f"{name} tau={tau}" for name, tau in resolved.items())
            raise ValueError(f"Compose: its parts disagree on tau on this schedule ({given}); give both the same tau.")
        return next(iter(resolved.values()), None)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for part in self._parts():
            part.setup(trainer, pl_module, stage)
        self.sampler, self.weights = self.sampling.sampler, self.weighting.weights
        self._strategy = self.sampling._strategy

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for part in self._parts():
            part.on_fit_start(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        for part in self._parts():
            part.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for part in self._parts():
            part.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"sampling": self.sampling.state_dict(), "weighting": self.weighting.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sampling.load_state_dict(state_dict.get("sampling", {}))
        self.weighting.load_state_dict(state_dict.get("weighting", {}))


__all__ += ["Compose", "CurriculumSampling", "EDMLogNormalSampling", "LaplaceLogSNRSampling"]
