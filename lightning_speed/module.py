"""DiffusionModule: a backbone, a diffusion process (DDPM or rectified flow) and the time-step strategy seam.

The training step is the only place that combines them::

    t = self.timesteps.sample(n, device)                       # where time steps (or flow times) come from
    losses = self.diffusion.training_losses(network, x0, t)    # per-sample mse (and vlb), (B,)
    loss = self.timesteps.loss(t, losses.mse, losses.vlb)      # how each t's loss counts

Callbacks (``lightning_speed.callbacks``) replace ``self.timesteps.sampler`` and ``.weights``;
they never copy the training step. Image generation is in ``lightning_speed.solvers``; the checks of
the module's inputs (backbone, data, batches, ``sample``'s arguments) in ``lightning_speed.module_checks``.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_speed import flow
from lightning_speed.checkpoints import check_state_matches
from lightning_speed.distributed import rank_seed
from lightning_speed.module_checks import (
    FLOW_TIME_SCALE, AnySolver, Process, check_backbone, check_backbone_accepts, check_batch_values,
    check_checkpoint_process, check_data_module, check_guidance, check_image_shape, check_process, check_process_solver,
    build_lr_scheduler, check_steps, sample_inputs, split_batch,
)
from lightning_speed.process import DiffusionLosses, GaussianDiffusion
from lightning_speed.schedules import NoiseSchedule, Prediction
from lightning_speed.solvers import guided, sample_loop
from lightning_speed.timesteps import TimestepStrategy
from lightning_speed.validation import check_bool, check_choice, check_int, check_number

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def uses_cuda_graphs(compile_mode: str | None) -> bool:
    """Whether a ``torch.compile`` mode records CUDA graphs (then each step must be marked)."""
    return compile_mode in ("reduce-overhead", "max-autotune")


class DiffusionModule(pl.LightningModule):
    """Trains ``backbone(x, t, y=None)`` as a DDPM denoiser or a rectified flow's velocity field.

    Args:
        backbone: any ``nn.Module`` called as ``backbone(x, t, y=None)``; it outputs the data's C
            channels, or 2C with ``learn_sigma``.
        process: ``ddpm`` (discrete steps t, the arguments below) or ``flow``: rectified flow, x_t = (1 - t) x0 + t eps
            for t in [0, 1], trained on the velocity eps - x0 (``lightning_speed.flow``), t reaching the backbone as
            t * 1000; ``schedule``, ``num_timesteps``, ``prediction`` and ``learn_sigma`` keep their defaults then.
        shift: a flow's time shift (SD3): t' = shift t / (1 + (shift - 1) t) on its training times and solver grid.
        schedule: ``linear``, ``quadratic``, ``cosine``, ``constant`` or a list of betas.
        num_timesteps: T, the number of discrete diffusion steps (the length of a list of betas).
        prediction: a DDPM's ``epsilon`` (None), ``v`` or ``x0`` (zero terminal SNR needs ``v`` or ``x0``: epsilon says
            nothing of x0 where alpha_bar = 0); a flow predicts the velocity, recorded as None (``epsilon`` too).
        learn_sigma: learn the reverse variance too (improved DDPM): hybrid loss, learned-variance sampling.
        lambda_vlb: weight of the variational bound in the hybrid loss (improved DDPM's 0.001).
        weight_vlb: let the time-step weights multiply the VLB term too; by default they multiply
            only the MSE term, as in the official SpeeD code.
        image_shape: (C, H, W) of the data; the CLI links it from the data module.
        optimizer: optimizer factory; default AdamW(lr=1e-4, weight_decay=0), fused on CUDA.
        lr_scheduler: optional LR scheduler factory, stepped every optimizer step.
        num_classes: number of classes for class-conditional training (None: unconditional); a backbone that
            states its ``num_classes`` (UNet, DiT) must have the same, and batch labels must lie in [0, num_classes).
        label_dropout: probability of replacing a label by the null label (classifier-free guidance).
        guidance_scale: default guidance scale in ``sample`` (1 = no guidance; other values need ``num_classes``
            and a ``label_dropout`` above 0, which trains the null label).
        solver_steps: default number of solver steps in ``sample`` (the DDPM's respaced steps, or the flow's ODE steps).
        compile_mode: compile the training forward with ``torch.compile`` in this mode (None: eager).
            CUDA-graph modes (``reduce-overhead``, ``max-autotune``) have each step marked.
        compile_sampling: also compile the backbone for ``sample``: ``True`` in the ``default`` mode, or a
            compile mode (one graph per batch shape, compiled on first use); sampling is eager otherwise.
        channels_last: keep the backbone's 4-D weights, and so its activations, in NHWC memory format
            (cuDNN's bf16 convolutions run natively in NHWC; BENCHMARKS.md, training throughput of the UNet).
        check_data_range: read the first training and validation batches once and refuse images far outside
            [-1, 1] (warn on [0, 1]-looking data); false for data of another range on purpose. Latent data (an
            autoencoder, here or the data module's) is exempt from the range, not from the NaN check.
        clip_denoised: clamp each solver step's predicted x0 to [-1, 1] in ``sample``, so samples lie in [-1, 1].
            None: on for pixels, off for latents (an autoencoder, here or the data module's; a checkpoint keeps the
            choice), as improved DDPM clips pixels and DiT samples latents unclipped. ``sample`` takes it per call.
    """

    # sample() sets its own precision (bf16 autocast under a bf16 Trainer, noise and solver in float32): the
    # evaluation callbacks do not wrap it in the Trainer's precision context (metrics.sampling.precision_context)
    sets_sampling_precision = True

    def __init__(
        self,
        backbone: nn.Module,
        process: Process = "ddpm",
        shift: float = 1.0,
        schedule: str | list[float] = "linear",
        num_timesteps: int = 1000,
        prediction: Prediction | None = None,
        learn_sigma: bool = False,
        lambda_vlb: float = 0.001,
        weight_vlb: bool = False,
        image_shape: tuple[int, int, int] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_classes: int | None = None,
        label_dropout: float = 0.1,
        guidance_scale: float = 1.0,
        solver_steps: int = 50,
        compile_mode: CompileMode | None = None,
        compile_sampling: bool | CompileMode = False,
        channels_last: bool = False,
        check_data_range: bool = True,
        clip_denoised: bool | None = None,
    ) -> None:
        super().__init__()
        self.process, prediction = check_process(process, shift, prediction, schedule=schedule,
                                                 num_timesteps=num_timesteps, learn_sigma=learn_sigma)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.save_hyperparameters({"prediction": prediction})  # resolved (a CLI run's hparams are its config's values)
        self.check_data_range = check_bool(check_data_range, "check_data_range")
        self.clip_denoised = clip_denoised
        if self.process == "flow":
            self._schedule: NoiseSchedule | flow.FlowSchedule = flow.FlowSchedule(shift)
            self.diffusion = flow.RectifiedFlow()
        else:
            self._schedule = NoiseSchedule.create(schedule, num_timesteps)
            self.diffusion = GaussianDiffusion(self._schedule, prediction, learn_sigma, lambda_vlb)
        self.timesteps = TimestepStrategy(self._schedule, prediction)
        self.weight_vlb = check_bool(weight_vlb, "weight_vlb")
        self.image_shape = None if image_shape is None else check_image_shape(image_shape)
        self.num_classes = None if num_classes is None else check_int(num_classes, "num_classes", minimum=1)
        self.label_dropout = check_number(label_dropout, "label_dropout", at_least=0.0, below=1.0,
                                          hint="1 would never show a label")
        self.guidance_scale = check_guidance(guidance_scale, self.num_classes, "model.guidance_scale",
                                             self.label_dropout)
        self.backbone = check_backbone(backbone, self.num_timesteps, self.num_classes)
        self.solver_steps = check_steps(num_timesteps, self.num_timesteps, solver_steps)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        modes = get_args(CompileMode)
        self.compile_mode = None if compile_mode is None else check_choice(compile_mode, "compile_mode", modes)
        self.compile_sampling: bool | str = (
            check_choice(compile_sampling, "compile_sampling", modes) if isinstance(compile_sampling, str)
            else check_bool(compile_sampling, "compile_sampling", hint=f"or a compile mode: {', '.join(modes)}"))
        self.channels_last = check_bool(channels_last, "channels_last")
        if channels_last:  # before any copy (EMA, DDP): .to(device), deepcopy and load_state_dict keep the layout
            self.backbone.to(memory_format=torch.channels_last)
        # Compiled code is held as plain functions, not submodules: parameters and state_dict keys stay the backbone's.
        self._compiled_losses: Any = None  # set in configure_model when compile_mode is given
        self._sample_forward: Any = None  # (backbone, compiled forward), made on the first compiled sample()
        # Latent diffusion: decode()'s autoencoder, a plain object kept out of checkpoints, the EMA copy and DDP.
        # None: the data module's ``autoencoder`` (LatentDataModule), if any; set it to sample from a checkpoint.
        self.autoencoder: Any = None
        self._values_checked: set[str] = set()  # stages whose first batch's values were read (_check_values)

    @property
    def clip_denoised(self) -> bool:
        """Whether ``sample`` clamps x0 to [-1, 1]: as set, else from the data space (pixels yes, latents no)."""
        if self._clip_denoised is not None:
            return self._clip_denoised
        return self._autoencoder() is None

    @clip_denoised.setter
    def clip_denoised(self, value: bool | None) -> None:
        self._clip_denoised = None if value is None else check_bool(
            value, "clip_denoised", hint="null: from the data space (pixels clipped to [-1, 1], latents not)")

    @property
    def noise_schedule(self) -> NoiseSchedule | flow.FlowSchedule:
        return self._schedule

    @property
    def num_timesteps(self) -> int | None:
        """T of a DDPM; None for a flow, whose time is continuous."""
        return getattr(self.diffusion, "num_timesteps", None)

    def _attached_trainer(self) -> pl.Trainer | None:
        """The Trainer running this module, or None outside one (where ``self.trainer`` raises)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    # -- setup: catch misconfiguration before any step ---------------------------------------------
    def setup(self, stage: str) -> None:
        self._values_checked.clear()  # each run's first batches are read again (another run may bring other data)
        self.check_data(getattr(self._attached_trainer(), "datamodule", None))

    def check_data(self, datamodule: Any) -> None:
        """Refuse data of another shape or class count than the model's and its backbone's: at setup, and earlier
        where a data module asks before costly work (ours in prepare_data, before a download or an encoding)."""
        self.image_shape = check_data_module(datamodule, self.image_shape, self.num_classes)
        if self.image_shape is not None:
            if self.hparams.get("image_shape") is None:  # the data's shape: a checkpoint's module samples without it
                self.hparams["image_shape"] = self.image_shape
            check_backbone_accepts(self.backbone, self.diffusion, self.image_shape, self.num_classes)

    def on_fit_start(self) -> None:
        """Under DDP every rank starts from the same global seed (``seed_everything``, or torch's default), so each
        would draw the same training noise for its own images: rank r moves its global generators' seed by r (rank 0,
        and a run on one device, keep theirs)."""
        rank = self.trainer.global_rank
        if self.trainer.world_size > 1 and rank > 0:
            torch.manual_seed(rank_seed(torch.initial_seed(), rank))

    def configure_model(self) -> None:
        """Compile the training forward once (``torch.compile`` compiles lazily, on the first step).

        The compiled function is the backbone's forward together with the per-sample loss, so that
        the loss's elementwise work (the learned-sigma VLB above all) fuses into the same graph.
        """
        if self.compile_mode is not None and self._compiled_losses is None:
            self._compiled_losses = torch.compile(self._losses, mode=self.compile_mode)
            if self.device.type == "cpu":  # the GPU configs on a machine without one: minutes before the first step
                rank_zero_info(
                    f"DiffusionModule: compiling the training step on the CPU (compile_mode={self.compile_mode!r}): "
                    "the first step waits for it, minutes for the shipped GPU configs; compile_mode null "
                    "(--model.compile_mode null) trains without."
                )

    # -- checkpoints ------------------------------------------------------------------------
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``; ``backbone=`` is needed unless the CLI saved its config."""
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except TypeError as err:
            if "backbone" in kwargs or "'backbone'" not in str(err):
                raise
            raise TypeError(
                "The checkpoint holds the backbone's weights, not the backbone: build it as in training and pass it, "
                "DiffusionModule.load_from_checkpoint(path, backbone=UNet(...)) (a CLI run's config.yaml lists "
                "its arguments under model.backbone).") from err

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The process, T and the clipping of the data space beside the hyperparameters (load_from_checkpoint's keyword
        # arguments overwrite those): a latent model loaded without its autoencoder still samples unclipped
        checkpoint.update(process=self.process, num_timesteps=self.num_timesteps, clip_denoised=self.clip_denoised)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before the weights load: the checkpoint must fit this process, backbone and T (short errors, no tensor list)."""
        check_checkpoint_process(checkpoint, self.process, self.num_timesteps)
        self._clip_denoised = checkpoint.get("clip_denoised") if self._clip_denoised is None else self._clip_denoised
        if "state_dict" in checkpoint:  # sharded strategies (FSDP) load the weights themselves and drop it
            # a Trainer loads the weights strictly unless strict_loading is off; load_from_checkpoint(strict=False)
            # may accept missing tensors, so outside a Trainer only other shapes are refused
            check_state_matches(self, checkpoint["state_dict"], strict=self._trainer is not None and self.strict_loading)
            self._resume_without_average(checkpoint)
        self._check_resumed_cycle(checkpoint)

    def _check_resumed_cycle(self, checkpoint: dict[str, Any]) -> None:
        """Resuming restores a OneCycleLR's saved length over the configured one; torch's OneCycleLR fails when stepped
        past it. A run longer than the saved cycle is refused here, not hours later at the cycle's end."""
        trainer = self._trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return
        run = trainer.estimated_stepping_batches
        for state in checkpoint.get("lr_schedulers") or []:
            total = state.get("total_steps") if "_schedule_phases" in state else None  # a OneCycleLR's state
            if total is not None and math.isfinite(run) and total < run:
                raise ValueError(
                    f"The checkpoint's OneCycleLR anneals over total_steps={total}, but this run trains "
                    f"{int(run)} optimizer steps: torch would fail at step {total + 1}, when the cycle has ended. "
                    f"Resume with trainer.max_steps={total}, or train the longer schedule as a new run (a cycle "
                    "cannot be stretched once it has begun)."
                )

    def _resume_without_average(self, checkpoint: dict[str, Any]) -> None:
        """A run with weight averaging saves the average as ``state_dict`` and the training weights beside it; its
        averaging callback puts them back on resume. A fit resumed without one would train on from the average:
        it continues from the training weights instead, and says the average is left behind."""
        trainer = self._trainer
        if (trainer is None or trainer.state.fn != TrainerFn.FITTING or "current_model_state" not in checkpoint
                or any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks)):
            return
        checkpoint["state_dict"] = checkpoint["current_model_state"]
        rank_zero_warn(
            "The checkpoint was saved with an EMA (its state_dict is the average) but this run has no averaging "
            "callback: training resumes from the training weights, and the average is not kept. Resume with the "
            "EMA callback (the run's `ema:` settings) to keep averaging."
        )

    # -- training ---------------------------------------------------------------------------
    def _check_values(self, x: Tensor, y: Tensor | None, stage: str) -> None:
        """The batch's values: on the stage's first batch (one device sync), labels on the CPU on every batch."""
        first = stage not in self._values_checked
        pixels = first and self.check_data_range and self._autoencoder() is None  # latents: the autoencoder's range
        check_batch_values(x, y, stage, first=first, num_classes=self.num_classes, pixels=pixels)
        self._values_checked.add(stage)  # after the checks: a batch that failed them is read again if retried

    def _drop_labels(self, y: Tensor) -> Tensor:
        if self.label_dropout <= 0:
            return y
        # float32, not the default dtype: bf16 under bf16-true, whose coarse draws drop 0.102 of the labels for 0.1
        drop = torch.rand(y.shape, device=y.device, dtype=torch.float32) < self.label_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def _backbone_time(self, t: Tensor) -> Tensor:
        """A DDPM's step, or a flow's t * 1000 (the DDPM backbones' range) in at least float32: bf16 would round it
        to 4 apart in [512, 1024), another time than the one x_t was noised at."""
        if self.process != "flow":
            return t
        return flow.at_least_float32(t) * FLOW_TIME_SCALE

    def _losses(self, x0: Tensor, t: Tensor, noise: Tensor, y: Tensor | None) -> DiffusionLosses:
        """The process's per-sample losses of the backbone (what configure_model compiles)."""
        if self.channels_last:
            network = lambda x, tt: self.backbone(  # noqa: E731
                x.contiguous(memory_format=torch.channels_last), self._backbone_time(tt), y)
        else:
            network = lambda x, tt: self.backbone(x, self._backbone_time(tt), y)  # noqa: E731
        return self.diffusion.training_losses(network, x0, t, noise)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        losses = self._compiled_losses or self._losses
        if self._compiled_losses is not None and uses_cuda_graphs(self.compile_mode):
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: earlier graph outputs may be reused
        x0, y = split_batch(batch, self.image_shape, self.num_classes)
        self._check_values(x0, y, "training")
        if y is not None:
            y = self._drop_labels(y)
        t = self.timesteps.sample(x0.shape[0], x0.device)
        weighted, unweighted = losses(x0, t, torch.randn_like(x0), y)
        if unweighted is not None and self.weight_vlb:
            weighted, unweighted = weighted + unweighted, None
        loss = self.timesteps.loss(t, weighted, unweighted)
        if self._logger_writes_this_step():
            self.log("train/loss", loss)
        return loss

    def _logger_writes_this_step(self) -> bool:
        """Whether the Trainer writes step metrics after this training step: after every ``log_every_n_steps``-th
        optimizer step, and when the fit is told to stop (Lightning's rule; never with ``log_every_n_steps=0``).

        ``self.log`` costs about 1 ms of host time per call (Lightning walks its result collection), as much as
        the GPU time of a small compiled step, and a step value is only written on these steps, so the other
        steps skip it: the logs are the same. ``trainer.callback_metrics["train/loss"]`` then holds the loss of the
        last written step. Outside a Trainer every step logs.
        """
        every = getattr(self._attached_trainer(), "log_every_n_steps", None)
        if every is None:  # no Trainer (or Fabric's stand-in)
            return True
        return every > 0 and ((self.trainer.global_step + 1) % every == 0 or self.trainer.should_stop)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Unweighted loss at uniformly drawn t (a flow's unshifted, so runs of any shift compare), with a fixed seed
        per batch so evaluations compare; under DDP each rank's batch gets its own seed (rank 0 keeps the batch's)."""
        return self._evaluation_loss(batch, batch_idx, "validation", "val/loss")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The validation loss on the data module's test loader (``lightning-speed test``), logged as test/loss."""
        return self._evaluation_loss(batch, batch_idx, "test", "test/loss")

    def _evaluation_loss(self, batch: Any, batch_idx: int, stage: str, key: str) -> Tensor:
        x0, y = split_batch(batch, self.image_shape, self.num_classes)
        self._check_values(x0, y, stage)
        seed = rank_seed(batch_idx, self.global_rank)
        n, gen = x0.shape[0], torch.Generator(device=x0.device).manual_seed(seed)
        t = (torch.rand(n, device=x0.device, generator=gen, dtype=torch.float32) if self.process == "flow"
             else torch.randint(0, self.num_timesteps, (n,), device=x0.device, generator=gen))
        noise = torch.randn(x0.shape, device=x0.device, generator=gen, dtype=x0.dtype)
        losses = self._losses(x0, t, noise, y)
        loss = losses.mse.mean() if losses.vlb is None else (losses.mse + losses.vlb).mean()
        self.log(key, loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:  # fused on CUDA
            optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=self.device.type == "cuda")
        else:
            optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = build_lr_scheduler(self.lr_scheduler_factory, optimizer, self._attached_trainer())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- generation -------------------------------------------------------------------------
    def _sampling_forward(self) -> Any:
        if not self.compile_sampling:
            return self.backbone
        # The compiled function calls the backbone it was made from: a deep copy of this module shares the function,
        # and a backbone may be replaced, so it is remade whenever its (weakly held) backbone is not this one.
        if self._sample_forward is None or self._sample_forward[0]() is not self.backbone:
            mode = "default" if self.compile_sampling is True else self.compile_sampling
            compiled = torch.compile(self.backbone.forward, dynamic=False, mode=mode)
            self._sample_forward = (weakref.ref(self.backbone), compiled)
        return self._sample_forward[1]

    def _sampling_autocast(self) -> Any:
        """Sample in bf16 when the Trainer trains in bf16 (the network runs in bf16, the update in fp32)."""
        enabled = "bf16" in str(getattr(self._attached_trainer(), "precision", ""))
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _autoencoder(self) -> Any:
        if self.autoencoder is not None:
            return self.autoencoder
        return getattr(getattr(self._attached_trainer(), "datamodule", None), "autoencoder", None)

    @property
    def output_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of ``decode(sample(...))``: the image shape, or with an autoencoder the decoded one."""
        autoencoder = self._autoencoder()
        if self.image_shape is None or autoencoder is None:
            return self.image_shape
        return tuple(autoencoder.image_shape(self.image_shape))

    @torch.no_grad()
    def decode(self, samples: Tensor, batch_size: int = 64) -> Tensor:
        """Samples -> images in [-1, 1]: latents through the autoencoder (in chunks), pixels as they are.

        FIDCallback and SampleGridCallback call it on what ``sample`` returns.
        """
        autoencoder = self._autoencoder()
        if autoencoder is None:
            return samples
        with self._sampling_autocast():
            return autoencoder.to(self.device).decode(samples, batch_size=batch_size)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        *,
        solver: AnySolver | None = None,
        solver_steps: int | None = None,
        eta: float | None = None,
        labels: Tensor | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        batch_size: int | None = None,
        clip_denoised: bool | None = None,
    ) -> Tensor:
        """Generate ``num_samples`` images, shape (N, C, H, W), on the module's device (latents for latent
        diffusion: ``decode`` turns them into images).

        A DDPM's ``solver``: ``"ddim"`` (the default; eta 0 unless given), ``"ddpm"`` (ancestral; with ``learn_sigma``
        the learned variance) or ``"dpmpp_2m"`` (DPM-Solver++(2M): deterministic, second order, for 10 to 50 steps), on
        ``solver_steps`` respaced steps (default: the module's ``solver_steps``). A flow's: ``"euler"`` (the default)
        or ``"heun"`` (second order, two network calls a step but the last) from t = 1 to 0 on ``solver_steps``
        equal steps, shifted by the module's ``shift``.
        Pass a seeded ``generator`` or explicit ``noise`` for reproducible samples.
        ``labels``: one per sample in [0, num_classes); ``num_classes`` (the null label) samples unconditionally.
        ``clip_denoised``: clamp each step's predicted x0 to [-1, 1], and so the samples (a flow: the samples; None:
        the module's ``clip_denoised``, which unless set is on for pixels and off for latents).
        """
        if self.image_shape is None:
            raise ValueError("The module does not know its image shape yet: pass image_shape=(C, H, W) to DiffusionModule.")
        num_samples = check_int(num_samples, "num_samples", minimum=1)
        size = num_samples if batch_size is None else check_int(batch_size, "batch_size", minimum=1)
        steps = self.solver_steps if solver_steps is None else solver_steps
        solver = check_process_solver(solver, self.process, eta=eta)
        clip = self.clip_denoised if clip_denoised is None else check_bool(clip_denoised, "clip_denoised")
        scale = self.guidance_scale if guidance_scale is None else check_guidance(
            guidance_scale, self.num_classes, label_dropout=self.label_dropout)
        labels, noise = sample_inputs(num_samples, labels, noise, self.image_shape, self.num_classes, self.device,
                                      generator)
        forward = self._sampling_forward()
        network = lambda x, t, y: forward(x, self._backbone_time(t), y)  # noqa: E731
        was_training = self.training
        self.eval()
        try:
            chunks = []
            for start in range(0, num_samples, size):
                part = slice(start, start + size)
                model = guided(network, None if labels is None else labels[part], self.num_classes, scale)
                x = noise[part].to(self.device)
                with self._sampling_autocast():
                    if self.process == "flow":  # the flow's solvers have no x0 to clip: the samples are clamped
                        x = flow.sample_loop(model, x, solver, steps, self.noise_schedule.shift)
                        x = x.clamp(-1, 1) if clip else x
                    else:
                        x = sample_loop(self.diffusion, model, x, solver, steps, eta, clip_denoised=clip, generator=generator)
                chunks.append(x.float())
            return torch.cat(chunks)
        finally:
            self.train(was_training)
