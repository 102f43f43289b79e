"""Checks of a checkpoint given to resume or evaluate from, with messages that say what is wrong.

Lightning reads ``ckpt_path`` with ``torch.load``: a text file then fails deep inside the
unpickler ("IndexError: pop from empty list"), and a checkpoint of another model size lists every
mismatching tensor (over a hundred lines for a UNet) without saying which configuration would fit.
:func:`check_checkpoint_file` says what the file is instead; :func:`check_checkpoint_matches`
summarises the mismatch and points to the configuration the checkpoint was trained with;
:func:`optimizer_changes` lists the optimizer and LR scheduler settings that resuming from it replaces.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import LightningModule
from torch import Tensor, nn

SPECIAL_PATHS = ("last", "best", "hpc")  # Lightning resolves these itself
NO_STRATEGY = "none (uniform t, unit weights)"  # a run without a time-step strategy
_SHOWN = 4


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not fit the configured model."""


def _is_local(path: str) -> bool:
    return path not in SPECIAL_PATHS and "://" not in path


def describe_file(path: str | os.PathLike[str]) -> str:
    """A few words on what a file that is not a checkpoint looks like (for error messages)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "an empty file"
    with open(path, "rb") as f:
        head = f.read(256)
    text = head.decode("utf-8", errors="replace")[:-1]  # the cut may split the last character
    if all((c.isprintable() and c != "\ufffd") or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0] if text.strip() else ""
        return f"a text file of {size} bytes starting with {first[:60]!r}"
    if zipfile.is_zipfile(path):
        return f"a zip archive of {size} bytes without the data.pkl entry of a torch.save file"
    return f"{size} bytes of binary data starting with {head[:8].hex(' ')}"


def _torch_file(path: Path) -> bool:
    """torch.save's zip format (has ``<name>/data.pkl``), or the legacy pickle format (starts with 0x80)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def check_checkpoint_file(path: str | os.PathLike[str] | None) -> None:
    """Raise a clear error when ``path`` (a ``--ckpt_path``) is missing, a folder or not a torch file."""
    if path is None or not _is_local(str(path)):
        return
    file = Path(path)
    example = "e.g. runs/<name>/version_N/checkpoints/last.ckpt"
    if not file.exists():
        raise FileNotFoundError(f"--ckpt_path {path}: no such file. Give a checkpoint written by a run ({example}).")
    if file.is_dir():
        found = sorted(str(p) for p in file.rglob("*.ckpt"))[:5]
        hint = f" Checkpoints in it: {', '.join(found)}." if found else " It contains no .ckpt file."
        raise IsADirectoryError(f"--ckpt_path {path} is a folder; give a checkpoint file.{hint}")
    with open(file, "rb") as f:
        zip_start = f.read(4) == b"PK\x03\x04"
    if zip_start and not zipfile.is_zipfile(file):  # torch.save's zip archive without its end (a cut-off copy or save)
        raise ValueError(
            f"--ckpt_path {path} looks cut off or corrupt: it starts as the zip archive torch.save writes but its "
            f"{file.stat().st_size:,} bytes do not end as one. Copy it again, or resume from an earlier checkpoint."
        )
    if not _torch_file(file):
        raise ValueError(
            f"--ckpt_path {path} is not a checkpoint: it is {describe_file(file)}. A checkpoint is a .ckpt file "
            f"written by ModelCheckpoint or by a stopped run ({example})."
        )


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's dict, memory-mapped where the format allows (tensors are read only when touched)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except RuntimeError:  # legacy format: no mmap
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = list(checkpoint)[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is a torch file but not a Lightning checkpoint: it has no 'state_dict' (it holds {keys}). "
            "Resume from a .ckpt written by ModelCheckpoint; to start from plain weights, load them into the "
            "module yourself (module.load_state_dict(torch.load(path)))."
        )
    return checkpoint


def config_near(path: Path) -> Path | None:
    """The run's config.yaml: runs/<name>/version_N/config.yaml for runs/<name>/version_N/checkpoints/x.ckpt."""
    for folder in (path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def trained_strategies(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> Any:
    """The time-step strategy ``checkpoint`` was trained with: the ``timesteps`` value of the run's config.yaml beside
    it when there is one (a dict with its arguments, a list or None), else the class names its ``TimestepCallback``
    state is saved under, as a string ("" for none)."""
    config = config_near(Path(path))
    if config is not None:
        try:
            saved = yaml.safe_load(config.read_text())
        except (OSError, yaml.YAMLError):
            saved = None
        if isinstance(saved, dict) and "timesteps" in saved:
            return saved["timesteps"]
    keys = [k for k in checkpoint.get("callbacks") or {} if k.startswith("TimestepCallback{")]
    return " + ".join(m.group(1) for m in map(re.compile(r"'strategies': '([^']*)'").search, keys) if m)


def describe_strategies(value: Any, arguments: bool = True) -> str:
    """A config's ``timesteps`` value in a few words: ``SpeeD(tau=700, k=5.0)`` (``SpeeD`` without ``arguments``), a
    list joined by " + ", ``NO_STRATEGY`` for null; a string of class names is returned as it is."""
    if isinstance(value, list):
        return " + ".join(describe_strategies(v, arguments) for v in value) or NO_STRATEGY
    if value is None or value == "":
        return NO_STRATEGY
    if not isinstance(value, dict):
        return str(value)
    name = str(value.get("class_path", "?")).rsplit(".", 1)[-1]
    if not arguments:
        return name
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in (value.get('init_args') or {}).items())})"


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def check_checkpoint_matches(model: nn.Module, path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """Raise :class:`CheckpointMismatchError` (a short summary) when tensor shapes differ from ``model``'s, or, for
    a model loaded strictly (``strict_loading``, Lightning's default), when tensors are missing on either side.
    Returns the loaded checkpoint (memory-mapped) for further checks, None for no path or one Lightning resolves."""
    if path is None or not _is_local(str(path)):
        return None
    checkpoint = load_checkpoint(path)
    check_state_matches(model, checkpoint["state_dict"], path, strict=getattr(model, "strict_loading", True))
    return checkpoint


def check_state_matches(model: nn.Module, state: dict[str, Any], path: str | os.PathLike[str] | None = None,
                        strict: bool = False) -> None:
    """:func:`check_checkpoint_matches` on a checkpoint's loaded ``state_dict`` (``path``: where it came from, if known).

    ``strict``: the state will be loaded strictly (a Trainer's fit or validate with ``strict_loading``), so tensors
    missing on either side are refused too, with the same short summary: a DiT of another depth has no tensor of
    another shape, and PyTorch would list every block's keys."""

    def shapes(items: Any) -> dict[str, tuple[int, ...]]:
        return {
            k: tuple(v.shape) for k, v in items if isinstance(v, Tensor)
        }

    theirs, ours = shapes(state.items()), shapes(model.state_dict().items())
    mismatched = [(k, theirs[k], ours[k]) for k in ours if k in theirs and theirs[k] != ours[k]]
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    if not mismatched and not (strict and (missing or unexpected)):
        return
    source = "The checkpoint" if path is None else f"The checkpoint {path}"
    counts = [f"{len(mismatched)} of {len(ours)} tensors have other shapes"] if mismatched else []
    counts += [f"{len(missing)} of the model's {len(ours)} tensors are missing from it"] if missing else []
    counts += [f"{len(unexpected)} of its are not in the model"] if unexpected else []
    lines = [f"{source} was trained with another model configuration: {', '.join(counts)}. For example:"]
    lines += [f"  {k}: checkpoint {_shape(a)}, model {_shape(b)}" for k, a, b in mismatched[:_SHOWN]]
    shown = max(_SHOWN - len(mismatched), 0)
    lines += [f"  {k}: missing from the checkpoint" for k in missing[:shown]]
    lines += [f"  {k}: not in the model" for k in unexpected[:max(shown - len(missing), 0)]]
    config = None if path is None else config_near(Path(path))
    if config is not None:
        lines.append(f"Use the configuration it was trained with: lightning-speed fit --config {config} --ckpt_path {path}")
    else:
        lines.append(
            "Use the configuration it was trained with (the config.yaml in that run's log folder), or set the "
            "model's backbone arguments to the sizes above (in Python: the backbone given to load_from_checkpoint)."
        )
    raise CheckpointMismatchError("\n".join(lines))


# Param-group entries that are not training settings: which tensors, and how the update is computed.
_NOT_SETTINGS = frozenset({"params", "param_names", "foreach", "fused", "capturable", "differentiable"})
# LR scheduler state that records progress through the schedule, not its settings (base_lrs: the optimizer's lr).
_SCHEDULER_PROGRESS = frozenset(
    {"last_epoch", "base_lrs", "best", "num_bad_epochs", "cooldown_counter", "T_cur", "T_i"}
)


def _settings(state: dict[str, Any], skip: frozenset[str]) -> dict[str, Any]:
    """The plain values (numbers, strings and tuples of them) of an optimizer param group or scheduler state."""
    plain = (bool, int, float, str)
    out = {}
    for key, value in state.items():
        if isinstance(value, list):
            value = tuple(value)
        if key not in skip and not key.startswith("_") and (
            isinstance(value, plain) or (isinstance(value, tuple) and all(isinstance(v, plain) for v in value))
        ):
            out[key] = value
    return out


def _differences(ours: dict[str, Any], theirs: dict[str, Any], prefix: str) -> list[tuple[str, Any, Any]]:
    return [(prefix + key, theirs[key], value) for key, value in ours.items() if key in theirs and theirs[key] != value]


def _optimizers_and_schedulers(config: Any) -> tuple[list[Any], list[Any]]:
    """The optimizers and LR schedulers of a ``configure_optimizers()`` return value, in the forms Lightning
    documents: an optimizer, a dict with "optimizer" and optional "lr_scheduler" (itself a scheduler or a dict
    with "scheduler"), or a list/tuple of either, or two lists (optimizers, schedulers)."""
    if config is None:
        return [], []
    if isinstance(config, dict):
        scheduler = config.get("lr_scheduler")
        if isinstance(scheduler, dict):
            scheduler = scheduler.get("scheduler")
        return [config["optimizer"]], [scheduler] if scheduler is not None else []
    if isinstance(config, (list, tuple)):
        if len(config) == 2 and all(isinstance(part, (list, tuple)) for part in config):
            optimizers, schedulers = _optimizers_and_schedulers(list(config[0]))[0], list(config[1])
            return optimizers, [s["scheduler"] if isinstance(s, dict) else s for s in schedulers]
        pairs = [_optimizers_and_schedulers(item) for item in config]
        return [o for opts, _ in pairs for o in opts], [s for _, scheds in pairs for s in scheds]
    return [config], []


def optimizer_changes(model: LightningModule, checkpoint: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(setting, checkpoint value, configured value) for each optimizer or LR scheduler setting that resuming from
    ``checkpoint`` replaces: Lightning loads the saved optimizer and scheduler state over the configured ones, so
    a changed ``lr`` or ``weight_decay`` would not be used.

    The configured values are read from a throwaway ``model.configure_optimizers()`` (an optimizer holds no state
    before its first step). Settings are named ``optimizer.<key>`` and ``lr_scheduler.<key>`` (with ``[i]`` and
    ``group j`` where a module has several); under a scheduler, ``lr`` is the base rate it starts from.
    """
    saved_optimizers, saved_schedulers = checkpoint.get("optimizer_states") or [], checkpoint.get("lr_schedulers") or []
    if not saved_optimizers and not saved_schedulers:
        return []
    optimizers, schedulers = _optimizers_and_schedulers(model.configure_optimizers())
    changes = []
    for i, (optimizer, saved) in enumerate(zip(optimizers, saved_optimizers)):
        groups = optimizer.state_dict()["param_groups"]
        for j, (group, theirs) in enumerate(zip(groups, saved.get("param_groups", []))):
            ours, theirs = _settings(group, _NOT_SETTINGS), _settings(theirs, _NOT_SETTINGS)
            if "initial_lr" in ours and "initial_lr" in theirs:  # lr follows the schedule; initial_lr is the setting
                ours["lr"], theirs["lr"] = ours.pop("initial_lr"), theirs.pop("initial_lr")
            where = (f"[{i}]" if len(optimizers) > 1 else "") + (f" group {j}" if len(groups) > 1 else "")
            changes += _differences(ours, theirs, f"optimizer{where}.")
    for i, (scheduler, saved) in enumerate(zip(schedulers, saved_schedulers)):
        scheduler = scheduler["scheduler"] if isinstance(scheduler, dict) else scheduler
        where = f"[{i}]" if len(schedulers) > 1 else ""
        ours, theirs = _settings(scheduler.state_dict(), _SCHEDULER_PROGRESS), _settings(saved, _SCHEDULER_PROGRESS)
        changes += _differences(ours, theirs, f"lr_scheduler{where}.")
    return changes
