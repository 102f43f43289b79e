"""The latent seam: an image autoencoder that training reads latents from and sampling decodes through.

:class:`Autoencoder` wraps a diffusers ``AutoencoderKL`` (the paper's sd-vae-ft-ema, or any other) as a
frozen, plain object (not an ``nn.Module``, so a module holding it keeps it out of its state_dict,
its EMA copy and DDP). It speaks the diffusion side's units:

* ``encode(images in [-1, 1]) -> (mean, std)``: the posterior N(mean, std^2) of the unscaled latent;
  a training latent is ``(mean + std * eps - shift_factor) * scaling_factor``.
* ``decode(latents)``: scaled latents -> images in [-1, 1] (undoes that scale and shift, clamps).

``scaling_factor`` and ``shift_factor`` come from the autoencoder's config (0.18215 and 0 for sd-vae-ft-ema;
SD3's and FLUX's autoencoders also shift), as diffusers' pipelines apply them, and ``fingerprint`` names its
config and weights, so a latent cache can tell whether it was built by it.

diffusers is an optional dependency (``pip install -e ".[latent]"``), imported only when needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_speed.validation import check_int, check_number

INSTALL_HINT = 'pip install -e ".[latent]"  (or: pip install "diffusers>=0.30")'
WEIGHT_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
"""What a local autoencoder folder must hold (``save_pretrained`` writes them)."""
SD_VAE_FT_EMA = "stabilityai/sd-vae-ft-ema"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class AutoencoderUnavailable(FileNotFoundError):
    """The autoencoder's files are not where they were looked for (or the hub cannot be reached)."""


def import_diffusers() -> Any:
    """The diffusers package, or an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(f"Latent diffusion needs the diffusers package, which is not installed: {INSTALL_HINT}.") from err
    return diffusers


def _folder_hint(target: str) -> str:
    files = " and ".join(WEIGHT_FILES)
    return (
        f"Put {files} of the autoencoder (e.g. from https://huggingface.co/{SD_VAE_FT_EMA}, or written by "
        f"AutoencoderKL.save_pretrained) in one folder and set the autoencoder to that folder{target}."
    )


def _check_folder(folder: Path, subfolder: str | None) -> Path:
    where = folder / subfolder if subfolder else folder
    if where.is_file():  # e.g. the weights file itself, where its folder is meant
        raise AutoencoderUnavailable(
            f"The autoencoder {str(where)!r} is a file; it must be the folder that holds "
            f"{' and '.join(WEIGHT_FILES)}: set the autoencoder to {str(where.parent)!r}."
        )
    if not where.is_dir():
        raise AutoencoderUnavailable(
            f"Autoencoder folder {str(where)!r} does not exist. " + _folder_hint(f" ({where.absolute()})")
        )
    missing = [f for f in WEIGHT_FILES if not (where / f).is_file()]
    if missing == ["diffusion_pytorch_model.safetensors"] and (where / "diffusion_pytorch_model.bin").is_file():
        missing = []  # older diffusers checkpoints: the pickle format, which diffusers also reads
    if missing:
        raise AutoencoderUnavailable(
            f"Autoencoder folder {str(where)!r} lacks {', '.join(missing)}. " + _folder_hint(f" ({where})")
        )
    weights = where / WEIGHT_FILES[1]
    damage = safetensors_damage(weights) if weights.is_file() else None
    if damage is not None:
        raise AutoencoderUnavailable(f"{weights} looks cut off or corrupt ({damage}): download or copy it again.")
    return where


def safetensors_damage(path: Path) -> str | None:
    """Why the safetensors file at ``path`` cannot be read whole (cut off, a broken header), or None. The format:
    an 8-byte little-endian header length, a JSON header whose tensors name their byte ranges, the bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            return f"{size:,} bytes, shorter than its header"
        try:
            header = json.loads(f.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return "its header cannot be read"
    expected = 8 + length + end
    return None if size >= expected else f"it holds {size:,} of the {expected:,} bytes its header announces"


def download_failure(error: BaseException) -> str:
    """Why a hub download failed, in a few words: no connection when any exception in the chain says so (the hub
    client reports a missing network as a file "not found" raised from the connection error), else the first line."""
    chain, current = [], error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for cause in chain:
        name = type(cause).__name__
        if isinstance(cause, (ConnectionError, TimeoutError)) or any(
                word in name for word in ("Connection", "Timeout", "NameResolution", "MaxRetry", "Offline")):
            return f"no connection to the hub: {name}"
    text = str(error).strip()
    return f"download failed: {text.splitlines()[0] if text else type(error).__name__}"


def _weights_hash(module: nn.Module) -> str:
    """sha256 over the parameter and buffer names, dtypes, shapes and values (equal weights, equal hash)."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class Autoencoder:
    """A frozen ``AutoencoderKL`` (or a model with the same ``encode``/``decode``/``config``) in diffusion units.

    Args:
        vae: the autoencoder, e.g. ``diffusers.AutoencoderKL``; kept in eval mode without gradients.
        scaling_factor: multiplies the latents so they have about unit variance (None: the
            autoencoder config's ``scaling_factor``, 0.18215 for sd-vae-ft-ema). The config's
            ``shift_factor`` (if any) is subtracted before the scaling, as diffusers does.
        name: where it came from (a folder or hub name), for messages.
    """

    def __init__(self, vae: nn.Module, scaling_factor: float | None = None, name: str | None = None) -> None:
        config = getattr(vae, "config", None)
        if not isinstance(vae, nn.Module) or config is None or not callable(getattr(vae, "encode", None)):
            raise TypeError(
                f"Autoencoder wraps a diffusers AutoencoderKL (an nn.Module with encode, decode and config), got "
                f"{type(vae).__name__}. Load one with Autoencoder.load(folder or hub name)."
            )
        missing = [k for k in ("in_channels", "latent_channels", "block_out_channels") if getattr(config, k, None) is None]
        if missing:
            raise TypeError(
                f"Autoencoder wraps a diffusers AutoencoderKL, whose config gives in_channels, latent_channels and "
                f"block_out_channels; {type(vae).__name__}'s config has no {', '.join(missing)}. Use an AutoencoderKL "
                "(e.g. stabilityai/sd-vae-ft-ema)."
            )
        factor = scaling_factor if scaling_factor is not None else getattr(config, "scaling_factor", None)
        factor = check_number(factor, "the autoencoder's scaling_factor", above=0.0,
                              hint="pass scaling_factor (0.18215 for sd-vae-ft-ema)")
        per_channel = [k for k in ("latents_mean", "latents_std") if getattr(config, k, None) is not None]
        if per_channel:
            raise ValueError(
                f"The autoencoder's config sets {' and '.join(per_channel)} (per-channel latent statistics), which "
                "Autoencoder does not apply, so its latents would be off-centre and off-scale: use an autoencoder "
                "without them (e.g. stabilityai/sd-vae-ft-ema)."
            )
        shift = getattr(config, "shift_factor", None)
        self.shift_factor = check_number(0.0 if shift is None else shift, "the autoencoder's shift_factor")
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = factor
        self.name = name or type(vae).__name__
        self.in_channels = int(config.in_channels)
        self.latent_channels = int(config.latent_channels)
        self.downsample_factor = 2 ** (len(config.block_out_channels) - 1)
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, source: str | os.PathLike[str] | nn.Module | Autoencoder, subfolder: str | None = None,
             scaling_factor: float | None = None) -> Autoencoder:
        """An ``Autoencoder`` from a local folder, a hub name (``stabilityai/sd-vae-ft-ema``) or a built model.

        A folder must hold ``config.json`` and ``diffusion_pytorch_model.safetensors`` (in
        ``subfolder`` if given); a hub name is read from the Hugging Face cache first, downloaded
        otherwise (unless ``HF_HUB_OFFLINE=1``). Missing files fail here with what to put where.
        """
        if isinstance(source, Autoencoder):
            return source if scaling_factor is None else cls(source.vae, scaling_factor, source.name)
        if isinstance(source, nn.Module):
            return cls(source, scaling_factor)
        text = str(source)
        folder = Path(text).expanduser()
        diffusers = import_diffusers()
        if folder.exists() or not _HUB_NAME.match(text):  # a path (a hub name is "owner/name" that is not a folder here)
            where = _check_folder(folder, subfolder)
            vae = diffusers.AutoencoderKL.from_pretrained(str(where))
            return cls(vae, scaling_factor, name=str(folder))
        return cls(cls._from_hub(diffusers, text, subfolder), scaling_factor, name=text)

    @staticmethod
    def _from_hub(diffusers: Any, name: str, subfolder: str | None) -> nn.Module:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        try:  # the local Hugging Face cache first: no network round trip when it is there
            return diffusers.AutoencoderKL.from_pretrained(name, local_files_only=True, **kwargs)
        except (OSError, ValueError):
            pass
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        reason = "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"
        if not offline:
            try:
                return diffusers.AutoencoderKL.from_pretrained(name, **kwargs)
            except Exception as err:  # noqa: BLE001 - any download failure gets the same advice
                reason = download_failure(err)
        files = [f"{subfolder}/{f}" if subfolder else f for f in WEIGHT_FILES]
        folder = Path(name).absolute()
        raise AutoencoderUnavailable(
            f"Cannot load the autoencoder {name!r}: there is no folder {str(folder)!r}, and not from the Hugging Face "
            f"hub either ({reason}). Put {' and '.join(files)} in that folder (or another one, and set the autoencoder "
            f"to it), e.g. where there is network: hf download {name} {' '.join(files)} --local-dir {folder} "
            f"(huggingface-cli download with older huggingface_hub; the paper's autoencoder is {SD_VAE_FT_EMA})."
        )

    # ------------------------------------------------------------------ facts
    @property
    def fingerprint(self) -> str:
        """Names the autoencoder's config and weights (and scaling factor): a latent cache's key."""
        if self._fingerprint is None:
            text = json.dumps(self.config, sort_keys=True, default=str) + f"|{self.scaling_factor}"
            self._fingerprint = f"{hashlib.sha256(text.encode()).hexdigest()[:12]}-{_weights_hash(self.vae)}"
        return self._fingerprint

    @property
    def config(self) -> dict[str, Any]:
        """The autoencoder's config without diffusers' bookkeeping entries (``_class_name``, ``_diffusers_version``)."""
        return {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def to(self, device: torch.device | str) -> Autoencoder:
        self.vae.to(device)
        return self

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(C, H, W) of the latents of images of ``image_shape``; a clear error when it cannot take them."""
        c, h, w = (int(s) for s in image_shape)
        f = self.downsample_factor
        if c != self.in_channels:
            raise ValueError(
                f"The autoencoder {self.name} takes {self.in_channels}-channel images, but the images have {c} "
                f"channel(s): use {self.in_channels}-channel images (e.g. ImageFolderDataModule(channels={self.in_channels}))."
            )
        if h % f or w % f:
            raise ValueError(
                f"The autoencoder {self.name} downsamples by {f}, so it takes images whose height and width are "
                f"multiples of {f}; these are {h}x{w}. Resize them (e.g. image_size={max(f, (h // f) * f)})."
            )
        return self.latent_channels, h // f, w // f

    def image_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(C, H, W) of the images decoded from latents of ``latent_shape``."""
        _, h, w = (int(s) for s in latent_shape)
        return self.in_channels, h * self.downsample_factor, w * self.downsample_factor

    # ------------------------------------------------------------------ the two directions
    @torch.no_grad()
    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images in [-1, 1] (B, C, H, W) -> the posterior's (mean, std) of the *unscaled* latent, fp32."""
        encoded = self.vae.encode(images.to(self.device, next(self.vae.parameters()).dtype))
        posterior = getattr(encoded, "latent_dist", None)
        if posterior is None:  # AutoencoderTiny, VQModel: latents without a posterior to draw training latents from
            raise TypeError(
                f"{type(self.vae).__name__}.encode returned {type(encoded).__name__}, which has no latent_dist: "
                "Autoencoder reads the mean and std of a KL autoencoder's posterior, as diffusers' AutoencoderKL "
                "returns them. Use an AutoencoderKL (e.g. stabilityai/sd-vae-ft-ema)."
            )
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int = 64) -> Tensor:
        """Scaled latents (B, C, h, w) -> images in [-1, 1] (B, C, H, W), fp32, ``batch_size`` at a time."""
        check_int(batch_size, "batch_size", minimum=1)
        dtype = next(self.vae.parameters()).dtype
        parts = []
        for chunk in latents.split(batch_size):
            z = chunk.to(self.device, dtype) / self.scaling_factor + self.shift_factor
            parts.append(self.vae.decode(z).sample.float().clamp_(-1.0, 1.0))
        return torch.cat(parts) if parts else latents.new_zeros((0, *self.image_shape(latents.shape[1:])))

    def __repr__(self) -> str:
        shift = f", shift_factor={self.shift_factor}" if self.shift_factor else ""
        return (f"Autoencoder({self.name!r}, scaling_factor={self.scaling_factor}{shift}, "
                f"downsample={self.downsample_factor})")
