"""DiffusionModule: a backbone, a diffusion process and the time-step strategy seam.

The training step is the only place that combines them::

    t = self.timesteps.sample(n, device)                       # where time steps come from
    losses = self.diffusion.training_losses(network, x0, t)    # per-sample mse (and vlb), (B,)
    loss = self.timesteps.loss(t, losses.mse, losses.vlb)      # how each t's loss counts

Callbacks (``lightning_speed.callbacks``) replace ``self.timesteps.sampler`` and ``.weights``;
they never copy the training step. Image generation is in ``lightning_speed.solvers``.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_speed.checkpoints import check_state_matches
from lightning_speed.process import DiffusionLosses, GaussianDiffusion
from lightning_speed.schedules import NoiseSchedule, Prediction
from lightning_speed.solvers import Solver, guided, sample_loop
from lightning_speed.timesteps import TimestepStrategy
from lightning_speed.validation import check_bool, check_choice, check_int, check_number, is_integer_tensor

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

RENAMED_ARGUMENTS = {
    "compile": "compile_mode (null: eager; e.g. reduce-overhead for CUDA graphs)",
    "sampling_steps": "solver_steps",
}
"""Constructor arguments of earlier versions and what replaced them (for clear errors, also in the CLI)."""


def uses_cuda_graphs(compile_mode: str | None) -> bool:
    """Whether a ``torch.compile`` mode records CUDA graphs (then each step must be marked)."""
    return compile_mode in ("reduce-overhead", "max-autotune")


def _refuses_renamed_arguments(names: dict[str, str], why: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A method that names its renamed keyword arguments' new names (``names``: old -> new) when called with them.
    Its signature stays the method's own (``functools.wraps``), so callers that bind arguments against it (the
    evaluation callbacks' ``sample_kwargs``) see exactly the arguments it takes."""

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def refusing(self: Any, *args: Any, **kwargs: Any) -> Any:
            for old, new in names.items():
                if old in kwargs:
                    raise TypeError(f"{method.__name__}({old}=...) is now {method.__name__}({new}=...): {why}.")
            return method(self, *args, **kwargs)

        return refusing

    return decorate


class DiffusionModule(pl.LightningModule):
    """Trains ``backbone(x, t, y=None)`` as a DDPM denoiser.

    Args:
        backbone: any ``nn.Module`` called as ``backbone(x, t, y=None)``; it outputs the data's C
            channels, or 2C with ``learn_sigma``.
        schedule: ``linear``, ``quadratic``, ``cosine``, ``constant`` or a list of betas.
        num_timesteps: T, the number of discrete diffusion steps (the length of a list of betas).
        prediction: what the network predicts: ``epsilon``, ``v`` or ``x0`` (a zero-terminal-SNR
            schedule needs ``v`` or ``x0``: epsilon carries no information about x0 where alpha_bar = 0).
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
        guidance_scale: default guidance scale in ``sample`` (1 = no guidance; other values need ``num_classes``).
        solver_steps: default number of solver steps in ``sample``.
        compile_mode: compile the training forward with ``torch.compile`` in this mode (None: eager).
            CUDA-graph modes (``reduce-overhead``, ``max-autotune``) have each step marked.
        compile_sampling: also compile the backbone for ``sample``: ``True`` in the ``default`` mode, or a
            compile mode (one graph per batch shape, compiled on first use); sampling is eager otherwise.
        channels_last: keep the backbone's 4-D weights, and so its activations, in NHWC memory format
            (cuDNN's bf16 convolutions run natively in NHWC; BENCHMARKS.md section 1).
        check_data_range: read the first training and validation batches once and refuse images far outside
            [-1, 1] (warn on [0, 1]-looking data); false for data of another range on purpose. Latent data (an
            autoencoder, here or the data module's) is exempt from the range, not from the NaN check.
        clip_denoised: clamp each solver step's predicted x0 to [-1, 1] in ``sample``, so samples lie in [-1, 1].
            None: from the data space: on for pixels, off for latents (an autoencoder, here or the data module's),
            which have no such bound (improved DDPM clips pixels, DiT samples latents unclipped). ``sample`` takes
            it per call too; the ``clip_denoised`` attribute is the resolved setting.
    """

    def __init__(
        self,
        backbone: nn.Module,
        schedule: str | list[float] = "linear",
        num_timesteps: int = 1000,
        prediction: Prediction = "epsilon",
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
        **renamed: Any,
    ) -> None:
        super().__init__()
        for old in renamed:
            new = RENAMED_ARGUMENTS.get(old)
            raise TypeError(
                f"DiffusionModule got an unexpected argument {old!r}" + (f": it is now {new}." if new else ".")
            )
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.check_data_range = check_bool(check_data_range, "check_data_range")
        self.clip_denoised = clip_denoised
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module called as backbone(x, t, y=None), got {type(backbone).__name__}.")
        self.backbone = backbone
        self.diffusion = GaussianDiffusion(NoiseSchedule.create(schedule, num_timesteps), prediction, learn_sigma, lambda_vlb)
        if self.num_timesteps != num_timesteps:  # betas or a NoiseSchedule fix T; hparams must record it
            raise ValueError(
                f"The schedule has {self.num_timesteps} steps but num_timesteps={num_timesteps}: set num_timesteps "
                f"to {self.num_timesteps} (a list of betas or a NoiseSchedule fixes T)."
            )
        self.timesteps = TimestepStrategy(self.noise_schedule, prediction)
        self._check_backbone_timesteps()
        self.weight_vlb = check_bool(weight_vlb, "weight_vlb")
        self.image_shape = None if image_shape is None else self._check_shape(image_shape)
        self.num_classes = None if num_classes is None else check_int(num_classes, "num_classes", minimum=1)
        self.label_dropout = check_number(label_dropout, "label_dropout", at_least=0.0, below=1.0,
                                          hint="1 would never show a label")
        self.guidance_scale = check_number(guidance_scale, "guidance_scale")
        if self.num_classes is None and self.guidance_scale != 1.0:  # guided() would ignore it without a word
            raise ValueError(
                f"model.guidance_scale={guidance_scale} needs a class-conditional model, but model.num_classes is "
                "null: classifier-free guidance mixes class-conditional and unconditional predictions. Set "
                "model.num_classes (and the backbone's num_classes) to the data's number of classes, or leave "
                "guidance_scale at 1."
            )
        self._check_backbone_classes()
        self.solver_steps = check_int(solver_steps, "solver_steps", minimum=2)
        if self.solver_steps > self.num_timesteps:  # sample() would refuse it at the first grid or FID
            raise ValueError(
                f"solver_steps must be at most num_timesteps = {self.num_timesteps} (solvers visit a subset of the "
                f"T steps), got {solver_steps}."
            )
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.compile_mode = None if compile_mode is None else check_choice(compile_mode, "compile_mode", get_args(CompileMode))
        self.compile_sampling: bool | str = (
            check_choice(compile_sampling, "compile_sampling", get_args(CompileMode)) if isinstance(compile_sampling, str)
            else check_bool(compile_sampling, "compile_sampling", hint=f"or a compile mode: {', '.join(get_args(CompileMode))}"))
        self.channels_last = check_bool(channels_last, "channels_last")
        if channels_last:  # before any copy (EMA, DDP): .to(device), deepcopy and load_state_dict keep the layout
            self.backbone.to(memory_format=torch.channels_last)
        # Compiled code is held as plain functions (torch.compile of bound methods), not submodules:
        # parameters and state_dict keys stay the backbone's whether or not they exist.
        self._compiled_losses: Any = None  # set in configure_model when compile_mode is given
        self._sample_forward: Any = None  # created on the first sample() with compile_sampling
        # Latent diffusion: what decode() turns samples into images with (lightning_speed.autoencoders.Autoencoder).
        # A plain object, not a submodule: it stays out of checkpoints, the EMA copy and DDP. None: the
        # data module's ``autoencoder`` (LatentDataModule), if any; set it to sample from a loaded checkpoint.
        self.autoencoder: Any = None
        self._values_checked: set[str] = set()  # stages whose first batch's values were read (_check_values)

    @property
    def clip_denoised(self) -> bool:
        """Whether ``sample`` clamps the predicted x0 to [-1, 1]: as set, or where unset (None) from the data
        space: pixels yes, latents (an autoencoder, here or the data module's) no."""
        if self._clip_denoised is not None:
            return self._clip_denoised
        return self._autoencoder() is None

    @clip_denoised.setter
    def clip_denoised(self, value: bool | None) -> None:
        self._clip_denoised = None if value is None else check_bool(
            value, "clip_denoised", hint="null: from the data space (pixels clipped to [-1, 1], latents not)")

    @property
    def noise_schedule(self) -> NoiseSchedule:
        return self.diffusion.schedule

    @property
    def num_timesteps(self) -> int:
        return self.diffusion.num_timesteps

    @staticmethod
    def _check_shape(shape: Any) -> tuple[int, int, int]:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (channels, height, width), got {shape}.")
        return shape  # type: ignore[return-value]

    def _check_backbone_timesteps(self) -> None:
        backbone_t = getattr(self.backbone, "num_timesteps", None)
        if isinstance(backbone_t, int) and backbone_t != self.num_timesteps:
            raise ValueError(
                f"The backbone {type(self.backbone).__name__} was built for num_timesteps={backbone_t} but the "
                f"model diffuses over {self.num_timesteps} steps: set the backbone's num_timesteps to "
                f"{self.num_timesteps} (or model.num_timesteps to {backbone_t})."
            )

    def _check_backbone_classes(self) -> None:
        """The backbone's ``num_classes`` (UNet's and DiT's label embedding), where it states one, must be the
        model's: labels 0 .. num_classes - 1 and the null label ``num_classes`` index that embedding."""
        if not hasattr(self.backbone, "num_classes"):
            return
        backbone_classes = self.backbone.num_classes
        if backbone_classes is not None and (isinstance(backbone_classes, bool)
                                             or not isinstance(backbone_classes, numbers.Integral)):
            return  # not a number of classes: nothing this module can compare
        if backbone_classes == self.num_classes:
            return
        name, n = type(self.backbone).__name__, self.num_classes
        if n is None:
            raise ValueError(
                f"The backbone {name} was built with num_classes={backbone_classes} but the model is unconditional "
                "(model.num_classes is null), so the backbone would only ever see the null label: set "
                f"model.num_classes to {backbone_classes} for class-conditional training, or remove the backbone's "
                "num_classes (model.backbone.init_args.num_classes) for an unconditional model."
            )
        if backbone_classes is None:
            raise ValueError(
                f"model.num_classes={n} trains class-conditionally but the backbone {name} was built without "
                f"num_classes (it has no label embedding): set model.backbone.init_args.num_classes to {n}, or "
                "model.num_classes to null for an unconditional model."
            )
        raise ValueError(
            f"model.num_classes={n} but the backbone {name} was built with num_classes={backbone_classes}: labels "
            f"0 .. {n - 1} and the null label {n} index the backbone's label embedding, so the two must agree. Set "
            f"model.backbone.init_args.num_classes to {n} (or model.num_classes to {backbone_classes})."
        )

    # -- setup: catch misconfiguration before any step ---------------------------------------------
    def setup(self, stage: str) -> None:
        self._values_checked.clear()  # each run's first batches are read again (another run may bring other data)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_shape = getattr(datamodule, "image_shape", None)
        if data_shape is not None:
            data_shape = self._check_shape(data_shape)
            if self.image_shape not in (None, data_shape):
                raise ValueError(
                    f"The data yields images of shape {data_shape} but the model was configured for "
                    f"{self.image_shape}: set model.image_shape to {list(data_shape)} (the CLI links it)."
                )
            self.image_shape = data_shape
        data_classes = getattr(datamodule, "num_classes", None)
        if (self.num_classes is not None and isinstance(data_classes, numbers.Integral)
                and not isinstance(data_classes, bool) and data_classes > self.num_classes):
            # fewer classes in the data than in the model is fine (some labels unused); more would index past them
            raise ValueError(
                f"The data has {data_classes} classes (labels 0 .. {data_classes - 1}) but model.num_classes is "
                f"{self.num_classes}: set model.num_classes and the backbone's num_classes "
                f"(model.backbone.init_args.num_classes) to {data_classes}."
            )
        if self.image_shape is not None:
            self._check_backbone_accepts(self.image_shape)

    def _check_backbone_accepts(self, shape: tuple[int, int, int]) -> None:
        """One tiny forward at t = 0 and T-1, so a backbone that cannot take the data fails at setup."""
        device = next(self.backbone.parameters(), torch.empty(0)).device
        x = torch.zeros(2, *shape, device=device)
        t = torch.tensor([0, self.num_timesteps - 1], device=device)
        y = torch.zeros(2, dtype=torch.long, device=device) if self.num_classes is not None else None
        try:
            with torch.no_grad():
                out = self.backbone(x, t, y)
        except Exception as err:  # surface as configuration error, with the original cause kept
            raise ValueError(
                f"The backbone {type(self.backbone).__name__} cannot process images of shape {shape} at time "
                f"steps 0 .. {self.num_timesteps - 1}: {str(err).rstrip('.')}. Make the backbone's in_channels / "
                "image_size / num_timesteps match the data and the model (see `lightning-speed fit --print_config`)."
            ) from err
        self.diffusion.check_output(out, x)

    def configure_model(self) -> None:
        """Compile the training forward once (``torch.compile`` compiles lazily, on the first step).

        The compiled function is the backbone's forward together with the per-sample loss, so that
        the loss's elementwise work (the learned-sigma VLB above all) fuses into the same graph.
        """
        if self.compile_mode is not None and self._compiled_losses is None:
            self._compiled_losses = torch.compile(self._losses, mode=self.compile_mode)

    def __setattr__(self, name: str, value: Any) -> None:
        """``nn.Module.__setattr__``, except for the name of the running hook.

        Lightning sets ``_current_fx_name`` around every hook it calls, 44 times per training step, and
        ``nn.Module.__setattr__`` looks each value up among parameters, buffers and submodules first. A hook's
        name is never one of those, so it is stored directly: about 50 µs less host time per step on a CPU,
        which shows in the small compiled steps that are host-bound (BENCHMARKS.md, section 1).
        """
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

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
                "The checkpoint holds the backbone's weights, not the backbone: the module's hyperparameters leave "
                "it out. Build it as in training and pass it: DiffusionModule.load_from_checkpoint(path, "
                "backbone=UNet(...)) (a CLI run's config.yaml lists its arguments under model.backbone)."
            ) from err

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # T beside the hyperparameters, which load_from_checkpoint overwrites with its keyword arguments
        checkpoint["num_timesteps"] = self.num_timesteps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before the weights load: the checkpoint must fit this backbone and this T (short errors, no tensor list)."""
        trained_t = checkpoint.get("num_timesteps", (checkpoint.get("hyper_parameters") or {}).get("num_timesteps"))
        if trained_t not in (None, self.num_timesteps):
            raise ValueError(
                f"The checkpoint was trained with num_timesteps={trained_t} but this module diffuses over "
                f"{self.num_timesteps} steps, which gives its weights another meaning: load it with "
                f"num_timesteps={trained_t} (load_from_checkpoint uses the checkpoint's value unless given another)."
            )
        if "state_dict" in checkpoint:  # sharded strategies (FSDP) load the weights themselves and drop it
            check_state_matches(self, checkpoint["state_dict"])

    # -- training ---------------------------------------------------------------------------
    def _split_batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """(images, labels or None) of a batch; type and shape checks on the host (no device sync)."""
        if isinstance(batch, (tuple, list)):
            x = batch[0]
            y = batch[1] if len(batch) > 1 else None
        elif isinstance(batch, dict):
            if "images" not in batch:
                raise KeyError(
                    f"A dict batch needs the images under 'images' (and class labels, if any, under 'labels'); got "
                    f"keys {sorted(batch)}: rename the key in the dataset or collate_fn."
                )
            x, y = batch["images"], batch.get("labels")
        else:
            x, y = batch, None
        if not isinstance(x, Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(
                f"Batches must hold images as a floating-point tensor in [-1, 1], got {what}: convert them in the "
                "dataset, e.g. x.float() / 127.5 - 1 for uint8 images."
            )
        if self.image_shape is not None and tuple(x.shape[1:]) != self.image_shape:
            c, h, w = self.image_shape
            if x.ndim != 4:
                raise ValueError(
                    f"Batches must hold images shaped (B, C, H, W) = (B, {c}, {h}, {w}), got a {x.ndim}-D tensor of "
                    f"shape {tuple(x.shape)}: give each image its channel dimension in the dataset (e.g. "
                    "x.unsqueeze(0) for a grey (H, W) image)."
                )
            if tuple(x.shape[1:]) == (h, w, c):
                raise ValueError(
                    f"The batch holds images of shape {tuple(x.shape[1:])} after the batch dimension: channels last "
                    f"(B, H, W, C), but the model takes (B, C, H, W) = (B, {c}, {h}, {w}). Permute them in the dataset "
                    "or collate_fn: x.permute(2, 0, 1) per image, or x.permute(0, 3, 1, 2) per batch."
                )
            raise ValueError(
                f"The batch holds images of shape {tuple(x.shape[1:])} (after the batch dimension) but the model's "
                f"image_shape is {self.image_shape}: set model.image_shape to {list(x.shape[1:])} or resize the data "
                "(images are (C, H, W), channels first)."
            )
        if self.num_classes is not None and y is None:
            raise ValueError(
                f"The model is class-conditional (num_classes={self.num_classes}) but the batch holds no labels: "
                "give batches of (images, labels) or {'images': ..., 'labels': ...}, or set num_classes=None."
            )
        if self.num_classes is None:
            return x, None
        if not is_integer_tensor(y):  # a float label would index the embedding truncated, 0.7 as class 0
            what = y.dtype if isinstance(y, Tensor) else type(y).__name__
            raise TypeError(
                f"Class labels must be an integer tensor (0 .. model.num_classes - 1), got {what}: convert them in "
                "the dataset, e.g. torch.as_tensor(label, dtype=torch.long), or set model.num_classes to null for "
                "unconditional training."
            )
        if tuple(y.shape) != (x.shape[0],):
            raise ValueError(
                f"The batch holds labels of shape {tuple(y.shape)} for {x.shape[0]} images: give one integer label "
                f"per image, shaped ({x.shape[0]},) (e.g. y.view(-1) for labels of shape (B, 1))."
            )
        return x, y

    def _check_values(self, x: Tensor, y: Tensor | None, stage: str) -> None:
        """Value checks of a batch, read at most once per stage on an accelerator: the first batch's images
        (finite and, for pixel data, in about [-1, 1]) and labels (in [0, num_classes)) cost one device sync.
        Labels still on the CPU are checked in every batch, which costs no sync."""
        first = stage not in self._values_checked
        check_labels = y is not None and y.numel() > 0 and (first or y.device.type == "cpu")
        if not ((first and x.numel() > 0) or check_labels):
            return
        stats = []
        if first and x.numel() > 0:
            stats += [v.float() for v in x.detach().aminmax()]
        if check_labels:
            stats += [v.float() for v in y.detach().aminmax()]  # type: ignore[union-attr]
        values = torch.stack(stats).tolist()  # the one sync (none for CPU tensors)
        if check_labels:
            self._check_label_range(int(values[-2]), int(values[-1]), stage)
        if first and x.numel() > 0:
            self._check_image_range(values[0], values[1], stage)
        self._values_checked.add(stage)  # after the checks: a batch that failed them is read again if retried

    def _check_label_range(self, lowest: int, highest: int, stage: str) -> None:
        n = self.num_classes
        assert n is not None
        if lowest < 0:
            raise ValueError(
                f"A {stage} batch holds the class label {lowest}, but labels must lie in [0, {n - 1}] "
                f"(model.num_classes={n}): map the dataset's labels to 0 .. {n - 1}."
            )
        if highest >= n:
            null = " (the model's null label, the one classifier-free guidance trains without a class)" if highest == n else ""
            raise ValueError(
                f"A {stage} batch holds the class label {highest}{null}, but model.num_classes={n} takes labels "
                f"0 .. {n - 1}: set model.num_classes and the backbone's num_classes "
                f"(model.backbone.init_args.num_classes) to the number of classes in the data (at least {highest + 1})."
            )

    def _check_image_range(self, lowest: float, highest: float, stage: str) -> None:
        where = f"The first {stage} batch"
        if not (math.isfinite(lowest) and math.isfinite(highest)):
            raise ValueError(
                f"{where} holds NaN or infinite values (its range is [{lowest}, {highest}]): check the dataset and "
                "its transforms (e.g. a normalisation dividing by a zero standard deviation, or a corrupt file)."
            )
        if not self.check_data_range or self._autoencoder() is not None:
            return  # latents (latent diffusion) have the autoencoder's range, not the pixels' [-1, 1]
        # Pixel data belongs in [-1, 1]; augmentations (added noise, a resize's overshoot) may leave it a little, so
        # only values beyond +-2, twice the range, count. The thresholds tell three cases apart:
        # * error: values above 2 and none below -1.5. Only unscaled pixels are that one-sided: [0, 255] (a missing
        #   x / 127.5 - 1), or [-1, 254] (the division forgotten). Zero-mean data beyond +-2 (latents, Gaussian
        #   stand-ins) has its minimum far below -1.5 in any batch of more than a few dozen values.
        # * warning: values beyond +-2 on both sides. Mean/std-normalised images (ImageNet's statistics give about
        #   [-2.1, 2.6]) which the solvers' clamp to [-1, 1] cannot generate, but also latents of an autoencoder the
        #   module does not know about (benchmarks train on Gaussian stand-ins): too ambiguous to refuse.
        # * warning: nothing below 0 and something above 0 (an all-zero batch says nothing): [0, 1] data, as
        #   torchvision's ToTensor gives. A batch of [-1, 1] images without a pixel below mid-grey is rare.
        escape = ("Latents of an autoencoder are exempt: train them with LatentDataModule or set module.autoencoder; "
                  "for data of another range on purpose, set model.check_data_range: false "
                  "(--model.check_data_range false; DiffusionModule(check_data_range=False)), and "
                  "model.clip_denoised: false so that sampling does not clamp to [-1, 1].")
        if highest > 2.0 and lowest >= -1.5:
            raise ValueError(
                f"{where} holds images in [{lowest:g}, {highest:g}], but the model trains on images in [-1, 1] (its "
                "solvers clamp their predictions to it): scale them in the dataset, e.g. x / 127.5 - 1 for [0, 255] "
                f"pixels. {escape}"
            )
        if lowest < -2.0 or highest > 2.0:
            warnings.warn(
                f"{where} holds values in [{lowest:g}, {highest:g}], far outside the [-1, 1] the model's solvers clamp "
                "their predictions to. Images belong in [-1, 1]: for normalised images use Normalize(mean=0.5, "
                f"std=0.5) on [0, 1] values, not the data set's mean and std. {escape}",
                UserWarning, stacklevel=3,
            )
        elif lowest >= 0.0 and highest > 0.0:
            warnings.warn(
                f"{where} holds images in [{lowest:g}, {highest:g}], nothing below 0: this looks like [0, 1] data "
                "(e.g. torchvision's ToTensor), which the model would learn as mid-grey to white in its [-1, 1] range. "
                "Scale it in the dataset: x * 2 - 1, or transforms.Normalize(0.5, 0.5) after ToTensor.",
                UserWarning, stacklevel=3,
            )

    def _drop_labels(self, y: Tensor) -> Tensor:
        if self.label_dropout <= 0:
            return y
        drop = torch.rand(y.shape, device=y.device) < self.label_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def _losses(self, x0: Tensor, t: Tensor, noise: Tensor, y: Tensor | None) -> DiffusionLosses:
        """The process's per-sample losses of the backbone (what configure_model compiles)."""
        if self.channels_last:
            network = lambda x, tt: self.backbone(x.contiguous(memory_format=torch.channels_last), tt, y)  # noqa: E731
        else:
            network = lambda x, tt: self.backbone(x, tt, y)  # noqa: E731
        return self.diffusion.training_losses(network, x0, t, noise)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        losses = self._compiled_losses or self._losses
        if self._compiled_losses is not None and uses_cuda_graphs(self.compile_mode):
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: earlier graph outputs may be reused
        x0, y = self._split_batch(batch)
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
        """Whether the Trainer writes step metrics after this training step (every ``log_every_n_steps``).

        ``self.log`` costs about 1 ms of host time per call (Lightning walks its result collection), as much as
        the GPU time of a small compiled step, and a step value is only written on these steps, so the other
        steps skip it: the logs are the same. ``trainer.callback_metrics["train/loss"]`` then holds the loss of the
        last written step. Outside a Trainer's fit loop every step logs.
        """
        connector = getattr(self._trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Unweighted loss at uniformly drawn t, with a fixed seed per batch so evaluations compare."""
        x0, y = self._split_batch(batch)
        self._check_values(x0, y, "validation")
        gen = torch.Generator(device=x0.device).manual_seed(batch_idx)
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device, generator=gen)
        noise = torch.randn(x0.shape, device=x0.device, generator=gen, dtype=x0.dtype)
        losses = self._losses(x0, t, noise, y)
        loss = losses.mse.mean() if losses.vlb is None else (losses.mse + losses.vlb).mean()
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

    # -- generation -------------------------------------------------------------------------
    def _sampling_forward(self) -> Any:
        if not self.compile_sampling:
            return self.backbone
        if self._sample_forward is None:
            mode = "default" if self.compile_sampling is True else self.compile_sampling
            self._sample_forward = torch.compile(self.backbone.forward, dynamic=False, mode=mode)
        return self._sample_forward

    def _sampling_autocast(self) -> Any:
        """Sample in bf16 when the Trainer trains in bf16 (the network runs in bf16, the update in fp32)."""
        enabled = "bf16" in str(getattr(self._trainer, "precision", ""))
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _autoencoder(self) -> Any:
        if self.autoencoder is not None or self._trainer is None:
            return self.autoencoder
        return getattr(getattr(self._trainer, "datamodule", None), "autoencoder", None)

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
    @_refuses_renamed_arguments({"sampler": "solver", "steps": "solver_steps"}, "image generation is a solver")
    def sample(
        self,
        num_samples: int,
        *,
        solver: Solver = "ddim",
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

        ``solver="ddim"`` (eta 0 unless given) or ``"ddpm"`` (ancestral; with ``learn_sigma`` the
        learned variance), on ``solver_steps`` respaced steps (default: the module's ``solver_steps``).
        Pass a seeded ``generator`` or explicit ``noise`` for reproducible samples.
        ``labels``: one per sample in [0, num_classes); ``num_classes`` (the null label) samples unconditionally.
        ``clip_denoised``: clamp each step's predicted x0 to [-1, 1], and so the samples (None: the module's
        ``clip_denoised``, which unless set is on for pixels and off for latents).
        """
        if self.image_shape is None:
            raise ValueError("The module does not know its image shape yet: pass image_shape=(C, H, W) to DiffusionModule.")
        num_samples = check_int(num_samples, "num_samples", minimum=1)
        size = num_samples if batch_size is None else check_int(batch_size, "batch_size", minimum=1)
        steps = self.solver_steps if solver_steps is None else solver_steps
        clip = self.clip_denoised if clip_denoised is None else check_bool(clip_denoised, "clip_denoised")
        scale = self.guidance_scale if guidance_scale is None else check_number(guidance_scale, "guidance_scale")
        if self.num_classes is None and scale != 1.0:
            raise ValueError(
                f"guidance_scale={scale:g} needs a class-conditional model, but this one is unconditional "
                "(num_classes is null): leave guidance_scale at 1 (or unset)."
            )
        if eta is not None:
            eta = check_number(eta, "eta", at_least=0.0, hint="0: deterministic DDIM")
        if labels is not None:
            self._check_labels(labels, num_samples)
        if self.num_classes is not None and labels is None:
            labels = torch.randint(0, self.num_classes, (num_samples,), device=self.device, generator=generator)
        labels = None if labels is None else labels.to(self.device)
        if noise is None:
            noise = torch.randn((num_samples, *self.image_shape), device=self.device, generator=generator)
        else:
            self._check_noise(noise, num_samples)
        was_training = self.training
        self.eval()
        try:
            chunks = []
            for start in range(0, num_samples, size):
                part = slice(start, start + size)
                part_labels = None if labels is None else labels[part]
                model = guided(self._sampling_forward(), part_labels, self.num_classes, scale)
                with self._sampling_autocast():
                    x = sample_loop(self.diffusion, model, noise[part].to(self.device), solver,
                                    steps, eta, clip_denoised=clip, generator=generator)
                chunks.append(x.float())
            return torch.cat(chunks)
        finally:
            self.train(was_training)

    def _check_noise(self, noise: Any, num_samples: int) -> None:
        """sample()'s noise: x_T, a finite floating-point tensor of one image per sample. Sampling is not the
        training step: the finiteness check reads the values once per call (a sync for noise on an accelerator)."""
        expected = (num_samples, *self.image_shape)  # type: ignore[misc]
        if not isinstance(noise, Tensor) or not noise.is_floating_point():
            what = noise.dtype if isinstance(noise, Tensor) else type(noise).__name__
            raise TypeError(
                f"noise must be a floating-point tensor of standard normal values shaped {expected}, got {what}: "
                f"e.g. torch.randn({', '.join(map(str, expected))})."
            )
        if tuple(noise.shape) != expected:
            raise ValueError(
                f"noise must be shaped (num_samples, *image_shape) = {expected}, got {tuple(noise.shape)}: one x_T per sample."
            )
        if not bool(torch.isfinite(noise).all()):
            raise ValueError("noise holds NaN or infinite values: every sample would come out NaN; give finite noise.")

    def _check_labels(self, labels: Any, num_samples: int) -> None:
        """sample()'s labels: one integer per sample in [0, num_classes] (num_classes: the null label,
        unconditional). Sampling is not the training step: the one value check here may sync."""
        if self.num_classes is None:
            raise ValueError("labels were given but the model is unconditional (num_classes is null).")
        if not is_integer_tensor(labels):
            raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}.")
        if tuple(labels.shape) != (num_samples,):
            raise ValueError(f"labels must hold one label per sample, shaped ({num_samples},), got {tuple(labels.shape)}.")
        outside = (labels < 0) | (labels > self.num_classes)
        if outside.any():
            raise ValueError(
                f"labels must lie in [0, {self.num_classes - 1}] (or {self.num_classes}, the null label, for "
                f"unconditional samples); got {labels[outside][:5].tolist()}."
            )
