"""DiffusionModule's input checks: its process and solvers, its backbone, the data module, each batch and
``sample``'s arguments.

Each check raises a short error naming the cause and the fix, before any work is lost. Batch checks read
host metadata (type, dtype, shape) on every step, which costs no device sync; the values (finite images,
pixels in about [-1, 1], labels in range) cost one sync, so the module reads them on a stage's first batch.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from lightning_speed.flow import FLOW_SOLVERS, FlowSolver
from lightning_speed.solvers import SOLVERS, Solver
from lightning_speed.validation import check_choice, check_int, check_number, is_integer_tensor

Process = Literal["ddpm", "flow"]
AnySolver = Union[Solver, FlowSolver]
"""A solver of either process: DDPM's (ddim, ddpm, dpmpp_2m) or the flow's (euler, heun)."""
PROCESS_SOLVERS: dict[str, tuple[str, ...]] = {"ddpm": SOLVERS, "flow": FLOW_SOLVERS}
FLOW_TIME_SCALE = 1000.0
"""Flow times t in [0, 1] reach the backbone as t * 1000, the range the DDPM backbones' time embedding is built
for (steps 0 .. 999 at T = 1000; diffusers' models too), so one backbone class serves both processes."""


def check_image_shape(shape: Any) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (channels, height, width), got {shape}.")
    return shape  # type: ignore[return-value]


def check_guidance(scale: Any, num_classes: int | None, name: str = "guidance_scale",
                   label_dropout: float | None = None) -> float:
    """A finite guidance scale; other than 1 only for a class-conditional model (``guided`` would ignore it) that
    trains its null label (``label_dropout`` above 0: otherwise the unconditional branch is the untrained null row)."""
    scale = check_number(scale, name)
    if num_classes is None and scale != 1.0:
        raise ValueError(
            f"{name}={scale:g} needs a class-conditional model, but this one is unconditional (model.num_classes "
            "is null): classifier-free guidance mixes class-conditional and unconditional predictions. Set "
            "model.num_classes (and the backbone's num_classes) to the data's number of classes, or leave "
            "guidance_scale at 1."
        )
    if num_classes is not None and label_dropout == 0 and scale != 1.0:
        raise ValueError(
            f"{name}={scale:g} mixes in the unconditional prediction (the null label), which this model never "
            "trains: model.label_dropout is 0, so no label is ever dropped. Set model.label_dropout above 0 "
            "(DiT uses 0.1) for classifier-free guidance, or leave guidance_scale at 1."
        )
    return scale


# -- the process and its solvers -------------------------------------------------------------------
# DDPM-only arguments: the values a flow takes (the default first), and why a flow has no use for another value.
_DDPM_ONLY = {
    "schedule": (("linear",), "the flow's path is fixed, x_t = (1 - t) x0 + t eps; its shift moves time towards noise"),
    "num_timesteps": ((1000,), "a flow's time is continuous, t in [0, 1]"),
    "prediction": ((None, "epsilon"), "a flow's network predicts the velocity eps - x0"),
    "learn_sigma": ((False,), "a flow's network predicts the velocity only: it has no variance to learn"),
}


def check_process(process: Any, shift: Any, prediction: Any = None, **ddpm_arguments: Any) -> tuple[str, Any]:
    """The process and the prediction its hyperparameters record: a DDPM's ``prediction`` (None: epsilon), None on a
    flow, whose network predicts the velocity. Arguments the process would ignore are refused: ``shift`` other than 1
    on a DDPM, and on a flow the DDPM-only ones (``prediction``, ``schedule``, ``num_timesteps``, ``learn_sigma``)
    other than their defaults, but for ``prediction='epsilon'``, which flows' checkpoints may record."""
    process = check_choice(process, "process", PROCESS_SOLVERS)
    if process == "ddpm":
        if shift != 1.0:
            raise ValueError(
                f"shift={shift!r} applies to process='flow' only (it moves the flow's time towards noise); a DDPM's "
                "noise levels come from its schedule: leave shift at 1, or set process: flow."
            )
        return process, "epsilon" if prediction is None else prediction
    for name, value in {"prediction": prediction, **ddpm_arguments}.items():
        taken, why = _DDPM_ONLY[name]
        if value not in taken:
            raise ValueError(
                f"{name}={value!r} does not apply to process='flow': {why}. Leave {name} at its default "
                f"({taken[0]!r}), or use process='ddpm'."
            )
    return process, None


def check_process_solver(solver: Any, process: str, owner: str = "", eta: float | None = None) -> str:
    """``solver`` if it integrates ``process``: ddim, ddpm or dpmpp_2m for a DDPM, euler or heun for a flow (which
    take no ``eta``); None: the process's first (ddim, euler)."""
    where = f"{owner}: " if owner else ""
    solver = PROCESS_SOLVERS[process][0] if solver is None else solver
    for other, solvers in PROCESS_SOLVERS.items():
        if solver in solvers and other != process:
            raise ValueError(
                f"{where}solver {solver!r} samples a {other} model but this model is a {process} model (process="
                f"{process!r}): use {' or '.join(map(repr, PROCESS_SOLVERS[process]))}."
            )
    solver = check_choice(solver, f"{where}solver", PROCESS_SOLVERS[process])
    if eta is not None:
        check_number(eta, "eta", at_least=0.0, at_most=1.0, hint="0: deterministic DDIM, 1: DDPM's variance")
    if process == "flow" and eta is not None:
        raise ValueError(f"{where}eta applies to DDPM's ddim solver only; {solver} integrates the flow's ODE "
                         "deterministically: leave eta unset.")
    return solver


def check_steps(num_timesteps: int, schedule_steps: int | None, solver_steps: Any) -> int:
    """``solver_steps`` (at least 2; for a DDPM at most T), once the schedule's own T (``schedule_steps``, None for a
    flow) is checked against ``num_timesteps``: a list of betas or a NoiseSchedule fixes T, and hparams must record it."""
    if schedule_steps is not None and schedule_steps != num_timesteps:
        raise ValueError(
            f"The schedule has {schedule_steps} steps but num_timesteps={num_timesteps}: set num_timesteps "
            f"to {schedule_steps} (a list of betas or a NoiseSchedule fixes T)."
        )
    steps = check_int(solver_steps, "solver_steps", minimum=2)
    if schedule_steps is not None and steps > schedule_steps:  # sample() would refuse it at the first grid or FID
        raise ValueError(
            f"solver_steps must be at most num_timesteps = {schedule_steps} (solvers visit a subset of the "
            f"T steps), got {solver_steps}."
        )
    return steps


def check_checkpoint_process(checkpoint: dict[str, Any], process: str, num_timesteps: int | None) -> None:
    """A checkpoint's process and T are the module's (checkpoints without a process are DDPM's): the weights of
    another process or T predict another quantity."""
    hparams = checkpoint.get("hyper_parameters") or {}
    trained_process = checkpoint.get("process", hparams.get("process", "ddpm"))
    if trained_process != process:
        raise ValueError(
            f"The checkpoint was trained with process={trained_process!r} but this module is a {process!r} "
            f"model: its weights predict another quantity. Load it with process={trained_process!r}."
        )
    trained_t = checkpoint.get("num_timesteps", hparams.get("num_timesteps"))
    if process == "ddpm" and trained_t not in (None, num_timesteps):
        raise ValueError(
            f"The checkpoint was trained with num_timesteps={trained_t} but this module diffuses over "
            f"{num_timesteps} steps, which gives its weights another meaning: load it with "
            f"num_timesteps={trained_t} (load_from_checkpoint uses the checkpoint's value unless given another)."
        )


# -- the backbone ----------------------------------------------------------------------------------
def check_backbone(backbone: Any, num_timesteps: int | None, num_classes: int | None) -> nn.Module:
    """An ``nn.Module`` whose ``num_timesteps`` and ``num_classes``, where it states them (UNet, DiT), are the
    model's: labels 0 .. num_classes - 1 and the null label ``num_classes`` index its label embedding. A flow
    (``num_timesteps`` None) feeds t * 1000, which a backbone embeds as such at its num_timesteps 1000."""
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module called as backbone(x, t, y=None), got {type(backbone).__name__}.")
    name = type(backbone).__name__
    backbone_t = getattr(backbone, "num_timesteps", None)
    if num_timesteps is None and isinstance(backbone_t, int) and backbone_t != FLOW_TIME_SCALE:
        raise ValueError(
            f"The backbone {name} was built for num_timesteps={backbone_t}, which rescales its time input by "
            f"1000 / {backbone_t}, but a flow model passes t * 1000 for flow times t in [0, 1]: leave the backbone's "
            "num_timesteps at 1000."
        )
    if num_timesteps is None and getattr(backbone, "learn_sigma", False) is True:
        raise ValueError(
            f"The backbone {name} was built with learn_sigma=True (prediction and variance, 2C output channels), but "
            "a flow model predicts the velocity only: set model.backbone.init_args.learn_sigma to false."
        )
    if num_timesteps is not None and isinstance(backbone_t, int) and backbone_t != num_timesteps:
        raise ValueError(
            f"The backbone {name} was built for num_timesteps={backbone_t} but the model diffuses over "
            f"{num_timesteps} steps: set the backbone's num_timesteps to {num_timesteps} (or model.num_timesteps "
            f"to {backbone_t})."
        )
    if not hasattr(backbone, "num_classes"):
        return backbone
    classes, n = backbone.num_classes, num_classes
    is_count = classes is None or (isinstance(classes, numbers.Integral) and not isinstance(classes, bool))
    if not is_count or classes == n:
        return backbone  # not a number of classes (nothing to compare), or the model's
    if n is None:
        raise ValueError(
            f"The backbone {name} was built with num_classes={classes} but the model is unconditional "
            "(model.num_classes is null), so the backbone would only ever see the null label: set "
            f"model.num_classes to {classes} for class-conditional training, or remove the backbone's "
            "num_classes (model.backbone.init_args.num_classes) for an unconditional model."
        )
    if classes is None:
        raise ValueError(
            f"model.num_classes={n} trains class-conditionally but the backbone {name} was built without "
            f"num_classes (it has no label embedding): set model.backbone.init_args.num_classes to {n}, or "
            "model.num_classes to null for an unconditional model."
        )
    raise ValueError(
        f"model.num_classes={n} but the backbone {name} was built with num_classes={classes}: labels "
        f"0 .. {n - 1} and the null label {n} index the backbone's label embedding, so the two must agree. Set "
        f"model.backbone.init_args.num_classes to {n} (or model.num_classes to {classes})."
    )


def check_backbone_accepts(backbone: nn.Module, process: Any, shape: tuple[int, int, int],
                           num_classes: int | None) -> None:
    """One tiny forward at both ends of time (steps 0 and T-1 of a DDPM, a flow's t = 0 and 1 as 0 and 1000), so
    a backbone that cannot take the data fails at setup. ``process``: a GaussianDiffusion or RectifiedFlow."""
    device = next(backbone.parameters(), torch.empty(0)).device
    x = torch.zeros(2, *shape, device=device)
    steps = getattr(process, "num_timesteps", None)
    if steps is None:  # a flow
        t, times = torch.tensor([0.0, FLOW_TIME_SCALE], device=device), f"flow times 0 .. 1 (as 0 .. {FLOW_TIME_SCALE:g})"
    else:
        t, times = torch.tensor([0, steps - 1], device=device), f"time steps 0 .. {steps - 1}"
    y = torch.zeros(2, dtype=torch.long, device=device) if num_classes is not None else None
    try:
        with torch.no_grad():
            out = backbone(x, t, y)
    except Exception as err:  # surface as configuration error, with the original cause kept
        raise ValueError(
            f"The backbone {type(backbone).__name__} cannot process images of shape {shape} at "
            f"{times}: {str(err).rstrip('.')}. Make the backbone's in_channels / "
            "image_size / num_timesteps match the data and the model (see `lightning-speed fit --print_config`)."
        ) from err
    process.check_output(out, x)


# -- the data module and its batches ----------------------------------------------------------------
def check_data_module(datamodule: Any, image_shape: tuple[int, int, int] | None,
                      num_classes: int | None) -> tuple[int, int, int] | None:
    """The image shape to train on: the data module's where it states one, which the model's must match; and
    no more classes in the data than in the model (fewer is fine: some labels unused)."""
    data_shape = getattr(datamodule, "image_shape", None)
    if data_shape is not None:
        data_shape = check_image_shape(data_shape)
        if image_shape not in (None, data_shape):
            raise ValueError(
                f"The data yields images of shape {data_shape} but the model was configured for "
                f"{image_shape}: set model.image_shape to {list(data_shape)} (the CLI links it)."
            )
        image_shape = data_shape
    data_classes = getattr(datamodule, "num_classes", None)
    if (num_classes is not None and isinstance(data_classes, numbers.Integral)
            and not isinstance(data_classes, bool) and data_classes > num_classes):
        raise ValueError(
            f"The data has {data_classes} classes (labels 0 .. {data_classes - 1}) but model.num_classes is "
            f"{num_classes}: set model.num_classes and the backbone's num_classes "
            f"(model.backbone.init_args.num_classes) to {data_classes}."
        )
    return image_shape


def split_batch(batch: Any, image_shape: tuple[int, int, int] | None,
                num_classes: int | None) -> tuple[Tensor, Tensor | None]:
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
    if image_shape is not None and tuple(x.shape[1:]) != image_shape:
        c, h, w = image_shape
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
            f"image_shape is {image_shape}: set model.image_shape to {list(x.shape[1:])} or resize the data "
            "(images are (C, H, W), channels first)."
        )
    if num_classes is None:
        return x, None
    if y is None:
        raise ValueError(
            f"The model is class-conditional (num_classes={num_classes}) but the batch holds no labels: "
            "give batches of (images, labels) or {'images': ..., 'labels': ...}, or set num_classes=None."
        )
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


def check_batch_values(x: Tensor, y: Tensor | None, stage: str, *, first: bool, num_classes: int | None,
                       pixels: bool) -> None:
    """Value checks of a batch: on the ``first`` batch of a stage the images (finite and, for ``pixels``, in
    about [-1, 1]) and the labels (in [0, num_classes)), at the cost of one device sync; on later batches only
    labels still on the CPU, which costs none."""
    check_images = first and x.numel() > 0
    check_labels = y is not None and y.numel() > 0 and (first or y.device.type == "cpu")
    if not (check_images or check_labels):
        return
    stats = [v.float() for v in x.detach().aminmax()] if check_images else []
    if check_labels:
        stats += [v.float() for v in y.detach().aminmax()]  # type: ignore[union-attr]
    values = torch.stack(stats).tolist()  # the one sync (none for CPU tensors)
    if check_labels:
        _check_label_range(int(values[-2]), int(values[-1]), stage, num_classes)  # type: ignore[arg-type]
    if check_images:
        _check_image_range(values[0], values[1], stage, pixels)


def _check_label_range(lowest: int, highest: int, stage: str, n: int) -> None:
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


def _check_image_range(lowest: float, highest: float, stage: str, pixels: bool) -> None:
    where = f"The first {stage} batch"
    if not (math.isfinite(lowest) and math.isfinite(highest)):
        raise ValueError(
            f"{where} holds NaN or infinite values (its range is [{lowest}, {highest}]): check the dataset and "
            "its transforms (e.g. a normalisation dividing by a zero standard deviation, or a corrupt file)."
        )
    if not pixels:
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
            UserWarning, stacklevel=4,  # the module's training or validation step
        )
    elif lowest >= 0.0 and highest > 0.0:
        warnings.warn(
            f"{where} holds images in [{lowest:g}, {highest:g}], nothing below 0: this looks like [0, 1] data "
            "(e.g. torchvision's ToTensor), which the model would learn as mid-grey to white in its [-1, 1] range. "
            "Scale it in the dataset: x * 2 - 1, or transforms.Normalize(0.5, 0.5) after ToTensor.",
            UserWarning, stacklevel=4,
        )


# -- sample()'s arguments: sampling is not the training step, so these value checks may sync ------------
def check_sample_labels(labels: Any, num_samples: int, num_classes: int | None) -> None:
    """One integer label per sample in [0, num_classes] (num_classes: the null label, unconditional)."""
    if num_classes is None:
        raise ValueError("labels were given but the model is unconditional (num_classes is null).")
    if not is_integer_tensor(labels):
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}.")
    if tuple(labels.shape) != (num_samples,):
        raise ValueError(f"labels must hold one label per sample, shaped ({num_samples},), got {tuple(labels.shape)}.")
    outside = (labels < 0) | (labels > num_classes)
    if outside.any():
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] (or {num_classes}, the null label, for "
            f"unconditional samples); got {labels[outside][:5].tolist()}."
        )


def sample_inputs(num_samples: int, labels: Any, noise: Any, image_shape: tuple[int, int, int], num_classes: int | None,
                  device: torch.device, generator: torch.Generator | None) -> tuple[Tensor | None, Tensor]:
    """``sample``'s labels (checked, or drawn for a class-conditional model) and noise (checked, or drawn)."""
    if labels is not None:
        check_sample_labels(labels, num_samples, num_classes)
    if num_classes is not None and labels is None:
        labels = torch.randint(0, num_classes, (num_samples,), device=device, generator=generator)
    labels = None if labels is None else labels.to(device)
    if noise is None:
        noise = torch.randn((num_samples, *image_shape), device=device, generator=generator)
    else:
        check_sample_noise(noise, (num_samples, *image_shape))
    return labels, noise


def check_sample_noise(noise: Any, expected: tuple[int, ...]) -> None:
    """x_T: a finite floating-point tensor of one image per sample, shaped ``expected``."""
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


def build_lr_scheduler(factory: Any, optimizer: Any, trainer: Any) -> Any:
    """``factory(optimizer)``, checked by ``check_lr_scheduler``. A OneCycleLR given no length (neither ``total_steps``
    nor ``epochs``) gets the run's, ``trainer.estimated_stepping_batches``, as Lightning's docs build one."""
    keywords = getattr(factory, "keywords", None) or {}
    target = next((a for a in (getattr(factory, "func", None), *getattr(factory, "args", ())) if isinstance(a, type)), None)
    one_cycle = bool(target and issubclass(target, torch.optim.lr_scheduler.OneCycleLR))
    if not (one_cycle and keywords.get("total_steps") is None and keywords.get("epochs") is None):
        return check_lr_scheduler(_build(factory, optimizer, one_cycle, keywords), trainer)
    total = getattr(trainer, "estimated_stepping_batches", math.inf)
    if not math.isfinite(total):
        raise ValueError(
            "OneCycleLR without total_steps runs over the whole training, but this run sets no length: set "
            "trainer.max_steps (or max_epochs), or model.lr_scheduler.init_args.total_steps."
        )
    return check_lr_scheduler(_build(factory, optimizer, one_cycle, keywords, total_steps=int(total)), trainer)


def _build(factory: Any, optimizer: Any, one_cycle: bool, keywords: dict[str, Any], **extra: Any) -> Any:
    """``factory(optimizer, **extra)``. OneCycleLR divides by its warm-up's length, pct_start x total_steps - 1
    steps, in its constructor: a one-step warm-up fails there with a bare ZeroDivisionError, named here instead."""
    try:
        return factory(optimizer, **extra)
    except ZeroDivisionError:
        if not one_cycle:
            raise
        total, pct = extra.get("total_steps", keywords.get("total_steps")), keywords.get("pct_start", 0.3)
        raise ValueError(
            f"OneCycleLR(total_steps={total}, pct_start={pct}) has a warm-up of pct_start x total_steps = "
            f"{pct * total:g} step, which torch's OneCycleLR cannot build (it divides by the warm-up's steps - 1): "
            "raise pct_start or the run's length (trainer.max_steps) for a warm-up of two steps or more, or set "
            "pct_start to 0."
        ) from None


def check_lr_scheduler(scheduler: Any, trainer: Any) -> Any:
    """``scheduler``, once a schedule with a fixed length (OneCycleLR's ``total_steps``) fits the run's optimizer
    steps (``trainer.estimated_stepping_batches``: max_steps, or max_epochs of batches): shorter fails when it runs
    out, after hours of training; longer never anneals."""
    total, run = getattr(scheduler, "total_steps", None), getattr(trainer, "estimated_stepping_batches", math.inf)
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and math.isfinite(run):
        run = int(run)
        length = (f"trainer.max_steps={run}" if getattr(trainer, "max_steps", -1) == run
                  else f"the run's {run} optimizer steps (trainer.max_epochs={trainer.max_epochs})")
        if total < run:
            raise ValueError(
                f"OneCycleLR(total_steps={total}) ends before {length} and would fail at step "
                f"{total + 1}: set model.lr_scheduler.init_args.total_steps to {run}."
            )
        if total > run:
            warnings.warn(
                f"OneCycleLR(total_steps={total}) is longer than {length}: the rate stops "
                f"{run / total:.0%} of the way through its cycle. Set total_steps to {run} to anneal it.",
                stacklevel=2,
            )
    return scheduler
