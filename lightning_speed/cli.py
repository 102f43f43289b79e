"""The ``lightning-speed`` command: LightningCLI over DiffusionModule and our data modules.

``lightning-speed fit --config configs/quickstart.yaml`` trains; every constructor argument
of the model, the data module and the callbacks can be set from YAML or the command line,
and ``--print_config`` shows them all.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, NoReturn, Optional, Union

import torch
import yaml

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lightning_speed.callbacks.ema import EMAWeightAveraging
from lightning_speed.callbacks.fid import FIDCallback
from lightning_speed.callbacks.monitor import TimestepMonitor
from lightning_speed.callbacks.progress import StepProgressBar
from lightning_speed.callbacks.samples import SampleGridCallback
from lightning_speed.callbacks.guard import CheckpointOnSignal, DivergenceError, DivergenceGuard
from lightning_speed.callbacks.strategies import TimestepCallback
from lightning_speed.checkpoints import (
    NO_STRATEGY, config_near, check_checkpoint_file, check_checkpoint_matches, describe_strategies,
    optimizer_changes, trained_strategies,
)
from lightning_speed.module import DiffusionModule
from lightning_speed.timesteps import Strategy
from lightning_speed.validation import check_folder

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# Lines of jsonargparse's union-type errors that describe its search, not the problem.
_SEARCH_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value( type)?:|"
    r"Not a valid subclass of|Subclass types expect one of|- a (class path|dict)|"
    r"Expected a <class 'NoneType'>|Expected a path but|Type typing\.)"
)
_CONTEXT = re.compile(r"Parser key \"([^\"]+)\"|Problem with given class_path '([^']+)'")

# jsonargparse's report of a key no option takes: set in a config file (a typo on the command line is
# "unrecognized arguments"). ``group`` is the group or subcommand it names, which prefixes the key only for a group.
_UNKNOWN_KEY = re.compile(
    r"(?:Group '(?P<group>[^']+)'|Subcommand '[^']+') does not accept option '(?P<key>[^']+)'"
    r"|Option '(?P<top>[^']+)' is not accepted$"
)


def _indent(raw: str) -> int:
    return len(raw) - len(raw.lstrip(" -"))


def _useful(raw: str, path: list[str]) -> str | None:
    """The part of one report line that names a problem (None for search noise); keys and classes it names
    go to ``path``."""
    line = raw.strip().lstrip("-").strip()
    reason = re.search(r"expects a function or a callable class: (.+)$", line)
    if reason and not _CONTEXT.search(reason.group(1)):  # e.g. module 'torch.optim' has no attribute 'Adamw'
        return reason.group(1)
    contexts = _CONTEXT.findall(line)
    for key, class_path in contexts:
        path.append(key or class_path.rsplit(".", 1)[-1])
    rest = _CONTEXT.sub("", line).strip(" :")
    if not line or (contexts and (not rest or _SEARCH_NOISE.match(rest) or rest.endswith("expects a function or a callable class"))):
        return None
    return None if _SEARCH_NOISE.match(line) else line


def first_useful_error(message: str) -> str:
    """The innermost message of a jsonargparse error, prefixed with the keys and class that lead to it.

    jsonargparse reports a bad value inside a union type (every callback list is one) as a tree of
    everything it tried; the lines that name the problem come last, under "Errors:", one per type the
    value could have had. This returns those lines joined, with the value given, e.g.
    ``trainer.precision: Expected a <class 'int'> or typing.Literal['16-mixed', 'bf16-mixed', ...]. Got value: bf17``.
    """
    lines = message.splitlines()
    path: list[str] = []
    for i, raw in enumerate(lines):
        first = _useful(raw, path)
        if first is None:
            continue
        level, found, given = _indent(raw), [first], None
        for other in lines[i + 1:]:
            if other.strip() and _indent(other) < level:  # the end of this list of alternatives
                value = re.match(r"\s*Given value: (.*?)(\. Got value: .*)?$", other)
                if value:
                    given = value.group(1)
                    break
                if not other.strip().startswith("Given value type"):
                    break
            elif _indent(other) == level and other.strip().startswith("-"):
                alternative = _useful(other, [])
                if alternative:
                    found.append(alternative.removeprefix("Expected a ") if found[0].startswith("Expected a ") else alternative)
        text = " or ".join(found)
        if given is not None and "Got value" not in text:
            text += f". Got value: {given}"
        return ": ".join([*dict.fromkeys(path), text])
    return message.strip().splitlines()[0] if message.strip() else message


# Trainer arguments typed ``float | int | None``: jsonargparse tries the union's types in order and float
# takes an int, so ``limit_val_batches: 1`` became 1.0, which Lightning reads as 100 % of the batches, not one.
BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


class SpeedArgumentParser(LightningArgumentParser):
    """Prints the innermost problem of a parse error first, before the usage and the full report.

    Options are taken by their full names only: argparse would expand a mistyped prefix without a word
    (``--trainer.max_step 2`` would set ``max_steps``), where a mistyped YAML key is an error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def add_class_arguments(self, class_type: Any, nested_key: str | None = None, *args: Any, **kwargs: Any) -> list[str]:
        """The Trainer's ``limit_*_batches`` typed ``int | float | None``: an integer stays a number of batches.

        As in Lightning's Python API, ``1`` is one batch and ``1.0`` all of them (``val_check_interval`` and
        ``overfit_batches`` already try int first)."""
        if not (isinstance(class_type, type) and issubclass(class_type, Trainer) and nested_key):
            return super().add_class_arguments(class_type, nested_key, *args, **kwargs)
        kwargs["skip"] = set(kwargs.get("skip") or ()) | set(BATCH_LIMITS)
        added = super().add_class_arguments(class_type, nested_key, *args, **kwargs)
        group = (self.groups or {}).get(nested_key, self)
        for name in BATCH_LIMITS:
            group.add_argument(
                f"--{nested_key}.{name}", type=Optional[Union[int, float]], default=None,
                help=f"How many batches to use (an int) or which fraction of them (a float in [0, 1]): 1 is one batch, "
                f"1.0 all of them; null: all. Lightning's Trainer({name}=...).",
            )
            added.append(f"{nested_key}.{name}")
        return added

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if self.exit_on_error:
            headline = first_useful_error(message)
            if "arguments are required" in message and "model.backbone" in message:
                headline += (
                    ". A strategy, schedule or ablation file only adds to a base config: give the base config first, "
                    "e.g. --config configs/fashion_mnist.yaml --config configs/strategies/speed.yaml"
                )
            if "invalid choice: 'predict'" in message:
                headline += (". A diffusion model predicts nothing from a data set: it generates images, with the "
                             "samples: and fid: callbacks during fit or validate, or DiffusionModule.sample in Python")
            if message.startswith("unrecognized arguments:"):
                headline += self._close_options(message.split())
            unknown = _UNKNOWN_KEY.match(message)
            if unknown:
                headline = self._unknown_key(unknown, self._subcommand_parser(ex))
            headline += _near_class(headline)
            sys.stderr.write(f"error: {headline}\n(the usage and jsonargparse's full report follow)\n\n")
        super().error(message, ex)

    def _subcommand_parser(self, ex: Exception | None) -> LightningArgumentParser:
        """The parser of the subcommand given (``fit``, ...), which holds the options: with ``--print_config``
        jsonargparse reports an unknown key from the top-level parser, which holds only the subcommands."""
        found = getattr(ex, "subcommand_parser", None)
        if found is None and self._subcommands_action is not None:
            parsers = self._subcommands_action._name_parser_map
            found = next((parsers[t] for t in getattr(self, "_given", []) if t in parsers), None)
        return found or self

    def _close_options(self, tokens: list[str]) -> str:
        """A hint naming the options nearest to the unknown ones (options are taken by their full names only)."""
        known = [o for o in self._option_string_actions if o.startswith("--")]
        near = [m for t in tokens if t.startswith("--") for m in difflib.get_close_matches(t.split("=")[0], known, n=1)]
        return f". Options take their full names: did you mean {', '.join(near)}?" if near else ""

    def parse_args(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        self._given = list(sys.argv[1:] if args is None else args)  # for ``_unknown_key`` to find the config file
        return super().parse_args(args, *rest, **kwargs)

    def _unknown_key(self, match: re.Match, parser: LightningArgumentParser) -> str:
        """The config file that sets an unknown key, and the nearest key the parser takes (jsonargparse names
        neither)."""
        key = match["top"] or ".".join(k for k in match.group("group", "key") if k)
        parent = key.rpartition(".")[0]
        known = [a.dest for a in parser._actions if a.dest and a.dest != "help"]
        siblings = [k for k in known if k.rpartition(".")[0] == parent]
        near = difflib.get_close_matches(key, siblings, n=1) or difflib.get_close_matches(key, known, n=1)
        command = parser.prog.replace(" [options]", "")
        hint = f": did you mean {near[0]}?" if near else f"; {command} --help lists the options."
        for value in _config_values(getattr(self, "_given", [])):
            try:
                where, config = _load_config(value)
            except ConfigFileError:
                continue
            if any(f"{k}.".startswith(f".{key}.") for k in _leaves(config, "")):  # keys ".trainer.max_steps", ...
                return f"Config file {where} sets {key}, which is not an option{hint}"
        return f"{key} is not an option{hint}"


_NO_ATTRIBUTE = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")
_NOT_A_PATH = re.compile(r"^timesteps: Expected a dot import path string: (\w+)")


def _near_class(headline: str) -> str:
    """A hint naming the class or module nearest to a mistyped one in a class path (jsonargparse names only the
    missing attribute), e.g. ``lightning_speed.timesteps.Speed`` or ``--timesteps Sped`` for SpeeD."""
    missing = _NO_ATTRIBUTE.search(headline)
    short = _NOT_A_PATH.match(headline)
    if missing:
        module_name, name = missing.groups()
    elif short:
        module_name, name = "lightning_speed.timesteps", short.group(1)
    else:
        return ""
    module = sys.modules.get(module_name)
    names = [n for n in dir(module) if not n.startswith("_")] if module is not None else []
    classes = [n for n in names if isinstance(getattr(module, n), type)]
    for candidates in (classes, names):  # a class first: lightning_speed.timesteps also has a module named speed
        lower = {n.lower(): n for n in candidates}
        near = difflib.get_close_matches(name.lower(), list(lower), n=1)
        if near:
            return f"; did you mean {module_name}.{lower[near[0]]}?"
    return ""


def _config_values(args: list[str]) -> list[str]:
    """The values of the ``--config`` / ``-c`` options in ``args``."""
    values = []
    for i, token in enumerate(args):
        name, equals, value = token.partition("=")
        if name in ("--config", "-c"):
            values += [value] if equals else args[i + 1:i + 2]
    return values


def _is_strategy_file(config: dict[str, Any]) -> bool:
    """A strategy (or ablation) file: ``timesteps`` and at most the run's name (``trainer.logger``), nothing a
    base config sets (model, data, the other trainer values, callbacks)."""
    trainer = config.get("trainer")
    only_name = trainer is None or (isinstance(trainer, dict) and set(trainer) <= {"logger"})
    return set(config) <= {"timesteps", "trainer"} and only_name


def _is_base(config: dict[str, Any]) -> bool:
    """A base config: it sets the model or the data (a file with only trainer or callback keys overrides)."""
    return bool({"model", "data"} & set(config))


def _strategy_class(value: Any) -> str | None:
    """The class name a ``timesteps`` value sets ('' for null, None for init_args only, which merge); a list's
    names joined by " + "."""
    if isinstance(value, list):
        return " + ".join(_strategy_class(item) or "?" for item in value)
    if isinstance(value, dict):
        if "class_path" not in value:
            return None
        value = value["class_path"]
    return "" if value is None else str(value).rsplit(".", 1)[-1]


class UsageError(ValueError):
    """A mistake in the command line or its config files that parsing would report unclearly: reported as a usage
    error (exit status 2) before parsing."""


class ConfigFileError(UsageError):
    """A ``--config`` file that is not a YAML mapping."""


def _load_config(value: str) -> tuple[str, Any]:
    """(name to show, parsed content) of one ``--config`` value: a file, or inline YAML.

    A file that is not YAML, or holds no mapping (empty, a list), raises ``ConfigFileError`` naming the file and
    the line: jsonargparse's own report names neither ("Unexpected config:")."""
    if os.path.isfile(value):
        try:
            text = Path(value).read_text()
        except OSError:
            return value, None  # jsonargparse reports an unreadable config itself
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigFileError(f"Config file {value} is not valid YAML{where}: {problem}. Fix the file there "
                                  "(YAML indents with spaces, never tabs).") from None
        if not isinstance(config, dict):
            holds = "nothing" if config is None else f"a {type(config).__name__}"
            raise ConfigFileError(f"Config file {value} holds {holds}, not a mapping of settings (keys such as "
                                  "trainer:, model:, data:, timesteps:). Give a config file, or leave this one out.")
        return value, config
    try:
        return f"--config {value!r}", yaml.safe_load(value)
    except yaml.YAMLError:
        return value, None


_StrategySet = tuple[str, str, bool]  # (where it was set, class name, set by a strategy file or an option)


def timesteps_args(args: list[str]) -> list[str]:
    """Check the time-step strategies that config files and options set, in their order; ``args`` to parse.

    jsonargparse merges each later ``timesteps`` into the earlier one: a new class keeps every argument
    of the old one that it also takes (jsonargparse does this on purpose, so that shared settings need
    not be repeated). Our strategies share names that mean different things (SpeeD's ``k`` 5 is a
    suppression ratio, P2's ``k`` an offset with default 1), so a merge across classes is a silent
    wrong run. Hence:

    - a config file that sets another class than an earlier file or option is refused: one run trains
      one strategy (``--config speed.yaml --config p2.yaml`` would train P2 with SpeeD's ``tau``);
    - a strategy file (``timesteps`` and the run name only), or an override file (no ``model`` or ``data``
      keys), may set the same class (its arguments merge), only ``init_args``, or ``null``
      (``strategies/uniform.yaml``: the uniform baseline of a config that has a strategy);
    - a base config (``model`` or ``data`` keys) that sets ``timesteps`` after a strategy file or option set
      one is refused: that is a base given after the strategy file (``--config speed.yaml --config
      fashion_mnist.yaml`` would train the base's ``null``, the uniform baseline, or its own SpeeD
      arguments over the strategy file's);
    - ``--timesteps NewClass`` / ``--timesteps.class_path NewClass`` on the command line starts NewClass
      from its own defaults: a ``--timesteps null`` is put before it, so nothing of the earlier class
      carries over. That is what naming a class means to a user, and it matches a strategy file, which
      gives every argument. ``--timesteps.init_args.*`` given before such a switch would be dropped, so
      they are refused: give them after the class.
    """
    out: list[str] = []
    unset = set(SpeedCLI.CALLBACK_KEYS)  # callback keys that are null (their default) so far
    current: _StrategySet | None = None
    pending: list[str] = []  # --timesteps.init_args.* options for the current class
    i = 0
    while i < len(args):
        token = args[i]
        name, _, inline = token.partition("=")
        value = inline if inline or "=" in token else (args[i + 1] if i + 1 < len(args) else None)
        width = 1 if "=" in token else 2
        if name in ("--config", "-c") and value is not None:
            where, config = _load_config(value)
            if isinstance(config, dict):
                _check_callback_arguments(where, config, unset)
            if isinstance(config, dict) and "timesteps" in config:
                current = _check_config_strategy(where, config, current)
                pending = []
            out += args[i:i + width]
            i += width
            continue
        key = name[2:].split(".")[0]
        if key in unset and name.startswith(f"--{key}.") and not name.startswith((f"--{key}.class_path", f"--{key}.help")):
            raise UsageError(
                f"The option {name} sets an argument of {key}, but {key} is null before it (no such callback in this "
                f"run): name its class first, e.g. --{key} {SpeedCLI.CALLBACK_KEYS[key].__name__} {name} VALUE."
            )
        if key in SpeedCLI.CALLBACK_KEYS and name in (f"--{key}", f"--{key}.class_path") and value is not None:
            (unset.add if value in ("null", "None", "") else unset.discard)(key)
        if name in ("--timesteps", "--timesteps.class_path") and value is not None:
            try:
                parsed = yaml.safe_load(value) if name == "--timesteps" else value
            except yaml.YAMLError:
                parsed = value  # jsonargparse reports it
            new = _strategy_class(parsed)
            option = f"{name} {value}"
            if new == "":
                current, pending = None, []
            elif new is not None and (current is None or current[1] != new):
                if current is not None:
                    if pending:
                        raise UsageError(
                            f"{' '.join(pending)} came before {option}, which starts {new} from its own defaults "
                            f"(nothing of {current[1]} carries over): give {new}'s arguments after it, e.g. "
                            f"{option} --timesteps.init_args.<name> VALUE."
                        )
                    out += ["--timesteps", "null"]  # a clean start: no argument of the earlier class kept
                current, pending = (option, new, True), []
            out += args[i:i + width]
            i += width
            continue
        if token.startswith("--timesteps."):
            if current is None and name != "--timesteps.help":
                raise UsageError(
                    f"No time-step strategy class is set for {name} (timesteps is null: uniform t, as a base config "
                    f"alone trains): give a strategy file or the class before it, e.g. --timesteps SpeeD {name} {'VALUE' if value is None else value}."
                )
            pending.append(token if "=" in token else f"{token} {value}")
        out.append(token)
        i += 1
    return out


def _check_config_strategy(where: str, config: dict[str, Any], current: _StrategySet | None) -> _StrategySet | None:
    """The strategy after config file ``where`` (see ``timesteps_args``); raises for a file that replaces it."""
    new = _strategy_class(config["timesteps"])
    if new is None and current is None:
        raise UsageError(
            f"Config file {where} sets arguments of the time-step strategy (timesteps: without class_path), but no "
            "strategy class is set before it (a base config's timesteps: null is uniform t): give the class_path "
            "there, or compose the file after a strategy file."
        )
    if new is None or current is None:  # init_args only (merge), or nothing set before
        return current if new is None or new == "" else (where, new, _is_strategy_file(config))
    strategy_file = _is_strategy_file(config)
    if new and new != current[1]:
        if current[2] or not os.path.isfile(current[0]):  # a strategy file or an option set it
            fix = ("Give one strategy file per run, after the base config; change its arguments with "
                   "--timesteps.init_args.<name> VALUE.")
        else:  # a config that trains its own strategy (quickstart.yaml)
            fix = (f"To train {new} with {current[0]} instead, put configs/strategies/uniform.yaml before {where} "
                   f"(it clears {current[1]}), or give the class on the command line: --timesteps {new}.")
        raise UsageError(
            f"{where} sets timesteps {new}, but {current[0]} already set {current[1]}: one run trains with one "
            "time-step strategy, and the later one would silently replace the earlier one, keeping any argument "
            f"the two share (such as tau). {fix}"
        )
    if strategy_file or not _is_base(config):  # an override file given last on purpose, like a strategy file
        return None if new == "" else current  # null: the uniform baseline; the same class: its arguments merge
    if new == "" or current[2]:
        what = "timesteps: null (the uniform baseline)" if new == "" else f"own {new} arguments"
        then = current[0] if current[0].startswith("-") else f"--config {current[0]}"
        raise UsageError(
            f"{where} is a base config, and it comes after {current[0]}, which set timesteps {current[1]}: "
            f"the base's {what} would silently replace the strategy's. Give the base config first, then the "
            f"strategy: --config {where} {then}. (For the uniform baseline, put configs/strategies/uniform.yaml "
            "or --timesteps null last.)"
        )
    return current  # a base that sets the class a base before it set: its arguments merge


def _check_callback_arguments(where: str, config: dict[str, Any], unset: set[str]) -> None:
    """A config file that sets arguments of a callback key (``ema: {init_args: ...}``, as study/ema_warmup.yaml) that
    is null so far: jsonargparse built the key's class from its defaults plus those arguments, turning on a callback
    the configuration had turned off (an EMA of decay 0.999 after ``ema: null``). ``unset`` is updated."""
    for key in SpeedCLI.CALLBACK_KEYS:
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, dict) and "class_path" not in value:
            if key in unset:
                raise UsageError(
                    f"Config file {where} sets arguments of {key} ({key}: without class_path), but {key} is null "
                    f"before it (the configuration has no such callback): compose the file after a config that sets "
                    f"{key}, or give the class_path there ({SpeedCLI.CALLBACK_KEYS[key].__module__}."
                    f"{SpeedCLI.CALLBACK_KEYS[key].__name__})."
                )
        elif value is None:
            unset.add(key)
        else:
            unset.discard(key)


def check_one_strategy(files: list[str]) -> None:
    """Refuse config files that replace one another's time-step strategy (see ``timesteps_args``)."""
    timesteps_args([token for path in files for token in ("--config", path)])


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    """A nested config (dicts) as {dotted key: value}."""
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _leaves(sub, f"{prefix}.{key}").items()}
    return {prefix: value}


class RunConfigCallback(SaveConfigCallback):
    """Writes the run's ``config.yaml`` when training starts, never over another run's.

    Lightning's callback writes it in ``setup``: a run pointed at an existing run folder (say with
    ``--trainer.logger.init_args.version 0``) that then failed at setup had already replaced that
    run's config.yaml. Here nothing is written before training starts, an identical config.yaml is
    left as it is, and a different one is kept: this run's goes to ``config-1.yaml`` (the next free
    number) instead. Without a logger it goes next to the run's checkpoints, or nowhere (``_folder``).
    """

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":  # validate / test / predict: no training start to wait for
            self._write(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._write(trainer)

    @staticmethod
    def _folder(trainer: Trainer) -> str | None:
        """Where the config goes: the logger's run folder (Lightning's convention, ``trainer.log_dir``).

        Without a logger (``--trainer.logger false``) there is no run folder, and ``trainer.log_dir`` is
        ``default_root_dir``, the current folder: every run there added a config.yaml, config-1.yaml,
        config-2.yaml, ... Then the config goes next to the checkpoints the run saves (``config_near``
        finds it for ``--ckpt_path``), and a run that saves none (validate, test, predict, ``fast_dev_run``,
        ``--trainer.enable_checkpointing false``) writes no config: it leaves no results for it to describe.
        """
        if trainer.loggers:
            return trainer.log_dir  # broadcast from rank 0
        if trainer.state.fn != "fit" or trainer.fast_dev_run:
            return None
        folders = [c.dirpath for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]  # set in their setup
        return folders[0] if folders else None

    def _write(self, trainer: Trainer) -> None:
        if self.already_saved:
            return
        log_dir = self._folder(trainer)
        if self.save_to_log_dir and log_dir is not None and trainer.is_global_zero:
            text = self.parser.dump(self.config, skip_none=False)
            folder = Path(log_dir)
            folder.mkdir(parents=True, exist_ok=True)
            stem, suffix = os.path.splitext(self.config_filename)
            path, number = folder / self.config_filename, 0
            while path.exists() and path.read_text() != text:
                number += 1
                path = folder / f"{stem}-{number}{suffix}"
            if number:
                print(
                    f"{folder / self.config_filename} belongs to an earlier run and is kept; this run's "
                    f"configuration is in {path.name}.",
                    file=sys.stderr,
                )
            if not path.exists():
                path.write_text(text)
            self.config_path = str(path)
        if trainer.is_global_zero:
            self.save_config(trainer, trainer.lightning_module, "fit")
        self.already_saved = bool(trainer.strategy.broadcast(True))


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder on ``folder``'s path that does not exist yet (None: it exists)."""
    missing = None
    while not folder.exists() and folder != folder.parent:
        missing, folder = folder, folder.parent
    return missing


def check_devices(config: dict[str, Any]) -> None:
    """``devices: -1`` (every GPU, as configs/multi_gpu/ asks) on a machine without one: Lightning falls back to the
    CPU and refuses -1 with a message about CPUAccelerator, which says nothing of the missing GPU."""
    if str(config.get("devices")) == "-1" and config.get("accelerator") in (None, "auto", "gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                "trainer.devices: -1 asks for every GPU, but this machine has none (torch.cuda.is_available() is "
                "False). Run it where there are GPUs, or try it on CPU processes: --trainer.accelerator cpu "
                "--trainer.devices 2."
            )


def check_trainer_values(trainer: Trainer) -> None:
    """Trainer values Lightning accepts but cannot use: a negative clipping value turns clipping off without a
    word, and a validation interval of 0 fails with a ZeroDivisionError after the first step."""
    clip = trainer.gradient_clip_val
    if clip is not None and not float(clip) >= 0:
        raise ValueError(f"trainer.gradient_clip_val must be >= 0 (or null for no clipping), got {clip}.")
    if trainer.val_check_interval == 0:
        raise ValueError(
            "trainer.val_check_interval must be > 0: a number of steps, or a fraction of an epoch in (0, 1]; to "
            "validate never, set trainer.limit_val_batches: 0."
        )


def check_output_folders(trainer: Trainer) -> None:
    """Folders the callbacks and the logger will write into must be folders that exist or can be created: else
    the first write fails (a sample grid, a checkpoint) after the training it should have saved. Missing ones
    are created here, as the first write would."""
    owners: list[Any] = [*trainer.callbacks, *trainer.loggers]
    for owner in owners:
        for attribute in ("dirpath", "save_dir", "cache_dir"):
            folder = getattr(owner, attribute, None)
            if not isinstance(folder, (str, os.PathLike)):
                continue
            name = f"{type(owner).__name__}.{attribute}"
            check_folder(folder, name)
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as err:
                raise ValueError(f"{name} is {folder}, which cannot be created ({err.strerror}): give a writable "
                                 "folder.") from None


def _warn_unused(why: str, changed: list[str]) -> None:
    """One warning naming the configured values that resuming from a checkpoint replaces (``changed``: a line each)."""
    if changed:
        warnings.warn(
            f"{why}, so these configured values are not used:\n" + "\n".join(changed)
            + "\nTo train with the configured values, start a new run (no --ckpt_path) or load only the weights.",
            UserWarning, stacklevel=3,
        )


# Model arguments whose None the module resolves itself and records resolved (prediction: epsilon on a DDPM):
# a checkpoint's value for them differs from a configured None without the configuration having chosen otherwise.
_RESOLVED_WHEN_NONE = {"model.prediction"}


class SpeedCLI(LightningCLI):
    """LightningCLI with TensorBoard logging by default and the data's shape linked into the model."""

    # Callbacks with their own top-level config keys. A later --config file merges into these keys
    # (a strategy file sets only ``timesteps``), whereas it would replace a whole trainer.callbacks list.
    # Each key takes any subclass of its class, or null for none.
    CALLBACK_KEYS: dict[str, type[Callback]] = {
        "monitor": TimestepMonitor,
        "ema": EMAWeightAveraging,
        "samples": SampleGridCallback,
        "fid": FIDCallback,
        "final_fid": FIDCallback,  # a second FID, e.g. more samples and another solver at the end only
        "checkpoint": ModelCheckpoint,
    }

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test: a diffusion model has nothing to predict from a data set (``predict`` failed after
        loading the checkpoint, asking for a ``forward`` method); it generates with sample grids and FID."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        parser.link_arguments("data.image_shape", "model.image_shape", apply_on="instantiate")
        parser.add_argument(
            "--timesteps", type=Optional[Union[Strategy, list[Strategy]]], default=None,
            help="The time-step strategy (lightning_speed.timesteps: SpeeD, P2Weighting, ...), or a list of one "
            "sampling and one weighting strategy; installed by a TimestepCallback. null: uniform t, unit weights.",
        )
        for key, base in self.CALLBACK_KEYS.items():
            parser.add_lightning_class_args(base, key, subclass_mode=True, required=False)
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "lightning_speed", "default_hp_metric": False},
                }
            }
        )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Install ``timesteps`` with a TimestepCallback, first; leave out the callback keys set to null (LightningCLI
        would pass their None to the Trainer)."""
        check_devices(config)
        strategies = self._get(self.config_init, "timesteps")
        installs = [] if strategies is None else [TimestepCallback(strategies)]
        configured = config.get("callbacks") or []
        given = [c for c in (configured if isinstance(configured, list) else [configured]) if isinstance(c, TimestepCallback)]
        if len(installs + given) > 1:
            where = (["timesteps: " + ", ".join(map(repr, installs[0].strategies))] if installs else []) + [
                f"trainer.callbacks: {c!r}" for c in given]
            raise ValueError(
                f"Time-step strategies are set {len(where)} times ({'; '.join(where)}), but one run trains with one: "
                "keep the top-level timesteps: key (a list for a sampling and a weighting strategy) and remove the "
                "others from trainer.callbacks."
            )
        return super()._instantiate_trainer(config, [*installs, *(c for c in callbacks if c is not None)])

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured Trainer plus the two safety callbacks every run gets (unless configured already), with
        ``StepProgressBar`` in place of Lightning's default bar.

        ``DivergenceGuard`` goes first, so at the end of training it checks before evaluation
        callbacks sample from the model; ``CheckpointOnSignal`` saves a checkpoint on SIGTERM/SIGINT.
        """
        trainer = super().instantiate_trainer(**kwargs)
        check_trainer_values(trainer)
        missing = [cls() for cls in (DivergenceGuard, CheckpointOnSignal) if not any(isinstance(c, cls) for c in trainer.callbacks)]
        trainer.callbacks[:0] = missing
        for i, callback in enumerate(trainer.callbacks):  # Lightning's default bar: one that counts steps instead
            if type(callback) is TQDMProgressBar:
                trainer.callbacks[i] = StepProgressBar(callback.refresh_rate, callback.process_position)
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Check the strategies the config files and options set (``timesteps_args``), then parse.

        ``args=None`` (the command) parses sys.argv here: LightningCLI would warn about ``args`` given
        while sys.argv has arguments, and the ``--timesteps null`` that ``timesteps_args`` may insert
        must reach the parser."""
        if isinstance(args, dict) or hasattr(args, "as_dict"):
            return super().parse_arguments(parser, args)
        given = list(sys.argv[1:] if args is None else args)
        try:
            checked = timesteps_args(given)
        except UsageError as err:
            parser.error(str(err))
        if args is not None and len(sys.argv) > 1:
            return super().parse_arguments(parser, checked)  # LightningCLI's warning
        self.config = parser.parse_args(checked)

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` first: LightningCLI reads the checkpoint's hyperparameters here, right
        after parsing, and a file that is not a checkpoint failed inside ``torch.load``.

        LightningCLI then puts the checkpoint's model hyperparameters over the configured ones. A value
        the configuration gave differently would change without a word (``--model.schedule cosine`` on a
        linear checkpoint trains on linear): each such value is named in a warning.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return super()._parse_ckpt_path()
        check_checkpoint_file(self.config[subcommand].get("ckpt_path"))
        before = _leaves(self.config[subcommand]["model"].as_dict(), "model")
        super()._parse_ckpt_path()
        after = _leaves(self.config[subcommand]["model"].as_dict(), "model")
        changed = [f"  {key}: configured {before[key]!r}, checkpoint {after[key]!r}"
                   for key in before if key in after and after[key] != before[key]
                   and not (key in _RESOLVED_WHEN_NONE and before[key] is None)]
        if before.get("model.process") != after.get("model.process") and "model.process" in after:
            raise ValueError(
                f"--ckpt_path {self.config[subcommand]['ckpt_path']} holds a {after['model.process']} model, but the "
                f"configuration trains a {before.get('model.process')} model (model.process): resume it with its own "
                "config.yaml (runs/<name>/version_N/config.yaml), or start a new run without --ckpt_path."
            )
        _warn_unused(f"--ckpt_path {self.config[subcommand]['ckpt_path']} was trained with other model hyperparameters, "
                     "and LightningCLI restores the checkpoint's", changed)

    def _check_ckpt_path(self) -> dict[str, Any] | None:
        """A ``--ckpt_path`` that is not a checkpoint, or one of another model size: a short, clear error. Returns the
        loaded checkpoint (memory-mapped; None without a local one) for the checks that read it further."""
        ckpt_path = self._get(self.config_init, "ckpt_path")
        if ckpt_path is None:
            return None
        check_checkpoint_file(str(ckpt_path))
        return check_checkpoint_matches(self.model, str(ckpt_path))

    def _name_optimizer_changes(self, ckpt_path: str, checkpoint: dict[str, Any]) -> None:
        """Resuming restores the checkpoint's optimizer and LR scheduler state over the configured ones: a changed
        ``--model.optimizer.init_args.lr`` would not be used. Each such setting is named in a warning, as
        ``_parse_ckpt_path`` names the model's."""
        changed = [f"  model.{name.replace('.', '.init_args.', 1)}: configured {ours!r}, checkpoint {theirs!r}"
                   for name, theirs, ours in optimizer_changes(self.model, checkpoint)]
        _warn_unused(f"--ckpt_path {ckpt_path} holds the state of an optimizer configured otherwise, and resuming "
                     "restores it", changed)

    def _name_strategy_change(self, ckpt_path: str, checkpoint: dict[str, Any]) -> None:
        """Resuming with another time-step strategy than the checkpoint's trains on with the configured one, from the
        checkpoint's step: forgetting the strategy file (``--config fashion_mnist.yaml --ckpt_path ...``) turned a
        SpeeD run into a uniform one, with nothing but Lightning's note on a callback state it could not place."""
        theirs = trained_strategies(checkpoint, ckpt_path)
        installed = " + ".join(c.name for c in self.trainer.callbacks if isinstance(c, TimestepCallback))
        ours = yaml.safe_load(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False))
        ours = ours.get("timesteps") if isinstance(ours, dict) else None
        if isinstance(theirs, str) or (ours is None and installed):  # class names only
            before, after = describe_strategies(theirs, arguments=False), installed or NO_STRATEGY
        else:
            before, after = describe_strategies(theirs), describe_strategies(ours)
        if before == after:
            return
        lost = ("" if describe_strategies(theirs, arguments=False) == (installed or NO_STRATEGY) else
                ", and the checkpoint's strategy state (sampler's random stream, loss history, curriculum step) is "
                "not used")
        config = config_near(Path(ckpt_path))
        same = f" (or resume with the run's config: --config {config} --ckpt_path {ckpt_path})" if config else ""
        warnings.warn(
            f"--ckpt_path {ckpt_path} was trained with the time-step strategy {before}, but this run trains with "
            f"{after}: the strategy changes at step {checkpoint.get('global_step', '?')}"
            f"{lost}. To resume the same training, give the strategy file it was trained with after the base "
            f"config{same}.",
            UserWarning, stacklevel=2,
        )

    def _check_evaluates_a_checkpoint(self) -> None:
        self._check_ckpt_path()
        if self._get(self.config_init, "ckpt_path") is None:
            warnings.warn(
                f"{self.subcommand} without --ckpt_path evaluates the model's initial, untrained weights; pass "
                "--ckpt_path runs/<name>/version_N/checkpoints/last.ckpt to evaluate a trained model.",
                UserWarning, stacklevel=2,
            )

    def before_validate(self) -> None:
        self._check_evaluates_a_checkpoint()

    def before_test(self) -> None:
        self._check_evaluates_a_checkpoint()

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit``; a run that fails before its first step takes its new log folder with it when that holds
        nothing but what every run writes at its start (TensorBoard's event file, config.yaml, hparams.yaml)."""
        logs = {Path(d) for d in (getattr(log, "log_dir", None) for log in self.trainer.loggers) if d}
        new = [f for f in map(_first_missing, logs) if f is not None]  # what this run creates on each log folder's path
        try:
            self.trainer.fit(**kwargs)
        except BaseException:
            if self.trainer.global_step == 0:
                for folder in new:
                    files = [f for f in folder.rglob("*") if f.is_file()]
                    if all(f.name in ("config.yaml", "hparams.yaml") or f.name.startswith("events.out.tfevents")
                           for f in files):
                        shutil.rmtree(folder, ignore_errors=True)
            raise

    def before_fit(self) -> None:
        """Check ``--ckpt_path``; under ``fast_dev_run`` write no checkpoint.

        Lightning 2.6's ``ModelCheckpoint(save_last=True)`` still saves ``last.ckpt`` at train end
        in a fast_dev_run, and with the logger disabled that lands in ``./checkpoints``.
        """
        checkpoint = self._check_ckpt_path()  # loaded once for every check of the resume
        if checkpoint is not None:
            ckpt_path = str(self._get(self.config_init, "ckpt_path"))
            self._name_optimizer_changes(ckpt_path, checkpoint)
            self._name_strategy_change(ckpt_path, checkpoint)
        check_output_folders(self.trainer)
        if self.trainer.fast_dev_run:
            for callback in self.trainer.checkpoint_callbacks:
                if hasattr(callback, "save_last"):
                    callback.save_last = False


def main(args: list[str] | None = None, run: bool = True, prog: str | None = None) -> SpeedCLI:
    """Build (and by default run) the CLI; returns it, so scripts can read its trainer and model.

    ``run=False`` parses and instantiates without running (``args`` then has no subcommand),
    for scripts that adjust the trainer before calling ``fit`` themselves. ``prog``: the command that
    usage and help name (None: the program's file name, as argparse does).
    """
    return SpeedCLI(
        DiffusionModule,
        subclass_mode_data=True,
        parser_class=SpeedArgumentParser,
        parser_kwargs={"prog": prog} if prog else None,
        save_config_callback=RunConfigCallback,
        args=args,  # None: LightningCLI reads sys.argv itself (passing it too makes it warn)
        auto_configure_optimizers=False,
        run=run,
    )


def _raised_here(error: BaseException) -> bool:
    """Was ``error`` raised by lightning_speed's own code (its innermost frame is in this package)?"""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(PACKAGE_DIR + os.sep)


def library_error(error: BaseException) -> BaseException:
    """The exception whose message names the problem: the outermost one raised by lightning_speed in
    ``error``'s chain of causes, else the innermost cause.

    A class built from the config that refuses its arguments raises inside jsonargparse, which
    re-raises "Does not validate against any of the Union subtypes" with the real message inside.
    """
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return next((e for e in chain if _raised_here(e)), chain[-1])


def console(prog: str | None = None) -> None:
    """The ``lightning-speed`` command and ``python -m lightning_speed`` (which passes that as ``prog``: argparse
    would name the file, ``__main__.py``).

    Errors: the message of the library's own error first (``error: ...``), then the traceback.
    A diverged run prints its message alone. Exit status: 0 when the run finished, 1 on an error
    or divergence, 2 on a usage error, 128 + the signal number when stopped by SIGTERM / SIGINT
    (with a checkpoint, see ``CheckpointOnSignal``).

    Returns None: the console-script wrapper calls ``sys.exit(console())``, and a returned CLI
    object would make every successful run exit with status 1.
    """
    try:
        main(prog=prog)
    except DivergenceError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(1)
    except Exception as err:  # noqa: BLE001 - reported and turned into the exit status
        cause = library_error(err)
        sys.stderr.write(f"error: {type(cause).__name__}: {cause}\n\nDetails:\n")
        traceback.print_exc()
        sys.stderr.write(f"\nerror: {type(cause).__name__}: {cause}\n")
        sys.exit(1)


if __name__ == "__main__":
    console(prog="python -m lightning_speed.cli")
