"""The ``lightning-speed`` CLI: every shipped config runs, prints and fails clearly; the quickstart trains.

Every YAML in configs/ is picked up by glob, so a new config is tested without editing this file.
Configs run a CPU ``fast_dev_run`` with small overrides (tiny backbone, batch 8, fp32, no compile);
the quickstart runs in full, as a user would run it.
"""

from __future__ import annotations

import configparser
import importlib
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_speed.callbacks.strategies import LossWeightingCallback, TimestepSamplingCallback
from lightning_speed.cli import console, main
from lightning_speed.metrics import features as features_module
from lightning_speed.metrics import reference as reference_module
from lightning_speed.metrics.features import INCEPTION_FILENAME, InceptionWeightsUnavailable
from lightning_speed.module import DiffusionModule

from _fixtures import write_fake_cifar  # pytest puts tests/ on sys.path (no __init__.py there)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
QUICKSTART = REPO / "configs" / "quickstart.yaml"
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CPU_FAST = [
    "--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
    "--model.compile", "false",
]  # fmt: skip


def have_fashion_mnist() -> bool:
    return all((FASHION_ROOT / f).is_file() or (FASHION_ROOT / (f + ".gz")).is_file() for f in FASHION_FILES)


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the CLI inside tmp_path: no network, FID statistics cached in tmp_path, no stray argv."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-speed"])  # main(args=...) must not see pytest's arguments
    monkeypatch.setattr(reference_module, "DEFAULT_CACHE_DIR", tmp_path / "fid-cache")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no Inception file from a real cache

    def offline(url: str, dst: Path, timeout: float) -> None:
        raise OSError("network disabled in the test suite")

    monkeypatch.setattr(features_module, "_download", offline)
    return tmp_path


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any training step fail loudly, to prove a configuration error surfaced before training."""

    def training_step(self: DiffusionModule, batch: Any, batch_idx: int) -> None:
        raise AssertionError("a training step ran before the configuration error was reported")

    monkeypatch.setattr(DiffusionModule, "training_step", training_step)


# ------------------------------------------------------------------------------ shrinking a config
def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def backbone_overrides(spec: dict[str, Any]) -> list[str]:
    """Small-model overrides for the known backbones (the configs' models are GPU-sized)."""
    name, init = _short(spec["class_path"]), spec.get("init_args") or {}
    prefix = "--model.backbone.init_args."
    if name == "UNet":
        return [prefix + "base_channels", "16", prefix + "num_res_blocks", "1"]
    if name == "DiT":
        heads = int(init.get("num_heads", 6))
        return [prefix + "hidden_size", str(8 * heads), prefix + "depth", "1"]
    return []


def data_overrides(spec: dict[str, Any], tmp_path: Path) -> list[str]:
    """Small, CPU-safe, offline data for the known data modules; skip when real files are missing."""
    name, init = _short(spec["class_path"]), spec.get("init_args") or {}
    prefix = "--data.init_args."
    small = [prefix + "batch_size", "8", prefix + "val_images", "8"]
    if name == "EmbeddedFashionMNISTDataModule":
        return small
    if name == "FashionMNISTDataModule":
        if init.get("root") is None and not have_fashion_mnist():
            pytest.skip(f"Fashion-MNIST is not installed in {FASHION_ROOT} (apt-get install -y dataset-fashion-mnist)")
        return [*small, prefix + "download", "false"]
    if name == "CIFAR10DataModule":
        write_fake_cifar(tmp_path / "cifar", per_batch=4, n_test=8)
        return [
            prefix + "root", str(tmp_path / "cifar"), prefix + "download", "false", prefix + "num_workers", "0",
            prefix + "batch_size", "8", prefix + "val_images", "4",
        ]  # fmt: skip
    pytest.fail(f"test_cli.py does not know how to run {spec['class_path']} offline on a CPU: add it to data_overrides")


def uses_inception(config: dict[str, Any]) -> bool:
    for cb in config.get("trainer", {}).get("callbacks") or []:
        if _short(cb["class_path"]) == "FIDCallback" and (cb.get("init_args") or {}).get("feature_extractor", "inception") == "inception":
            return True
    return False


def offline_copy(path: Path, tmp_path: Path) -> Path:
    """The config with every FIDCallback's feature extractor set to the shipped offline network.

    jsonargparse can only override init_args of the *last* callback in a list from the command
    line, so the FID callback (not last) is changed in a copy of the YAML instead.
    """
    config = yaml.safe_load(path.read_text())
    for cb in config["trainer"]["callbacks"]:
        if _short(cb["class_path"]) == "FIDCallback":
            cb.setdefault("init_args", {})["feature_extractor"] = "fashion_mnist"
    out = tmp_path / f"offline_{path.name}"
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def fast_dev_args(path: Path, tmp_path: Path) -> list[str]:
    """``fit`` arguments for a CPU fast_dev_run of ``path`` (the config itself, minus size)."""
    config = yaml.safe_load(path.read_text())
    args = ["fit", "--config", str(path), *CPU_FAST]
    logger = config.get("trainer", {}).get("logger")
    if isinstance(logger, dict) and "class_path" in logger:
        args += ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    args += backbone_overrides(config["model"]["backbone"])
    args += data_overrides(config["data"], tmp_path)
    return args


# ------------------------------------------------------------------------------------ every config
def test_configs_are_found() -> None:
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "fashion_mnist_speed.yaml", "fashion_mnist_uniform.yaml", "cifar10_uniform.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_fast_dev_run(path: Path, cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path = cli_env

    def no_sampling(self: DiffusionModule, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("a callback sampled images in a fast_dev_run (FID / sample grids must skip it)")

    monkeypatch.setattr(DiffusionModule, "sample", no_sampling)
    config = yaml.safe_load(path.read_text())
    args = fast_dev_args(path, tmp_path)
    if uses_inception(config):  # offline: the standard Inception is tested separately below
        args[2] = str(offline_copy(path, tmp_path))
    cli = main(args)
    trainer, model = cli.trainer, cli.model
    assert trainer.fast_dev_run and trainer.global_step == 1

    # Every time-step strategy the config lists is the one the training step used.
    for cb in trainer.callbacks:
        if isinstance(cb, TimestepSamplingCallback):
            assert model.timestep_sampler is cb.strategy
        if isinstance(cb, LossWeightingCallback):
            assert model.loss_weighting is cb.strategy
    listed = Counter(_short(cb["class_path"]) for cb in config["trainer"].get("callbacks") or [])
    assert Counter(type(cb).__name__ for cb in trainer.callbacks if type(cb).__name__ in listed) == listed

    # fast_dev_run is a one-batch check: no FID, no sample grids, no checkpoints, no files anywhere.
    assert "fid" not in trainer.callback_metrics
    written = [p for p in tmp_path.rglob("*") if p.suffix in (".ckpt", ".png") or p.name == "config.yaml"]
    assert written == [], f"fast_dev_run wrote {written}"
    assert not (tmp_path / "checkpoints").exists()


def test_cifar10_config_needs_inception_weights_offline(cli_env: Path, no_training: None) -> None:
    """The CIFAR-10 config asks for the standard Inception: offline, a clear error before training."""
    tmp_path = cli_env
    path = REPO / "configs" / "cifar10_uniform.yaml"
    assert uses_inception(yaml.safe_load(path.read_text()))
    with pytest.raises(InceptionWeightsUnavailable) as err:
        main(fast_dev_args(path, tmp_path))
    message = str(err.value)
    assert INCEPTION_FILENAME in message
    assert str(tmp_path / "torch-home") in message  # where to put the file
    assert "feature_extractor: fashion_mnist" in message  # the offline alternative


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_print_config(path: Path, cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(path.read_text())
    assert printed["model"]["backbone"]["class_path"] == source["model"]["backbone"]["class_path"]
    assert printed["data"]["class_path"] == source["data"]["class_path"]
    assert printed["trainer"]["max_steps"] == source["trainer"]["max_steps"]
    assert [cb["class_path"] for cb in printed["trainer"]["callbacks"]] == [
        cb["class_path"] for cb in source["trainer"]["callbacks"]
    ]
    # print_config shows every constructor argument, defaults included.
    assert "schedule" in printed["model"] and "sampling_steps" in printed["model"]


# ------------------------------------------------------------------------------ the entry points
def test_module_help_exits_zero(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_speed", "fit", "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for option in ("--config", "--print_config", "--model.schedule", "--trainer.callbacks", "--data"):
        assert option in proc.stdout


def test_console_script_is_declared() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = dict(
        line.split("=", 1) for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    )
    target = {k.strip(): v.strip() for k, v in scripts.items()}["lightning-speed"]
    assert target == "lightning_speed.cli:console"
    module, _, attr = target.partition(":")
    assert getattr(importlib.import_module(module), attr) is console


def test_console_entry_returns_none_so_the_command_exits_zero(cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrapper does ``sys.exit(console())``: anything but None/0 is a failed command."""
    monkeypatch.setattr(sys, "argv", ["lightning-speed", *fast_dev_args(QUICKSTART, cli_env)])
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(console())
    assert exit_info.value.code is None


# ------------------------------------------------------------------------------- bad configuration
@pytest.mark.parametrize(
    "config, extra, error, fragments",
    [
        ("quickstart.yaml", ["--model.schedule", "banana"], ValueError, ["'banana'", "linear", "cosine"]),
        ("quickstart.yaml", ["--model.backbone.init_args.in_channels", "3"], ValueError, ["(1, 32, 32)", "in_channels"]),
        ("quickstart.yaml", ["--model.num_timesteps", "500"], ValueError, ["tau=700", "T=500", "auto"]),
        ("fashion_mnist_uniform.yaml", ["--data.init_args.root", "/nonexistent"], FileNotFoundError,
         ["/nonexistent", "apt-get install -y dataset-fashion-mnist"]),
    ],
    ids=["unknown-schedule", "backbone-data-channels", "tau-not-below-T", "missing-data-root"],
)  # fmt: skip
def test_bad_config_fails_before_training(
    cli_env: Path, no_training: None, config: str, extra: list[str], error: type[Exception], fragments: list[str]
) -> None:
    args = ["fit", "--config", str(REPO / "configs" / config), *CPU_FAST, "--trainer.logger.init_args.save_dir", str(cli_env)]
    with pytest.raises(error) as err:
        main(args + extra)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_unknown_option_is_a_usage_error(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--model.scheduel", "linear"])
    assert exit_info.value.code not in (0, None)
    assert "scheduel" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- the quickstart
def test_quickstart_trains_and_writes_logs_checkpoint_samples_and_fid(cli_env: Path) -> None:
    """configs/quickstart.yaml as a user runs it (only the output folder moved): a short SpeeD training."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torchvision.io import read_image

    from lightning_speed.timesteps.speed import AsymmetricSampler, ChangeAwareWeights

    tmp_path = cli_env
    config = yaml.safe_load(QUICKSTART.read_text())
    max_steps = config["trainer"]["max_steps"]
    cli = main([
        "fit", "--config", str(QUICKSTART), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    trainer, model = cli.trainer, cli.model
    assert trainer.global_step == max_steps
    assert isinstance(model.timestep_sampler, AsymmetricSampler)
    assert isinstance(model.loss_weighting, ChangeAwareWeights)

    version_dir = tmp_path / "runs" / "quickstart" / "version_0"
    assert Path(trainer.log_dir) == version_dir
    assert list(version_dir.glob("events.out.tfevents.*"))

    # ModelCheckpoint has no dirpath in the YAML, so it follows the logger: <version>/checkpoints.
    ckpt_dir = Path(trainer.checkpoint_callback.dirpath)
    assert ckpt_dir == version_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    assert last.is_file()
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == max_steps

    grid = read_image(str(version_dir / f"samples_step{max_steps}.png"))
    assert grid.shape[0] == 3 and min(grid.shape[1:]) >= 8 * 32
    assert grid.float().std() > 0  # not a blank image

    events = EventAccumulator(str(version_dir), size_guidance={"scalars": 0})
    events.Reload()
    fid_events = events.Scalars("fid")
    assert [e.step for e in fid_events] == [max_steps]
    fid = fid_events[0].value
    assert math.isfinite(fid) and fid > 0
    assert float(trainer.callback_metrics["fid"]) == pytest.approx(fid, rel=1e-5)
    loss = [e.value for e in events.Scalars("train/loss")]
    assert len(loss) >= 5 and loss[-1] < loss[0]  # it learned something
    assert "timesteps/share/convergence" in events.Tags()["scalars"]  # the monitor saw SpeeD's sampling


# ------------------------------------------------------------------------------------ the README
def test_readme_commands_match_ci_and_list_every_config() -> None:
    import re

    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert first_block is not None
    commands = first_block.group(1).strip().splitlines()
    assert len(commands) == 2
    assert commands[0].endswith("lightning-speed fit --config configs/quickstart.yaml")
    assert commands[1].endswith('pip install -e ".[dev]" && pytest')
    assert 'pip install -q -e ".[dev]" && pytest' in (REPO / ".ci" / "run").read_text()  # CI runs the same
    for path in CONFIGS:
        assert f"`{path.name}`" in readme, f"README's config table lacks {path.name}"
