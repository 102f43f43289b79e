"""DiffusionModule: a backbone, a noise schedule and two pluggable time-step seams.

The training step is the only place that combines them::

    t = self.timestep_sampler.sample(n)                 # where time steps come from
    per_sample = mse(backbone(x_t, t, y), target)       # (B,)
    loss, w = weighted_loss(sampler, weighting, t, per_sample)

Callbacks (``lightning_speed.callbacks``) swap ``timestep_sampler`` and ``loss_weighting``;
they never copy the training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_speed.process import PREDICTIONS, SAMPLERS, GaussianDiffusion
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.timesteps.base import (
    ConstantWeighting,
    LossWeighting,
    TimestepSampler,
    UniformSampler,
    weighted_loss,
)


def uses_cuda_graphs(compile_mode: str | None) -> bool:
    """Whether a ``torch.compile`` mode records CUDA graphs (then each step must be marked)."""
    return compile_mode in ("reduce-overhead", "max-autotune")


class DiffusionModule(pl.LightningModule):
    """Trains ``backbone(x, t, y=None)`` as a DDPM denoiser.

    Args:
        backbone: any ``nn.Module`` called as ``backbone(x, t, y=None)``.
        schedule: ``linear``, ``quadratic``, ``cosine``, ``constant`` or a list of betas.
        num_timesteps: T, the number of discrete diffusion steps.
        prediction: what the network predicts: ``epsilon``, ``v`` or ``x0``.
        image_shape: (C, H, W) of the data; the CLI links it from the data module.
        optimizer: optimizer factory; default AdamW(lr=1e-4, weight_decay=0), fused on CUDA.
        lr_scheduler: optional LR scheduler factory, stepped every optimizer step.
        num_classes: number of classes for class-conditional training (None: unconditional).
        label_dropout: probability of replacing a label by the null label (classifier-free guidance).
        guidance_scale: default guidance scale in ``sample`` (1 = no guidance).
        sampling_steps: default number of sampling steps in ``sample``.
        compile: compile the backbone's training forward with ``torch.compile``.
        compile_mode: ``torch.compile`` mode (e.g. ``max-autotune-no-cudagraphs``).
        compile_sampling: also compile the backbone for ``sample`` (default mode, one graph per batch
            shape, compiled on first use): fuses the normalisation/activation kernels of evaluation.
        channels_last: keep the backbone's 4-D weights, and so its activations, in NHWC memory format.
            cuDNN's bf16 convolutions run natively in NHWC; in NCHW each one is wrapped in layout
            conversions (18 % of the default UNet's GPU time on an H100, BENCHMARKS.md section 1).
    """

    def __init__(
        self,
        backbone: nn.Module,
        schedule: str | list[float] = "linear",
        num_timesteps: int = 1000,
        prediction: str = "epsilon",
        image_shape: tuple[int, int, int] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_classes: int | None = None,
        label_dropout: float = 0.1,
        guidance_scale: float = 1.0,
        sampling_steps: int = 50,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_sampling: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module called as backbone(x, t, y=None), got {type(backbone).__name__}.")
        if prediction not in PREDICTIONS:
            raise ValueError(f"Unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}.")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}.")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be positive or null, got {num_classes}.")
        self.backbone = backbone
        self.channels_last = channels_last
        if channels_last:  # before any copy (EMA, DDP): .to(device), deepcopy and load_state_dict keep the layout
            self.backbone.to(memory_format=torch.channels_last)
        self.noise_schedule = NoiseSchedule.create(schedule, num_timesteps)
        self.diffusion = GaussianDiffusion(self.noise_schedule, prediction)
        self.prediction = prediction
        self.image_shape = self._check_shape(image_shape) if image_shape is not None else None
        self.num_classes = num_classes
        self.label_dropout = label_dropout
        self.guidance_scale = guidance_scale
        self.sampling_steps = sampling_steps
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.compile = compile
        self.compile_mode = compile_mode
        self.compile_sampling = compile_sampling
        self._sample_forward: Any = None  # torch.compile(backbone), created on the first sample()
        # The two seams. Plain objects, not submodules: see timesteps/base.py.
        self.timestep_sampler: TimestepSampler = UniformSampler(self.noise_schedule.num_timesteps)
        self.loss_weighting: LossWeighting = ConstantWeighting()
        # Not a submodule (object.__setattr__): state_dict keys must not depend on whether compile ran.
        object.__setattr__(self, "_train_forward", self.backbone)
        self._cuda_graphs = False

    @property
    def num_timesteps(self) -> int:
        return self.noise_schedule.num_timesteps

    @staticmethod
    def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (channels, height, width), got {shape}.")
        return shape  # type: ignore[return-value]

    # -- setup: catch misconfiguration before any step ---------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_shape = getattr(datamodule, "image_shape", None)
        if data_shape is not None:
            data_shape = self._check_shape(data_shape)
            if self.image_shape is None:
                self.image_shape = data_shape
            elif self.image_shape != data_shape:
                raise ValueError(
                    f"The data yields images of shape {data_shape} but the model was configured for "
                    f"{self.image_shape}: set model.image_shape to {list(data_shape)} (the CLI links it "
                    "from the data module automatically)."
                )
        data_classes = getattr(datamodule, "num_classes", None)
        if self.num_classes is not None and data_classes is not None and self.num_classes != data_classes:
            raise ValueError(
                f"model.num_classes is {self.num_classes} but the data has {data_classes} classes: "
                "set them equal (or num_classes: null for unconditional training)."
            )
        if self.image_shape is not None:
            self._check_backbone_accepts(self.image_shape)
        if self.compile and stage == "fit":
            object.__setattr__(self, "_train_forward", torch.compile(self.backbone, mode=self.compile_mode))
            self._cuda_graphs = uses_cuda_graphs(self.compile_mode)

    def _check_backbone_accepts(self, shape: tuple[int, int, int]) -> None:
        """One tiny forward on the CPU-side copy of the shapes, so a mismatch fails at setup."""
        device = next(self.backbone.parameters(), torch.empty(0)).device
        x = torch.zeros(2, *shape, device=device)
        t = torch.zeros(2, dtype=torch.long, device=device)
        y = torch.zeros(2, dtype=torch.long, device=device) if self.num_classes is not None else None
        try:
            with torch.no_grad():
                out = self.backbone(x, t, y)
        except Exception as err:  # surface as configuration error, with the original cause kept
            raise ValueError(
                f"The backbone {type(self.backbone).__name__} cannot process images of shape {shape}: {str(err).rstrip('.')}. "
                "Make the backbone's in_channels / image_size match the data (see `lightning-speed fit --print_config`)."
            ) from err
        if tuple(out.shape) != tuple(x.shape):
            raise ValueError(
                f"The backbone must return a tensor shaped like its input {tuple(x.shape)}, got {tuple(out.shape)}: "
                "set its out_channels to the data's channels."
            )

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        # Checkpoints of versions <= 0.1 also stored the backbone under "_train_forward." (and
        # "_train_forward._orig_mod." once compiled): the same tensors, so those keys are dropped.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("_train_forward.")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_fit_start(self) -> None:
        # Strategies are plain objects: move their tables next to the model.
        self.timestep_sampler.to(self.device)
        self.loss_weighting.to(self.device)

    # -- training ---------------------------------------------------------------------------
    def _split_batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, (tuple, list)):
            x = batch[0]
            y = batch[1] if len(batch) > 1 else None
        elif isinstance(batch, dict):
            x, y = batch["images"], batch.get("labels")
        else:
            x, y = batch, None
        if self.num_classes is None:
            y = None
        return x, y

    def _drop_labels(self, y: Tensor) -> Tensor:
        if self.label_dropout <= 0:
            return y
        drop = torch.rand(y.shape, device=y.device) < self.label_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: earlier graph outputs may be reused
        x0, y = self._split_batch(batch)
        if y is not None:
            y = self._drop_labels(y)
        t = self.timestep_sampler.sample(x0.shape[0])
        noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        out = self._train_forward(x_t, t, y)
        target = self.diffusion.target(x0, noise, t)
        per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        loss, weights = weighted_loss(self.timestep_sampler, self.loss_weighting, t, per_sample)
        self.log("train/loss", loss)
        return {"loss": loss, "t": t, "per_sample_loss": per_sample.detach(), "weight": weights.detach()}

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Unweighted loss at uniformly drawn t, with a fixed seed per batch so evaluations compare."""
        x0, y = self._split_batch(batch)
        gen = torch.Generator(device=x0.device).manual_seed(batch_idx)
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device, generator=gen)
        noise = torch.randn(x0.shape, device=x0.device, generator=gen, dtype=x0.dtype)
        out = self.backbone(self.diffusion.q_sample(x0, t, noise), t, y)
        loss = (out.float() - self.diffusion.target(x0, noise, t).float()).pow(2).mean()
        self.log("val/loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            fused = self.device.type == "cuda"
            optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=fused)
        else:
            optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- sampling ---------------------------------------------------------------------------
    def denoiser(self, labels: Tensor | None = None, guidance_scale: float = 1.0):
        """The network as a function ``(x_t, t) -> prediction``, with classifier-free guidance."""
        backbone = self._sampling_backbone()
        if labels is None or guidance_scale == 1.0:
            return lambda x, t: backbone(x, t, labels)
        null = torch.full_like(labels, self.num_classes)

        def guided(x: Tensor, t: Tensor) -> Tensor:
            out = backbone(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
            cond, uncond = out.chunk(2)
            return uncond + guidance_scale * (cond - uncond)

        return guided

    def _sampling_backbone(self) -> Any:
        if not self.compile_sampling:
            return self.backbone
        if self._sample_forward is None:
            # Not registered as a submodule (object.__setattr__): it shares the backbone's weights,
            # and must stay out of state_dict and parameters().
            object.__setattr__(self, "_sample_forward", torch.compile(self.backbone, dynamic=False))
        return self._sample_forward

    def _sampling_autocast(self) -> Any:
        """Sample in bf16 when the Trainer trains in bf16 (the network runs in bf16, the update in fp32)."""
        enabled = "bf16" in str(getattr(self._trainer, "precision", ""))
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        *,
        steps: int | None = None,
        sampler: str = "ddim",
        eta: float | None = None,
        labels: Tensor | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """Generate ``num_samples`` images in [-1, 1], shape (N, C, H, W), on the module's device.

        ``sampler="ddim"`` (eta 0 unless given) or ``"ddpm"`` (ancestral, eta 1). Pass a seeded
        ``generator`` or explicit ``noise`` for reproducible samples.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        if self.image_shape is None:
            raise ValueError("The module does not know its image shape yet: pass image_shape=(C, H, W) to DiffusionModule.")
        steps = steps or self.sampling_steps
        eta = (0.0 if sampler == "ddim" else 1.0) if eta is None else eta
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        if self.num_classes is not None and labels is None:
            labels = torch.randint(0, self.num_classes, (num_samples,), device=self.device, generator=generator)
        if labels is not None:
            labels = labels.to(self.device)
            if self.num_classes is None:
                raise ValueError("labels were given but the model is unconditional (num_classes is null).")
        if noise is None:
            noise = torch.randn((num_samples, *self.image_shape), device=self.device, generator=generator)
        was_training = self.training
        self.eval()
        try:
            chunks = []
            size = batch_size or num_samples
            for start in range(0, num_samples, size):
                part = slice(start, start + size)
                fn = self.denoiser(labels[part] if labels is not None else None, guidance_scale)
                with self._sampling_autocast():
                    x = self.diffusion.sample(fn, noise[part].to(self.device), steps=steps, eta=eta, generator=generator)
                chunks.append(x.float())
            return torch.cat(chunks)
        finally:
            self.train(was_training)
