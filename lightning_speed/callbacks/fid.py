"""FIDCallback: FID (and optionally KID) of generated samples during and after training.

Every ``every_n_steps`` optimizer steps, at the end of validation epochs and/or at the end of
training, the callback generates ``num_samples`` images with ``pl_module.sample`` (EMA weights
when an ``EMAWeightAveraging`` callback keeps them; a fixed seed so successive points are
comparable), passes them through the feature network and logs ``fid`` at ``trainer.global_step``
together with ``fid/seconds`` (wall time of the whole evaluation, since we benchmark it).

Long evaluations say so: a progress bar with the time left (a line per minute without a progress
bar), a warning when training starts if the configured evaluations need far more network
evaluations than the training itself (e.g. 5,000 DDIM-50 samples after a few CPU steps), and a
stop signal (SIGTERM / Ctrl+C) ends the evaluation after the current sampling batch, on every
rank under DDP. Generated images with NaN or inf values (a diverged model) give FID NaN with a
warning, never a number.

Real-image statistics are computed once in ``setup`` (before training, where a missing
Inception file also surfaces), cached on disk (see ``lightning_speed.metrics.reference``) and
injected into torchmetrics' ``FrechetInceptionDistance``, so evaluations only pay for the
generated images. Under DDP each rank generates its share of the samples; torchmetrics sums the
fake statistics across ranks at ``compute`` (the cached real statistics are injected on rank 0
only, so the sum counts them once).
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn
from tqdm import tqdm
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lightning_speed.metrics.features import count_nonfinite, resolve_feature_extractor, to_uint8
from lightning_speed.metrics.reference import (
    ReferenceStats,
    cache_file,
    check_reference_images,
    images_fingerprint,
    load_or_compute_reference_stats,
    load_reference_stats,
)
from lightning_speed.callbacks.ema import (
    SHARDED_STRATEGIES,
    averaged_weights,
    check_training_weights_kept,
    ema_swapped_in_during_validation,
    training_weights,
)
from lightning_speed.distributed import received_stop_signal
from lightning_speed.metrics.sampling import generate_batches, local_share, sample_method
from lightning_speed.data.base import SPLITS, UInt8ImageDataModule
from lightning_speed.flow import FLOW_SOLVERS
from lightning_speed.module_checks import PROCESS_SOLVERS, AnySolver, check_process_solver
from lightning_speed.solvers import SOLVERS, check_solver
from lightning_speed.validation import check_choice, check_folder, check_int, check_number

ReferenceImages = Tensor | Callable[[], Tensor]
TRAIN_PASSES = 3  # network evaluations per training image: a forward and a backward of about twice its cost
FAR_LONGER = 10.0  # warn when the evaluations need this many times the training's network evaluations


# Arguments the callbacks pass to ``pl_module.sample`` themselves, from their own settings: in
# ``sample_kwargs`` they would silently replace those settings (the logged label, the state key and
# the cost estimate would then describe a run that did not happen), so they are refused there.
RESERVED_SAMPLE_KWARGS = {
    "num_samples": "use the callback's own num_samples argument",
    "solver": "use the callback's own solver argument",
    "solver_steps": "use the callback's own solver_steps argument",
    "eta": "use the callback's own eta argument",
    "generator": "the callback seeds its own generator from seed",
    "noise": "the callback draws the noise from seed, one batch at a time",
}


def check_sample_kwargs(owner: str, sample_kwargs: Any) -> dict[str, Any]:
    """``sample_kwargs`` as a plain dict, checked without a module: a mapping of names to values, no name the
    callback sets itself, and the values of ``DiffusionModule.sample``'s own options (``batch_size``,
    ``guidance_scale``) in range. Which names the module's ``sample`` takes is checked in ``setup``."""
    if sample_kwargs is None:
        return {}
    if not isinstance(sample_kwargs, Mapping) or not all(isinstance(k, str) for k in sample_kwargs):
        raise TypeError(
            f"{owner}(sample_kwargs={sample_kwargs!r}): sample_kwargs must map argument names of pl_module.sample to "
            "values, e.g. {guidance_scale: 4.0}, or be null."
        )
    kwargs = dict(sample_kwargs)
    reserved = [name for name in kwargs if name in RESERVED_SAMPLE_KWARGS]
    if reserved:
        raise ValueError(
            f"{owner}(sample_kwargs={kwargs!r}): the callback passes {', '.join(reserved)} to sample() itself; remove "
            "them from sample_kwargs: "
            + "; ".join(f"{name}: {RESERVED_SAMPLE_KWARGS[name]}" for name in reserved)
            + "."
        )
    if kwargs.get("batch_size") is not None:
        kwargs["batch_size"] = check_int(
            kwargs["batch_size"], f"{owner}: sample_kwargs.batch_size", minimum=1,
            hint="it is how many images pl_module.sample passes through the network at once (null: the whole batch)",
        )
    if kwargs.get("guidance_scale") is not None:
        kwargs["guidance_scale"] = check_number(
            kwargs["guidance_scale"], f"{owner}: sample_kwargs.guidance_scale",
            hint="it is the classifier-free guidance scale (1: no guidance)",
        )
    return kwargs


class SolverSettings:
    """How FIDCallback and SampleGridCallback generate images: the checked settings and the one call."""

    def _set_solver(
        self,
        solver: AnySolver | None,
        solver_steps: int,
        eta: float | None,
        use_ema: bool,
        sample_kwargs: dict[str, Any] | None,
    ) -> None:
        """Check and store the generation settings."""
        owner = type(self).__name__
        if solver is not None and solver not in (*SOLVERS, *FLOW_SOLVERS):
            choices = " or ".join(f'"{name}"' for name in (*SOLVERS, *FLOW_SOLVERS))
            raise ValueError(f"{owner}(solver={solver!r}): choose {choices} (euler and heun for flow models), "
                             "or null for the model's own (ddim for a DDPM, euler for a flow).")
        solver_steps = check_int(solver_steps, "solver_steps", minimum=2, hint="at most the model's T")
        if eta is not None:
            eta = check_number(eta, "eta", at_least=0.0, at_most=1.0, hint="0: deterministic DDIM, 1: DDPM's variance")
        self.solver, self.solver_steps, self.eta = solver, solver_steps, eta
        if solver is not None:
            self._check_solver_alone(owner)
        self.use_ema, self.sample_kwargs = use_ema, check_sample_kwargs(owner, sample_kwargs)

    def _check_solver_alone(self, owner: str) -> None:
        """What can be checked without the model: eta and the step count against the solver."""
        if self.solver in FLOW_SOLVERS:
            check_process_solver(self.solver, "flow", owner, self.eta)
        else:
            check_solver(self.solver, self.solver_steps, self.eta, num_timesteps=None)  # T: in _check_module

    def _check_module(self, pl_module: "pl.LightningModule") -> None:
        """In ``setup``, before any training step: ``pl_module`` can sample with these settings."""
        owner, sample = type(self).__name__, sample_method(pl_module)
        process = getattr(pl_module, "process", None)  # a DiffusionModule's
        if not (isinstance(process, str) and process in PROCESS_SOLVERS):  # a module of one's own: its strategy's
            process = getattr(getattr(pl_module, "timesteps", None), "process", None)
        known = isinstance(process, str) and process in PROCESS_SOLVERS
        if self.solver is None:  # the process's own first solver; a module that says neither samples as a DDPM
            self.solver = check_process_solver(None, process if known else "ddpm")
            try:
                self._check_solver_alone(owner)
            except ValueError as err:
                raise ValueError(f"{owner}: {err}") from None
        if known:  # a solver of its process
            check_process_solver(self.solver, process, owner)
        elif self.solver in FLOW_SOLVERS:
            raise ValueError(
                f"{owner}(solver={self.solver!r}): {self.solver} integrates a flow, but {type(pl_module).__name__} "
                "names no process (no `process` attribute, no `timesteps` TimestepStrategy), so it samples as a DDPM: "
                f"use {' or '.join(map(repr, SOLVERS))}, or state the flow in the module's __init__: "
                "self.process = 'flow' (or self.timesteps = TimestepStrategy(FlowSchedule(shift)))."
            )
        num_timesteps = getattr(pl_module, "num_timesteps", None)
        if not isinstance(num_timesteps, int):  # a module of one's own: the T of its strategy's schedule
            num_timesteps = getattr(getattr(pl_module, "timesteps", None), "num_timesteps", None)
        if isinstance(num_timesteps, int) and self.solver in SOLVERS:
            try:
                check_solver(self.solver, self.solver_steps, self.eta, num_timesteps)
            except ValueError as err:
                raise ValueError(f"{owner}: {err}") from None
        scale = self.sample_kwargs.get("guidance_scale")
        if scale is not None and scale != 1 and getattr(pl_module, "num_classes", 0) is None:
            raise ValueError(
                f"{owner}: sample_kwargs.guidance_scale={scale:g} needs a class-conditional model, but "
                f"{type(pl_module).__name__} is unconditional (num_classes is null): drop guidance_scale from "
                "sample_kwargs, or set it to 1."
            )
        if scale is not None and scale != 1 and getattr(pl_module, "label_dropout", None) == 0:
            raise ValueError(
                f"{owner}: sample_kwargs.guidance_scale={scale:g} mixes in the unconditional prediction (the null "
                f"label), which {type(pl_module).__name__} never trains (label_dropout is 0): set model.label_dropout "
                "above 0 (DiT uses 0.1), or drop guidance_scale from sample_kwargs."
            )
        try:
            signature = inspect.signature(sample)
        except (TypeError, ValueError):  # a builtin or C callable without a readable signature: checked when called
            return
        parameters = signature.parameters.values()
        named = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters)  # a **kwargs may take any name
        unknown = sorted(set(self.sample_kwargs) - set(named))
        method = f"{type(pl_module).__name__}.sample()"
        if unknown and not open_ended:
            usable = [name for name in named[1:] if name not in RESERVED_SAMPLE_KWARGS]
            raise TypeError(
                f"{owner}(sample_kwargs={self.sample_kwargs!r}): {method} has no argument {', '.join(unknown)}; "
                f"use its names: {', '.join(usable) or '(none besides those the callback sets)'}."
            )
        # The exact call generate_batches makes (one image; the values do not matter to bind).
        passed: dict[str, Any] = {"solver": self.solver, "solver_steps": self.solver_steps, "generator": None}
        if self.eta is not None:
            passed["eta"] = self.eta
        try:
            signature.bind(1, **passed, **self.sample_kwargs)
        except TypeError as err:
            call = ", ".join(["num_samples", *passed, *(f"{k}=<sample_kwargs>" for k in self.sample_kwargs)])
            raise TypeError(
                f"{owner}: {method} cannot be called as this callback calls it, sample({call}): {err}. A sample "
                "method must take num_samples and the keywords solver, solver_steps, generator (and eta when eta is "
                f"set); extra arguments come from sample_kwargs (now {self.sample_kwargs!r})."
            ) from None

    def _check_strategy(self, trainer: "pl.Trainer") -> None:
        """Sampling calls the backbone on its own, outside the strategy's wrapper: FSDP's shards cannot run that way."""
        strategy = trainer.strategy
        if isinstance(strategy, SHARDED_STRATEGIES):
            name = type(self).__name__
            raise ValueError(
                f"{name} cannot sample under {type(strategy).__name__}: it calls the backbone directly, and each rank "
                f"holds only a shard of its parameters. Set this callback's key to null under a sharded strategy "
                "(configs/multi_gpu/fsdp_dit_xl.yaml does), and evaluate a checkpoint on one GPU instead (its "
                "state_dict holds the EMA weights): `lightning-speed validate --config <the same configs without the "
                "FSDP file> --ckpt_path <run>/checkpoints/last.ckpt --fid.init_args.on_validation true`."
            )

    def _generate(self, pl_module: "pl.LightningModule", count: int, *, batch_size: int, seed: int) -> Iterator[Tensor]:
        """``count`` images, ``batch_size`` at a time, from ``pl_module.sample`` with these settings.

        Call it inside ``averaged_weights``: the caller owns the EMA swap, so a stop mid-way restores the weights.
        """
        return generate_batches(
            pl_module,
            count,
            batch_size=batch_size,
            solver=self.solver,
            solver_steps=self.solver_steps,
            eta=self.eta,
            seed=seed,
            sample_kwargs=self.sample_kwargs,
        )


def _stop_if_signalled(trainer: "pl.Trainer") -> None:
    """Raise ``SIGTERMException`` if this rank or, under DDP, any rank received a stop signal."""
    signalled = received_stop_signal(trainer)
    if trainer.world_size > 1:
        # One small all-reduce and a host sync per sampling batch: this is evaluation, not the training step.
        signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
    if signalled:
        raise SIGTERMException


class _Progress:
    """A tqdm bar over generated images (rank 0); without a progress bar, a line with the time left per minute."""

    def __init__(self, trainer: "pl.Trainer", total: int, label: str) -> None:
        self.enabled = trainer.is_global_zero
        self.bar = trainer.progress_bar_callback is not None and self.enabled
        self.total, self.label, self.done = total, label, 0
        self.start = self.last_line = time.perf_counter()
        self._tqdm = tqdm(total=total, desc=label, unit="img", leave=False, dynamic_ncols=True, file=sys.stderr,
                          mininterval=0) if self.bar else None  # refresh at every sampling batch: they are few and slow

    def update(self, n: int) -> None:
        self.done += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        elif self.enabled and time.perf_counter() - self.last_line >= 60 and self.done < self.total:
            elapsed = time.perf_counter() - self.start
            left = elapsed / self.done * (self.total - self.done)
            rank_zero_info(f"{self.label}: {self.done}/{self.total} images, about {left / 60:.1f} min left")
            self.last_line = time.perf_counter()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


class FIDCallback(SolverSettings, pl.Callback):
    """Log ``fid`` of generated samples every N steps, at validation and/or at train end.

    Args:
        every_n_steps: evaluate when ``trainer.global_step`` is a multiple of this (None: never by step).
        on_validation: evaluate at the end of each validation epoch (not during the sanity check).
        on_train_end: evaluate once more when training ends (skipped if that step was just evaluated).
        num_samples: generated images per evaluation, over all ranks.
        solver / solver_steps / eta: how images are generated, passed to ``pl_module.sample``:
            "ddim", "ddpm" or "dpmpp_2m" (a flow model: "euler" or "heun"; None: the model's own, ddim for a
            DDPM and euler for a flow, chosen at setup), its number of steps, and eta (None: the solver's
            default; ddim only).
        batch_size: images per ``sample`` call and per feature-network batch; a stop signal is
            honoured between batches.
        feature_extractor: "inception" (standard; needs its weights file), "fashion_mnist" (offline),
            an ``nn.Module`` taking uint8 (N, C, H, W), an import path "pkg.module.Name", or a file
            saved with ``torch.save(module)``.
        reference_split / num_reference: real images = ``datamodule.reference_images(split, num_reference)``
            (None: the whole split), read ``batch_size`` at a time through ``reference_batches`` when the
            datamodule has it (the lightning_speed ones do: an image folder is never decoded whole).
        reference_images: real images (uint8 (N, C, H, W)) or a no-argument callable returning them,
            for training without our datamodules; overrides the datamodule.
        cache_dir: where real statistics are cached (default ``~/.cache/lightning_speed/fid``).
        seed: noise seed; rank r uses ``seed + r``, so every evaluation draws the same noise (and KID the same subsets).
        compute_kid: also log ``kid_mean`` / ``kid_std`` (keeps all real features in memory).
        kid_subset_size: KID subset size (capped at the sample and reference counts).
        use_ema: sample with the EMA weights of a ``WeightAveraging`` callback when one is present.
        sample_kwargs: extra keyword arguments for ``pl_module.sample`` (e.g. ``guidance_scale``).
        download_timeout: seconds to wait for the one Inception download attempt.
        name: metric name; logs ``name``, ``name/seconds`` (and ``kid_mean``/``kid_std``, prefixed with
            ``name/`` unless name is "fid"). Lets two callbacks coexist, e.g. ``fid`` (DDIM-50 curve) and
            ``fid_ddpm250`` (final point).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        on_validation: bool = False,
        on_train_end: bool = True,
        num_samples: int = 5000,
        solver: AnySolver | None = None,
        solver_steps: int = 50,
        eta: float | None = None,
        batch_size: int = 500,
        feature_extractor: str | nn.Module = "inception",
        reference_split: str = "test",
        num_reference: int | None = None,
        reference_images: ReferenceImages | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        compute_kid: bool = False,
        kid_subset_size: int = 1000,
        use_ema: bool = True,
        sample_kwargs: dict[str, Any] | None = None,
        download_timeout: float = 10.0,
        name: str = "fid",
    ) -> None:
        super().__init__()
        self._set_solver(solver, solver_steps, eta, use_ema, sample_kwargs)
        if every_n_steps is not None:
            every_n_steps = check_int(every_n_steps, "every_n_steps", minimum=1, hint="null: no periodic evaluation")
        num_samples = check_int(num_samples, "num_samples", minimum=2, hint="FID needs at least 2 generated images")
        batch_size = check_int(
            batch_size, "batch_size", minimum=1, hint="it is the images per sample call and per feature-network batch"
        )
        seed = check_int(seed, "seed")
        # The real side: checked here with these arguments' names (the datamodule's own errors name its arguments).
        if not isinstance(reference_split, str) or not reference_split:
            raise TypeError(f"reference_split must name a split of the datamodule, e.g. 'test', got {reference_split!r}.")
        if num_reference is not None:
            num_reference = check_int(
                num_reference, "num_reference", minimum=2, hint="FID needs 2 real images or more; null: the whole split"
            )
        # KID's unbiased estimate divides by subset_size - 1: a subset of 1 gives inf/NaN, not a number.
        kid_subset_size = check_int(kid_subset_size, "kid_subset_size", minimum=2, hint="the usual value is 1000")
        # when to evaluate
        self.every_n_steps = every_n_steps
        self.eval_on_validation, self.eval_on_train_end = on_validation, on_train_end
        # the generated side
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        # the real side and the feature network
        self.reference_split, self.num_reference, self.reference_images = reference_split, num_reference, reference_images
        self.feature_extractor, self.download_timeout = feature_extractor, download_timeout
        self.cache_dir = check_folder(cache_dir, "FIDCallback.cache_dir")
        # what is reported
        self.compute_kid, self.kid_subset_size, self.name = compute_kid, kid_subset_size, name

        self.history: list[tuple[int, float]] = []
        self.kid_history: list[tuple[int, float, float]] = []
        self.seconds: list[tuple[int, float]] = []  # (step, wall seconds) of this process's evaluations
        self.reference_from_cache: bool | None = None  # set in setup: True if the real stats came from disk
        self.reference_key: str | None = None
        self._fid: FrechetInceptionDistance | None = None
        self._kid: KernelInceptionDistance | None = None
        self._extractor: nn.Module | None = None  # resolved once, at the first setup
        self._last_eval_step = -1
        self._cost_checked = False

    # ------------------------------------------------------------------ setup: extractor + real statistics

    def _reference_source(
        self, trainer: "pl.Trainer", image_shape: tuple[int, ...] | None
    ) -> tuple[str, Callable[[], Tensor | Iterable[Tensor]]]:
        """(cache key of the real images, a callable giving them: a tensor, or batches from a datamodule's
        ``reference_batches``, so a large image folder is streamed through the feature network).

        Real images, whole or streamed, must have ``image_shape``, the generated images' (C, H, W), when it is known.
        """

        def checked(images: Tensor, min_count: int = 2) -> Tensor:
            images = check_reference_images(images, min_count)
            if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
                c, h, w = images.shape[1:]
                raise ValueError(
                    f"FIDCallback ({self.name}): the reference images are {c}x{h}x{w} (C x H x W) but the model "
                    f"generates {'x'.join(map(str, image_shape))} images, and FID must compare images of one shape: "
                    "give reference images prepared like the training images (the same size, padding and channels)."
                )
            return images

        if self.reference_images is not None:
            given = self.reference_images
            images = checked(given() if callable(given) else given)
            return f"tensor-{images_fingerprint(images)}-n{images.shape[0]}", lambda: images
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not callable(getattr(datamodule, "reference_images", None)):
            raise ValueError(
                "FIDCallback needs real images: train with a datamodule that has reference_images(split, max_images) "
                "and reference_key(split, max_images) (the lightning_speed datamodules do), or pass "
                "FIDCallback(reference_images=<uint8 tensor (N, C, H, W)> or a callable returning one)."
            )
        split, n = self.reference_split, self.num_reference
        if isinstance(datamodule, UInt8ImageDataModule):  # ours: known splits (another datamodule checks its own)
            check_choice(split, "reference_split", SPLITS)
        if callable(getattr(datamodule, "reference_key", None)):
            key = str(datamodule.reference_key(split, n))
            if callable(getattr(datamodule, "reference_batches", None)):
                return key, lambda: (checked(b, 1) for b in datamodule.reference_batches(split, n, self.batch_size))
            return key, lambda: checked(datamodule.reference_images(split, n))
        images = checked(datamodule.reference_images(split, n))
        return f"{type(datamodule).__name__}-{split}-{images_fingerprint(images)}", lambda: images

    def _check_unique_name(self, trainer: "pl.Trainer") -> None:
        """Two FID callbacks of one name would log both their values under the same tags at the same step."""
        if any(isinstance(other, FIDCallback) and other is not self and other.name == self.name
               for other in trainer.callbacks):
            raise ValueError(
                f"Two FIDCallbacks are named {self.name!r}, so both would log {self.name!r} and "
                f"'{self.name}/seconds' at the same steps and their curves would mix: give each its own `name` "
                "(e.g. --final_fid.init_args.name fid_final)."
            )

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Resolve the feature network (a missing Inception file fails here) and load/compute real stats.

        Under ``trainer.fast_dev_run`` only the checks run (feature network, real-image source):
        no statistics are computed and no FID is evaluated, as Lightning's own callbacks skip work.
        A later ``fit`` or ``validate`` with other real images (another datamodule) loads their statistics;
        with the same ones the loaded statistics are kept.
        """
        if stage not in ("fit", "validate"):
            return
        self._check_strategy(trainer)
        if self.num_samples < trainer.world_size:  # on every rank: one without samples would skip the sum at compute
            raise ValueError(
                f"FIDCallback ({self.name}): num_samples={self.num_samples} is fewer than the {trainer.world_size} "
                "ranks, and each rank generates a share: raise num_samples (well over the feature dimension)."
            )
        self._check_module(pl_module)
        self._check_unique_name(trainer)
        if not self.use_ema and self.eval_on_train_end:
            check_training_weights_kept(trainer, self)
        start = time.perf_counter()
        device = trainer.strategy.root_device
        image_shape = getattr(pl_module, "output_shape", getattr(pl_module, "image_shape", None))  # what FID sees
        ref_key, load_images = self._reference_source(trainer, image_shape)
        if image_shape is None and not isinstance(self.feature_extractor, str):
            real = load_images()
            image_shape = tuple((real if isinstance(real, Tensor) else next(iter(real))).shape[1:])
        extractor = self._extractor if self._extractor is not None else resolve_feature_extractor(
            self.feature_extractor,
            tuple(image_shape) if image_shape is not None else None,
            download_timeout=self.download_timeout,
        )
        self._extractor = extractor = extractor.to(device)
        key = f"{ref_key}|{extractor.fingerprint}"
        if self._fid is not None and key == self.reference_key:
            return  # the statistics of these real images are loaded already
        self._fid = self._kid = None
        self.reference_key = key
        if trainer.fast_dev_run:  # like Lightning's own callbacks: configuration checked above, no work
            rank_zero_info(f"FIDCallback ({self.name}): fast_dev_run, so no real statistics and no FID evaluations.")
            return

        stats: ReferenceStats | None = None
        if trainer.is_global_zero:
            stats, self.reference_from_cache = load_or_compute_reference_stats(
                key,
                load_images,
                extractor,
                cache_dir=self.cache_dir,
                batch_size=self.batch_size,
                device=device,
                keep_features=self.compute_kid,
            )
        trainer.strategy.barrier("fid_reference_stats")
        if not trainer.is_global_zero and self.compute_kid:  # KID needs each rank's slice of the real features
            stats = load_reference_stats(cache_file(self.cache_dir, key), key, need_features=True)
            if stats is None:  # no shared filesystem: compute locally, don't write
                stats, _ = load_or_compute_reference_stats(
                    key, load_images, extractor, cache_dir=self.cache_dir, batch_size=self.batch_size,
                    device=device, keep_features=True, write=False,
                )

        self._fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False).to(device)
        if stats is not None and trainer.is_global_zero:
            self._fid.real_features_sum = stats.feature_sum.to(device)
            self._fid.real_features_cov_sum = stats.feature_cov_sum.to(device)
            self._fid.real_features_num_samples = torch.tensor(stats.num_samples, dtype=torch.long, device=device)
        if self.compute_kid:
            assert stats is not None and stats.features is not None
            subset = min(self.kid_subset_size, self.num_samples, stats.num_samples)
            self._kid = KernelInceptionDistance(feature=extractor, subset_size=subset, reset_real_features=False)
            self._kid = self._kid.to(device)
            rank, world = trainer.global_rank, trainer.world_size
            self._kid.real_features = [stats.features[rank::world].to(device)]
        if trainer.is_global_zero and stats is not None:
            warning = self.sample_count_warning(extractor.num_features, stats.num_samples)
            if warning:
                rank_zero_warn(warning)
        if trainer.is_global_zero:
            where = "cache" if self.reference_from_cache else "computed"
            rank_zero_info(
                f"FIDCallback: {extractor.fingerprint} features, reference '{ref_key}' ({where}, "
                f"{time.perf_counter() - start:.1f}s)"
            )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *, ema_in: bool = False) -> float:
        """Generate this rank's share of samples, compute FID over all ranks, log and record it."""
        if self._fid is None:
            raise RuntimeError(
                "FIDCallback.evaluate called before setup (attach it to the Trainer; under fast_dev_run the "
                "callback skips its set-up and evaluations)."
            )
        start = time.perf_counter()
        rank, world = trainer.global_rank, trainer.world_size
        count = local_share(self.num_samples, world, rank)
        self._fid.reset()  # a previous evaluation stopped mid-way may have left its first batches
        if self._kid is not None:
            self._kid.reset()
        nonfinite = torch.zeros((), dtype=torch.long, device=pl_module.device)
        label = f"{self.name}: {self.solver.upper()}-{self.solver_steps}"
        # EMA weights swapped in by validation are swapped out again (the swap is symmetric) without use_ema;
        # without it at train end, the training weights go back in if the EMA has already copied its average in.
        if self.use_ema or ema_in:
            weights = averaged_weights(trainer, pl_module, already_in=ema_in and self.use_ema)
        else:
            weights = training_weights(trainer, pl_module)
        rounds = math.ceil(local_share(self.num_samples, world, 0) / self.batch_size)  # rank 0 has the most batches
        with weights:
            batches = self._generate(pl_module, count, batch_size=self.batch_size, seed=self.seed + rank)
            for images in self._until_stopped(trainer, batches, _Progress(trainer, count, label), rounds):
                nonfinite += count_nonfinite(images).to(nonfinite.device)
                fake = to_uint8(images)
                self._fid.update(fake, real=False)
                if self._kid is not None:
                    self._kid.update(fake, real=False)
        fid = float(self._fid.compute())  # one host sync per evaluation (also syncs across ranks)
        self._fid.reset()
        bad = int(trainer.strategy.reduce(nonfinite, reduce_op="sum"))
        if bad:
            fid = math.nan
            rank_zero_warn(
                f"FIDCallback ({self.name}): {bad} of {self.num_samples} generated images contain NaN or inf values at "
                f"step {trainer.global_step}, so {self.name} is logged as NaN: the model has diverged (lower the learning "
                "rate or clip gradients, and resume from a checkpoint written before the divergence)."
            )
        metrics = {self.name: fid}
        if self._kid is not None:
            with torch.random.fork_rng(devices=[]):  # KID's random subsets: seeded, the training's stream untouched
                torch.default_generator.manual_seed(self.seed)  # randperm draws on the CPU
                kid_mean, kid_std = (math.nan, math.nan) if bad else map(float, self._kid.compute())
            self._kid.reset()
            prefix = "" if self.name == "fid" else f"{self.name}/"
            metrics[f"{prefix}kid_mean"], metrics[f"{prefix}kid_std"] = kid_mean, kid_std
            self.kid_history.append((trainer.global_step, kid_mean, kid_std))
        metrics[f"{self.name}/seconds"] = time.perf_counter() - start
        self.seconds.append((trainer.global_step, metrics[f"{self.name}/seconds"]))
        self._log(trainer, metrics)
        if trainer.state.fn != TrainerFn.FITTING:  # validate, test: their results table shows what the module logs
            rank_zero_info(f"{self.name} = {fid:.4g} at step {trainer.global_step} ({self.num_samples} samples, "
                           f"{self.solver.upper()}-{self.solver_steps})")
        self.history.append((trainer.global_step, fid))
        self._last_eval_step = trainer.global_step
        return fid

    @staticmethod
    def _until_stopped(
        trainer: "pl.Trainer", batches: Iterable[Tensor], progress: _Progress, rounds: int
    ) -> Iterator[Tensor]:
        """Yield the batches with progress; after each, honour a stop signal (Lightning's SIGTERM flag).

        Raising Lightning's ``SIGTERMException`` takes the same path as a stop between training
        steps: ``CheckpointOnSignal`` saves a checkpoint and sets the exit status. Under DDP the signal
        may reach one rank only, and a rank that stopped alone would leave the others waiting at the
        metric's sync: every rank stops if any rank's flag is set. Each rank takes part in ``rounds``
        reductions, the most sampling batches of any rank, also after its own batches have run out.
        """
        done = 0
        try:
            for images in batches:
                progress.update(images.shape[0])
                yield images
                done += 1
                _stop_if_signalled(trainer)
            for _ in range(done, rounds):  # this rank's batches have run out: it joins the others' reductions
                _stop_if_signalled(trainer)
        finally:
            progress.close()

    # ------------------------------------------------------------------ cost, said up front
    @staticmethod
    def _total_steps(trainer: "pl.Trainer") -> float:
        """The run's optimizer steps: max_steps, else Lightning's estimate (inf when unbounded)."""
        return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches

    def planned_evaluations(self, trainer: "pl.Trainer") -> int:
        """How many evaluations the rest of this run will make (from max_steps, every_n_steps, validation)."""
        total = self._total_steps(trainer)
        if not math.isfinite(total):
            return 1
        left, count = max(0, int(total) - trainer.global_step), 0
        if self.every_n_steps:
            count += left // self.every_n_steps
        if self.eval_on_validation and trainer.enable_validation and isinstance(trainer.val_check_batch, int):
            count += left // max(1, trainer.val_check_batch)
        if self.eval_on_train_end and not (self.every_n_steps and int(total) % self.every_n_steps == 0):
            count += 1
        return count

    def _guidance_factor(self, pl_module: "pl.LightningModule") -> int:
        scale = self.sample_kwargs.get("guidance_scale", getattr(pl_module, "guidance_scale", 1.0))
        conditional = getattr(pl_module, "num_classes", None) is not None
        return 2 if conditional and scale not in (None, 0, 0.0, 1, 1.0) else 1

    def sample_count_warning(self, num_features: int, num_real: int) -> str | None:
        """A warning when the generated or real images are no more than the feature dimension: their covariance
        is then singular (rank at most n - 1 < D), and the FID says nothing about the model."""
        few = [f"{n:,} {kind}" for kind, n in (("generated", self.num_samples), ("real", num_real)) if n <= num_features]
        if not few:
            return None
        return (
            f"FIDCallback ({self.name}): {' and '.join(few)} images in {num_features}-d features: with no more "
            f"images than features the covariance is singular and the FID is not a meaningful figure. Use well over "
            f"{num_features:,} of each (num_samples, and num_reference or reference_images)."
        )

    def cost_warning(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch_size: int) -> str | None:
        """A warning when the planned evaluations need far more network evaluations than the training."""
        evaluations = self.planned_evaluations(trainer)
        total = self._total_steps(trainer)
        steps = max(1, int(total) - trainer.global_step) if math.isfinite(total) else None
        if not evaluations or steps is None:
            return None
        per_step = 2 if self.solver == "heun" else 1  # Heun evaluates the network twice a step
        eval_nfe = evaluations * self.num_samples * self.solver_steps * per_step * self._guidance_factor(pl_module)
        train_nfe = steps * batch_size * TRAIN_PASSES * trainer.world_size
        if eval_nfe < FAR_LONGER * train_nfe:
            return None
        device = trainer.strategy.root_device.type
        return (
            f"FIDCallback ({self.name}) will generate {self.num_samples:,} images with "
            f"{self.solver.upper()}-{self.solver_steps} {evaluations} time(s): {eval_nfe:,} network evaluations, "
            f"{eval_nfe / train_nfe:,.0f}x the training's {train_nfe:,} ({steps:,} step{'s' * (steps != 1)} x batch {batch_size} x "
            f"{TRAIN_PASSES} for forward and backward{f' x {trainer.world_size} ranks' if trainer.world_size > 1 else ''})."
            f" On this {device} the evaluation will take far longer than the training. To shorten it: fewer "
            f"num_samples (now {self.num_samples:,}), fewer solver_steps (now {self.solver_steps}), or fewer evaluations "
            "(every_n_steps, on_validation, on_train_end: false). A stop signal (Ctrl+C) ends it after the current "
            "batch, with a checkpoint."
        )

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if self._cost_checked or trainer.fast_dev_run:
            return
        self._cost_checked = True
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        if isinstance(first, Tensor) and first.dim() > 0:
            warning = self.cost_warning(trainer, pl_module, int(first.shape[0]))
            if warning:
                rank_zero_warn(warning)

    @staticmethod
    def _log(trainer: "pl.Trainer", metrics: dict[str, float]) -> None:
        """Log at the true global step (not Lightning's log_every_n_steps cadence) and expose to other callbacks."""
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def _due(self, trainer: "pl.Trainer") -> bool:
        """Not yet evaluated at this step; never under ``fast_dev_run`` (a one-batch check, not a measurement)."""
        return not trainer.fast_dev_run and trainer.global_step != self._last_eval_step

    def due_by_step(self, trainer: "pl.Trainer") -> bool:
        """``trainer.global_step`` is one of the ``every_n_steps`` evaluation steps and has no evaluation yet."""
        step = trainer.global_step
        return bool(self.every_n_steps) and step > 0 and step % self.every_n_steps == 0 and self._due(trainer)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Resumed from a checkpoint saved while this step's evaluation was stopped (a stop signal ends it after
        # the current batch): make it now, before training moves the weights on.
        if self.due_by_step(trainer):
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.due_by_step(trainer):
            self.evaluate(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.eval_on_validation and not trainer.sanity_checking and self._due(trainer):
            ema_in = ema_swapped_in_during_validation(trainer, self)
            try:
                self.evaluate(trainer, pl_module, ema_in=ema_in)
            except SIGTERMException as stop:
                # The evaluation put back what it found; an EMA callback listed before this one has already swapped
                # its average out, so CheckpointOnSignal must not swap it in again before saving.
                stop.averaged_weights_in = ema_in
                raise

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.eval_on_train_end and self._due(trainer):
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------ checkpointing

    @property
    def state_key(self) -> str:
        """Distinct per configuration, so several FID callbacks can share a checkpoint."""
        extractor = self.feature_extractor if isinstance(self.feature_extractor, str) else type(self.feature_extractor).__name__
        return self._generate_state_key(
            name=self.name, num_samples=self.num_samples, solver=self.solver,
            solver_steps=self.solver_steps, feature_extractor=extractor,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "kid_history": list(self.kid_history),
            "last_eval_step": self._last_eval_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
        self.kid_history = [tuple(x) for x in state_dict.get("kid_history", [])]  # type: ignore[misc]
        self._last_eval_step = int(state_dict.get("last_eval_step", -1))

    def best(self) -> tuple[int, float] | None:
        """(step, fid) of the lowest FID recorded so far, or None."""
        finite = [(s, v) for s, v in self.history if math.isfinite(v)]
        return min(finite, key=lambda sv: sv[1]) if finite else None
