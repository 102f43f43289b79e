"""DiffusionModule's input checks: its backbone, the data module, each batch and ``sample``'s arguments.

Each check raises a short error naming the cause and the fix, before any work is lost. Batch checks read
host metadata (type, dtype, shape) on every step, which costs no device sync; the values (finite images,
pixels in about [-1, 1], labels in range) cost one sync, so the module reads them on a stage's first batch.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lightning_speed.process import GaussianDiffusion
from lightning_speed.validation import check_number, is_integer_tensor


def check_image_shape(shape: Any) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (channels, height, width), got {shape}.")
    return shape  # type: ignore[return-value]


def check_guidance(scale: Any, num_classes: int | None, name: str = "guidance_scale") -> float:
    """A finite guidance scale; other than 1 only for a class-conditional model (``guided`` would ignore it)."""
    scale = check_number(scale, name)
    if num_classes is None and scale != 1.0:
        raise ValueError(
            f"{name}={scale:g} needs a class-conditional model, but this one is unconditional (model.num_classes "
            "is null): classifier-free guidance mixes class-conditional and unconditional predictions. Set "
            "model.num_classes (and the backbone's num_classes) to the data's number of classes, or leave "
            "guidance_scale at 1."
        )
    return scale


# -- the backbone ----------------------------------------------------------------------------------
def check_backbone(backbone: Any, num_timesteps: int, num_classes: int | None) -> nn.Module:
    """An ``nn.Module`` whose ``num_timesteps`` and ``num_classes``, where it states them (UNet, DiT), are the
    model's: labels 0 .. num_classes - 1 and the null label ``num_classes`` index its label embedding."""
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module called as backbone(x, t, y=None), got {type(backbone).__name__}.")
    name = type(backbone).__name__
    backbone_t = getattr(backbone, "num_timesteps", None)
    if isinstance(backbone_t, int) and backbone_t != num_timesteps:
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


def check_backbone_accepts(backbone: nn.Module, diffusion: GaussianDiffusion, shape: tuple[int, int, int],
                           num_classes: int | None) -> None:
    """One tiny forward at t = 0 and T-1, so a backbone that cannot take the data fails at setup."""
    device = next(backbone.parameters(), torch.empty(0)).device
    x = torch.zeros(2, *shape, device=device)
    t = torch.tensor([0, diffusion.num_timesteps - 1], device=device)
    y = torch.zeros(2, dtype=torch.long, device=device) if num_classes is not None else None
    try:
        with torch.no_grad():
            out = backbone(x, t, y)
    except Exception as err:  # surface as configuration error, with the original cause kept
        raise ValueError(
            f"The backbone {type(backbone).__name__} cannot process images of shape {shape} at time "
            f"steps 0 .. {diffusion.num_timesteps - 1}: {str(err).rstrip('.')}. Make the backbone's in_channels / "
            "image_size / num_timesteps match the data and the model (see `lightning-speed fit --print_config`)."
        ) from err
    diffusion.check_output(out, x)


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
