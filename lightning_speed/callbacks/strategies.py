"""TimestepCallback: installs time-step strategies into a LightningModule's ``timesteps``.

A module adopts them with three lines (``TIMESTEP_LINES``, shown in every error about them)::

    self.timesteps = TimestepStrategy(schedule)       # __init__: a NoiseSchedule, alphas_cumprod or a diffusers scheduler
    t = self.timesteps.sample(len(x), x.device)       # training_step, instead of torch.randint
    loss = self.timesteps.loss(t, per_sample_loss)    # instead of per_sample_loss.mean()

``TimestepCallback(strategies)`` takes one strategy of ``lightning_speed.timesteps`` or a list of them (one
sampling and one weighting role at most, checked when it is built); ``SpeeD(...)`` is its one-line form for
SpeeD. In ``setup`` it checks the module's schedules against ``timesteps.schedule`` (T, ``alphas_cumprod``,
a held diffusers scheduler and its prediction; on a flow, the process and the shift of a held
``FlowSchedule`` or ``FlowMatchEulerDiscreteScheduler``) and binds and installs the strategies with
``TimestepStrategy.install`` (one tau among them). A ``timesteps`` the module replaces after setup fails at
fit start, and a training step that skips ``timesteps.loss`` while weights (or a loss-driven sampler) are
installed fails at its end. The callback only glues: the math lives in ``lightning_speed.timesteps``.

Checkpointing: ``state_dict`` holds the sampling strategy's seed, RNG state and statistics (loss history,
curriculum step). Lightning restores callbacks after ``setup`` and before the first training step, so
``load_state_dict`` applies the state to the installed strategy at once; a state loaded before ``setup`` is
kept and applied when the strategy is bound. The RNG state is applied when the generator is (re)built on the
device, so a CUDA generator's state restores on CUDA. Lightning writes the state of rank 0 only, and every rank
resumes from it: the rank that wrote it continues its stream exactly, the others keep its statistics and step but
reseed from its generator state and their rank, so that ranks go on drawing different time steps.

Seeding: ``seed=None`` derives the sampler's seed from ``torch.initial_seed()`` at setup, so
``seed_everything`` makes runs reproducible; the global rank is mixed in so DDP ranks draw
different time steps.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Sequence
from typing import Any, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_speed import timesteps
from lightning_speed.distributed import rank_seed
from lightning_speed.flow import FlowSchedule, configured_shift, is_flow_scheduler
from lightning_speed.schedules import prediction_of
from lightning_speed.timesteps.base import (
    ConstantWeighting, StepRecord, Strategy, TimestepStrategy, UniformSampling, split_roles,
)
from lightning_speed.timesteps.speed import SpeeDTau
from lightning_speed.validation import check_int

TIMESTEP_LINES = (
    "    self.timesteps = TimestepStrategy(schedule)     # in __init__ (from lightning_speed.timesteps); schedule: "
    "a NoiseSchedule, an alphas_cumprod tensor, a diffusers scheduler or a flow.FlowSchedule\n"
    "    t = self.timesteps.sample(len(x), x.device)     # in training_step, instead of torch.randint\n"
    "    loss = self.timesteps.loss(t, per_sample_loss)  # instead of per_sample_loss.mean(); per_sample_loss shaped (B,)"
)


def find_strategy(pl_module: pl.LightningModule, user: str) -> TimestepStrategy:
    """``pl_module.timesteps``, or an error showing the three lines that add it."""
    name = type(pl_module).__name__
    strategy = getattr(pl_module, "timesteps", None)
    if isinstance(strategy, TimestepStrategy):
        return strategy
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
        if is_flow_scheduler(value):  # a solver with flow sigmas keeps an alphas_cumprod it does not sample with
            continue
        found[f"{name}.{attr}.alphas_cumprod"] = (getattr(value, "alphas_cumprod", None), f"self.{attr}", value)
    return {
        where: found[where] for where, (ab, _, _) in found.items()
        if isinstance(ab, (torch.Tensor, np.ndarray)) and ab.ndim == 1
    }  # fmt: skip


def _module_flows(pl_module: pl.LightningModule) -> dict[str, float | None]:
    """The flow schedules a module holds besides its ``timesteps`` (public attributes: a ``FlowSchedule`` or a
    diffusers flow-matching scheduler), as ``{where: shift}``; None for a scheduler with dynamic shifting, whose
    shift is chosen per resolution."""
    name, found = type(pl_module).__name__, {}
    for attr, value in vars(pl_module).items():
        if attr.startswith("_") or attr == "timesteps":
            continue
        if isinstance(value, FlowSchedule):
            found[f"{name}.{attr}"] = value.shift
        elif is_flow_scheduler(value):
            found[f"{name}.{attr}"] = configured_shift(value)
    return found


def _check_process(pl_module: pl.LightningModule, strategy: TimestepStrategy, user: str) -> None:
    """The strategy's process (DDPM or flow) against the schedules the module holds and the ``process`` it states;
    on a flow, its shift against a held flow schedule's and a stated ``shift``. Runs once, at setup."""
    name, ours = type(pl_module).__name__, strategy.process
    stated = getattr(pl_module, "process", None)
    if stated in ("ddpm", "flow") and stated != ours:
        raise ValueError(
            f"{user}: {name}.process is {stated!r} but {name}.timesteps is built on {strategy.schedule!r}, a "
            f"{ours} schedule: build it from the schedule the training step uses, e.g. TimestepStrategy(FlowSchedule(shift)) "
            "for a flow."
        )
    others = _module_schedules(pl_module) if ours == "flow" else _module_flows(pl_module)
    if others:
        kind = "a DDPM noise schedule" if ours == "flow" else "a flow-matching schedule"
        raise ValueError(
            f"{user} draws {'flow times' if ours == 'flow' else 'time steps'} from {name}.timesteps "
            f"({strategy.schedule!r}), but {next(iter(others)).removesuffix('.alphas_cumprod')} holds {kind}: "
            "the time steps, tau and weights would describe another process than the one the training step "
            "noises with. Build the strategy from the schedule the training step uses (a schedule it does not "
            "noise with is not compared when the attribute's name starts with an underscore)."
        )
    if ours != "flow":
        return
    shift = strategy.schedule.shift
    theirs = _module_flows(pl_module)
    if isinstance(getattr(pl_module, "shift", None), (int, float)) and not isinstance(pl_module.shift, bool):
        theirs[f"{name}.shift"] = float(pl_module.shift)
    for where, other in theirs.items():
        if other is not None and not math.isclose(other, shift, rel_tol=1e-9):
            raise ValueError(
                f"{user} draws flow times from {name}.timesteps with shift {shift:g}, but {where} has shift {other:g}: "
                "training would draw its times with another shift than the schedule the model is sampled with. "
                f"Build the strategy from that schedule, TimestepStrategy(self.{where.split('.', 1)[1]}), or give "
                "both the same shift."
            )


def _check_schedule(pl_module: pl.LightningModule, strategy: TimestepStrategy, user: str,
                    uses_prediction: bool = False) -> None:
    """The strategy's schedule against the module's ``num_timesteps`` and the schedules it holds: t drawn for
    another T would index the module's schedule out of range or at wrong steps, and tau, the sampling table and
    the weights of another schedule would not describe the noise the training step adds; the strategy's prediction
    against a held scheduler's and, for weights that depend on it (``uses_prediction``: Min-SNR's), against the
    module's ``prediction``. Runs once, at setup."""
    _check_process(pl_module, strategy, user)
    if strategy.process == "flow":
        return
    name = type(pl_module).__name__
    stated_prediction = getattr(pl_module, "prediction", None)
    if uses_prediction and isinstance(stated_prediction, str) and stated_prediction != strategy.prediction:
        raise ValueError(
            f"{user}: its weights depend on what the network predicts, and the predictions stated disagree "
            f"(pl_module.timesteps.prediction = {strategy.prediction!r}, {name}.prediction = {stated_prediction!r}). "
            "State it once, in TimestepStrategy(schedule, prediction=...)."
        )
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


class TimestepCallback(Callback):
    """Installs time-step strategies into ``pl_module.timesteps`` and keeps their state.

    Args:
        strategies: one strategy of ``lightning_speed.timesteps`` or a list of them: at most one that samples
            and one that weights (``SpeeD`` plays both), with one tau among them.
        seed: seed of the sampling strategy's own generator; ``None`` derives one from
            ``torch.initial_seed()`` at setup (so ``seed_everything`` makes runs reproducible). The global
            rank is mixed in.
    """

    def __init__(self, strategies: Union[Strategy, Sequence[Strategy]], seed: int | None = None) -> None:
        self.sampling, self.weighting = split_roles(strategies)
        self.strategies = [strategies] if isinstance(strategies, Strategy) else list(strategies)
        self.seed = None if seed is None else check_int(seed, "seed", hint="or null to derive it from the global seed")
        self.name = " + ".join(type(s).__name__ for s in self.strategies)
        self._timesteps: TimestepStrategy | None = None
        self._pending_state: dict[str, Any] | None = None  # the callback's state, loaded before the strategy was bound
        self._rank = 0  # the global rank, set at setup
        self._seen: StepRecord | None = None  # timesteps.last at the end of the previous step

    def __repr__(self) -> str:
        return f"TimestepCallback({', '.join(map(repr, self.strategies))}, seed={self.seed})"

    @property
    @override
    def state_key(self) -> str:
        # The strategies' names: a checkpoint resumes the same strategies, however the callback was written.
        return self._generate_state_key(strategies=self.name)

    # -- setup --------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        others = [cb for cb in trainer.callbacks if isinstance(cb, TimestepCallback) and cb is not self]
        if others:
            names = ", ".join(cb.name for cb in [self, *others])
            raise ValueError(
                f"trainer.callbacks has {len(others) + 1} TimestepCallbacks ({names}): each would replace what the "
                "other installed. Install every strategy with one: TimestepCallback([sampling, weighting])."
            )
        self._rank = trainer.global_rank
        strategy = find_strategy(pl_module, self.name)
        _check_schedule(pl_module, strategy, self.name, any(s.uses_prediction for s in self.strategies))
        if self._timesteps is not strategy:  # first fit, or a new module (a repeated fit keeps the objects)
            for role, held, default, ours in (("sampler", strategy.sampler, UniformSampling, self.sampling),
                                              ("weights", strategy.weights, ConstantWeighting, self.weighting)):
                if ours is not None and type(held) is not default:
                    rank_zero_warn(f"{self.name} replaces the {held!r} that {type(pl_module).__name__}.timesteps.{role} "
                                   "already held.")
            strategy.install(self.sampling, self.weighting)
            if self.sampling is not None:
                self.sampling.manual_seed(self.sampler_seed(trainer))
            self._timesteps = strategy
        if self.sampling is not None:
            self._follow(trainer)  # a curriculum without max_steps fails here
            if hasattr(self.sampling, "all_gather"):  # adaptive samplers see every rank's losses
                self.sampling.all_gather = gather_from_ranks if trainer.world_size > 1 else None
        if self._pending_state is not None:
            self._apply_pending()

    def _follow(self, trainer: pl.Trainer) -> None:
        # trainer.global_step is a Python int (restored on resume): moving a curriculum never syncs. Its warnings
        # (a run shorter than the curriculum, a resume with another length) are the same on every rank: rank 0's.
        if trainer.global_rank == 0:
            self.sampling.set_step(trainer.global_step, trainer.max_steps)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.sampling.set_step(trainer.global_step, trainer.max_steps)

    def sampler_seed(self, trainer: pl.Trainer) -> int:
        """The seed the sampling strategy gets on this rank."""
        key = type(self.sampling).__name__
        base = self.seed if self.seed is not None else torch.initial_seed() + zlib.crc32(key.encode())
        return rank_seed(base, trainer.global_rank)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._timesteps is None:
            return
        name = type(pl_module).__name__
        if getattr(pl_module, "timesteps", None) is not self._timesteps:
            raise ValueError(
                f"{name}.timesteps was replaced after {self.name} was installed into it at setup (e.g. by "
                f"{name}.setup or configure_model), so training would draw uniform t and weigh every loss by 1. "
                "Create self.timesteps once, in __init__, and keep that object (sample() moves its tables to the "
                "batch's device)."
            )
        self._timesteps.to(pl_module.device)
        self._seen = self._timesteps.last  # a record from before this fit is not this fit's step

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.sampling is not None:
            self._follow(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Host-side identity checks only. outputs is None or {} when training_step returned None (a skipped batch).
        if self._timesteps is None or outputs is None or (isinstance(outputs, dict) and not outputs):
            return
        if self.weighting is not None:
            acting, how = self.weighting, "weights each loss"
        elif self.sampling is not None and self.sampling.acts_in_loss:
            acting, how = self.sampling, "reweights and observes each loss"
        else:
            return  # it only chooses t: a step that averages its loss itself loses nothing
        if self._timesteps.last is self._seen:
            name = type(pl_module).__name__
            raise ValueError(
                f"{type(acting).__name__} {how} through {name}.timesteps.loss, but this training_step did not call it "
                "(e.g. it returned per_sample_loss.mean()), so it was never applied. Compute the loss with:\n"
                + TIMESTEP_LINES
            )
        self._seen = self._timesteps.last

    # -- checkpointing ----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._timesteps is None or self.sampling is None:
            return dict(self._pending_state) if self._pending_state is not None else {}
        return {"sampling": self.sampling.extra_state(), "rank": self._rank}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict) if state_dict.get("sampling") is not None else None
        if self._timesteps is not None:
            self._apply_pending()

    def _apply_pending(self) -> None:
        state, self._pending_state = self._pending_state, None
        if self.sampling is None or state is None:
            return
        self.sampling.load_extra_state(state["sampling"])
        saved_by = state.get("rank", 0)  # Lightning writes rank 0's state
        if saved_by != self._rank and self.sampling.seed is not None:  # not this rank's stream: one of its own
            moved = self.sampling.seed + (_generator_checksum(state["sampling"]) << 32)
            self.sampling.manual_seed(rank_seed(moved, self._rank - saved_by))


def _generator_checksum(state: Any, crc: int = 0) -> int:
    """CRC-32 of every generator state in a sampler's saved state, nested samplers' included: it moves with each draw."""
    if isinstance(state, dict):
        for key, value in state.items():
            if key == "rng" and value is not None:
                crc = zlib.crc32(torch.as_tensor(value["state"]).cpu().numpy().tobytes(), crc)
            else:
                crc = _generator_checksum(value, crc)
    return crc


def SpeeD(tau: SpeeDTau = None, k: float = 5.0, dual: bool = True, lam: Optional[float] = 0.6,  # noqa: N802
          seed: int | None = None) -> TimestepCallback:
    """SpeeD as a callback, in one line: ``TimestepCallback(lightning_speed.timesteps.SpeeD(tau, k, dual, lam), seed)``.

    ``pl.Trainer(callbacks=[SpeeD(tau=700, k=5, lam=0.6)])``; the arguments are the strategy's (tau None: 700 on a
    DDPM schedule, "auto" on a flow), and ``seed`` the callback's.
    """
    return TimestepCallback(timesteps.SpeeD(tau, k, dual, lam), seed=seed)


def gather_from_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every rank stacked, (world_size, *shape), over torch.distributed's default group.

    A plain function rather than the strategy's bound method: the sampler lives in the module, which
    EMAWeightAveraging deep-copies, and a strategy holds process-group handles that cannot be copied.
    """
    world, tensor = torch.distributed.get_world_size(), tensor.contiguous().reshape(-1, *tensor.shape[1:])
    out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))  # concatenated along dim 0, as gloo needs
    torch.distributed.all_gather_into_tensor(out, tensor)
    return out.view(world, *tensor.shape)


__all__ = ["SpeeD", "TIMESTEP_LINES", "TimestepCallback", "find_strategy", "gather_from_ranks"]
