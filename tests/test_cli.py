"""The ``lightning-speed`` CLI: entry points, clear errors, run folders, and the quickstart as a user runs it.

Every shipped config (each base with each strategy) trains one CPU step in tests/test_configs.py.
"""

from __future__ import annotations

import configparser
import importlib
import math
import re
import runpy
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_speed.cli import console, main
from lightning_speed.metrics.features import INCEPTION_FILENAME, InceptionWeightsUnavailable
from lightning_speed.module import DiffusionModule

from _fixtures import write_fake_cifar  # pytest puts tests/ on sys.path (no __init__.py there)
from benchmarks.common import smoke_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
QUICKSTART = REPO / "configs" / "quickstart.yaml"
CPU_FAST = [
    "--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
]  # fmt: skip


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any training step fail loudly, to prove a configuration error surfaced before training."""

    def training_step(self: DiffusionModule, batch: Any, batch_idx: int) -> None:
        raise AssertionError("a training step ran before the configuration error was reported")

    monkeypatch.setattr(DiffusionModule, "training_step", training_step)


def quickstart_args(tmp_path: Path) -> list[str]:
    """``fit`` arguments for a CPU fast_dev_run of the quickstart, logging under tmp_path."""
    return ["fit", "--config", str(QUICKSTART), *CPU_FAST, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]


def test_cifar10_config_needs_inception_weights_offline(cli_env: Path, no_training: None) -> None:
    """The CIFAR-10 config asks for the standard Inception: offline, a clear error before training."""
    tmp_path = cli_env
    path = REPO / "configs" / "cifar10.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["fid"]["init_args"].get("feature_extractor", "inception") == "inception"
    write_fake_cifar(tmp_path / "cifar", per_batch=4, n_test=8)
    args = ["fit", "--config", str(path), "--trainer.fast_dev_run", "true",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            *smoke_args(config["model"]["backbone"]["class_path"]),
            "--data.init_args.root", str(tmp_path / "cifar"), "--data.init_args.download", "false",
            "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4", "--data.init_args.val_images", "4"]
    with pytest.raises(InceptionWeightsUnavailable) as err:
        main(args)
    message = str(err.value)
    assert INCEPTION_FILENAME in message
    assert str(tmp_path / "torch-home") in message  # where to put the file
    assert "feature_extractor: fashion_mnist" in message  # the offline alternative


def test_a_run_that_fails_before_its_first_step_leaves_no_log_folder(cli_env: Path, no_training: None) -> None:
    """The FID callback's Inception is unavailable offline: setup fails after TensorBoard wrote its event file. The
    run's new version folder goes with it; a folder that was there before, with a file of its own, stays."""
    args = ["fit", "--config", str(QUICKSTART), "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--samples", "null", "--fid.init_args.feature_extractor", "inception",
            "--trainer.logger.init_args.save_dir", str(cli_env / "runs")]
    with pytest.raises(InceptionWeightsUnavailable):
        main(args)
    assert not (cli_env / "runs" / "quickstart").exists()
    kept = cli_env / "runs" / "quickstart" / "version_0" / "notes.txt"
    kept.parent.mkdir(parents=True)
    kept.write_text("mine")
    with pytest.raises(InceptionWeightsUnavailable):
        main(args)  # logs into version_1, created and removed
    assert kept.read_text() == "mine" and sorted(p.name for p in kept.parent.parent.iterdir()) == ["version_0"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_the_multi_gpu_config_on_a_machine_without_gpus_says_so(cli_env: Path) -> None:
    args = ["--config", str(QUICKSTART), "--config", str(REPO / "configs" / "multi_gpu" / "ddp.yaml"),
            "--trainer.logger.init_args.save_dir", str(cli_env / "runs")]
    with pytest.raises(ValueError, match=r"trainer.devices: -1 asks for every GPU, but this machine has none.*"
                                         r"--trainer.accelerator cpu --trainer.devices 2"):
        main(args, run=False)


# ------------------------------------------------------------------------------ the entry points
def test_module_help_exits_zero(cli_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m lightning_speed fit --help``: the package's ``__main__`` run in this process (runpy), not in a new one
    that imports torch again; tests/test_signals.py starts ``python -m lightning_speed`` as a process of its own."""
    monkeypatch.setattr(sys, "argv", ["python -m lightning_speed", "fit", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("lightning_speed", run_name="__main__", alter_sys=True)
    assert exit_info.value.code in (0, None)  # exit status 0
    out = capsys.readouterr().out
    for option in ("--config", "--print_config", "--model.schedule", "--trainer.callbacks", "--data"):
        assert option in out


@pytest.mark.parametrize("entry", ["python -m lightning_speed", "python -m lightning_speed.cli", "lightning-speed"])
def test_help_names_the_command_a_user_types(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], entry: str
) -> None:
    """argparse names the program by its file: ``python -m`` runs ``lightning_speed/__main__.py``, the console script
    ``bin/lightning-speed``."""
    monkeypatch.setattr(sys, "argv", ["/venv/bin/lightning-speed", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        if entry == "lightning-speed":
            console()
        else:  # runpy sets argv[0] to the module's file, as python -m does
            runpy.run_module(entry.split()[-1], run_name="__main__", alter_sys=True)
    assert exit_info.value.code in (0, None)
    usage = " ".join(capsys.readouterr().out.split())  # argparse wraps a long program name
    assert usage.startswith(f"usage: {entry} [-c CONFIG] {{fit,validate,test}}")


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
    monkeypatch.setattr(sys, "argv", ["lightning-speed", *quickstart_args(cli_env)])
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(console())
    assert exit_info.value.code is None


# ------------------------------------------------------------------------------- bad configuration
@pytest.mark.parametrize(
    "config, extra, error, fragments",
    [
        ("quickstart.yaml", ["--model.schedule", "banana"], ValueError, ["'banana'", "linear", "cosine"]),
        ("quickstart.yaml", ["--model.backbone.init_args.in_channels", "3"], ValueError, ["(1, 32, 32)", "in_channels"]),
        ("quickstart.yaml", ["--model.num_timesteps", "500", "--model.backbone.init_args.num_timesteps", "500"],
         ValueError, ["tau=700", "T=500", "auto"]),
        ("fashion_mnist.yaml", ["--data.init_args.root", "/nonexistent"], FileNotFoundError,
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


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
@pytest.mark.parametrize("option, full", [("--trainer.max_step", "--trainer.max_steps"), ("--conf", "--config")])
def test_an_abbreviated_option_is_refused_not_expanded(
    cli_env: Path, no_training: None, capsys: pytest.CaptureFixture[str], subcommand: str, option: str, full: str
) -> None:
    """argparse would take ``--trainer.max_step 2`` for ``--trainer.max_steps 2`` without a word."""
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(QUICKSTART), option, "2" if option == "--trainer.max_step" else str(QUICKSTART),
              "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith(f"error: unrecognized arguments: {option} ") and first.endswith(f"did you mean {full}?")
    with pytest.raises(SystemExit) as exit_info:  # the full names still work
        main([subcommand, "-c", str(QUICKSTART), "--trainer.max_steps", "2", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "max_steps: 2\n" in capsys.readouterr().out


def test_the_analysis_command_reports_a_value_out_of_range_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/timestep_analysis.md's command: a tau beyond T is a usage error naming the range and the fix."""
    from lightning_speed.analysis import main as analysis

    with pytest.raises(SystemExit) as exit_info:
        analysis(["--schedule", "cosine", "--tau", "2000"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("use a value in [1, 999], or 'auto' for 959).")


# ---------------------------------------------------------------------------------- the quickstart
def test_quickstart_trains_and_writes_logs_checkpoint_samples_and_fid(cli_env: Path) -> None:
    """configs/quickstart.yaml through the CLI, with its output folder moved, 60 of its 400 steps (the loss logged
    every 10 steps; the grid and validation at the last step, as the full run makes its last ones) and DDIM-5 instead
    of DDIM-20 for the grid and the FID's 256 samples, to keep the suite within CI's time: every artefact of the
    README's first command."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torchvision.io import read_image

    from lightning_speed.timesteps import SpeeD

    tmp_path = cli_env
    config = yaml.safe_load(QUICKSTART.read_text())
    max_steps, log_every = 60, 10
    assert config["trainer"]["max_steps"] > max_steps and log_every * 5 <= max_steps
    assert config["monitor"]["init_args"]["log_every_n_steps"] <= max_steps  # the monitor logs within the run
    cli = main([
        "fit", "--config", str(QUICKSTART), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false", "--trainer.max_steps", str(max_steps),
        "--trainer.log_every_n_steps", str(log_every), "--trainer.val_check_interval", str(max_steps),
        "--samples.init_args.every_n_steps", str(max_steps), "--samples.init_args.solver_steps", "5",
        "--fid.init_args.solver_steps", "5",
    ])  # fmt: skip
    trainer, model = cli.trainer, cli.model
    assert trainer.global_step == max_steps
    assert isinstance(model.timesteps.sampler, SpeeD) and model.timesteps.weights is model.timesteps.sampler

    version_dir = tmp_path / "runs" / "quickstart" / "version_0"
    assert Path(trainer.log_dir) == version_dir
    assert list(version_dir.glob("events.out.tfevents.*"))

    # ModelCheckpoint has no dirpath in the YAML, so it follows the logger: <version>/checkpoints.
    ckpt_dir = Path(trainer.checkpoint_callback.dirpath)
    assert ckpt_dir == version_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    assert last.is_file()
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == max_steps
    # the README's table: last.ckpt beside epoch=...-step=N.ckpt
    assert [p.name for p in ckpt_dir.glob(f"epoch=*-step={max_steps}.ckpt")] == [f"epoch=0-step={max_steps}.ckpt"]

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
    assert "hp_metric" not in events.Tags()["scalars"]  # no placeholder (default_hp_metric: false) beside the curves


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
    study_doc = (REPO / "docs" / "configs.md").read_text()  # configs/study/ is listed there, the rest in the README
    for path in CONFIGS:
        names = (path.name, str(path.relative_to(REPO / "configs")), str(path.relative_to(REPO)))
        study = path.parent.name == "study"
        assert any(f"`{name}`" in (study_doc if study else readme) for name in names), \
            f"{'docs/configs.md' if study else 'README'}'s config tables lack {path.relative_to(REPO)}"


def test_readme_and_docs_links_point_to_existing_files_and_headings() -> None:
    """Every relative link of README.md and docs/*.md names a file that exists, and a heading there if it has #."""
    import re

    def anchors(page: Path) -> set[str]:  # GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens
        headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}

    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) > 5
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.is_file(), f"{page.relative_to(REPO)} links to a missing {target}"
            assert not anchor or anchor in anchors(linked), f"{page.relative_to(REPO)}: no heading for {target}"


# ------------------------------------------------------------------- errors said first and clearly
FAST = ["--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


def run_console(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[Any, str]:
    """Run the ``lightning-speed`` entry point; (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lightning-speed", *args])
    with pytest.raises(SystemExit) as exit_info:
        console()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "config, status, headline",
    [
        ("fid:\n  class_path: lightning_speed.callbacks.FIDCallback\n  init_args: {sampling_steps: 20}\n", 2,
         "error: fid: FIDCallback: Option 'sampling_steps' is not accepted"),
        ("fid:\n  class_path: lightning_speed.callbacks.FIDCallback\n  init_args: {solver: rk4}\n", 2,
         "error: fid: FIDCallback: solver: Expected a typing.Literal['ddim', 'ddpm', 'dpmpp_2m'] or typing.Literal['euler', 'heun']. Got value: rk4"),
        ("model:\n  optimizer:\n    class_path: torch.optim.AdamW\n    init_args: {lr: fast}\n", 2,
         "error: model.optimizer: lr: Expected a <class 'float'>"),
    ],
    ids=["unknown-argument", "unknown-solver", "lr-not-a-number"],
)  # fmt: skip
def test_config_errors_show_the_innermost_message_first(
    cli_env: Path, no_training: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    config: str, status: int, headline: str,
) -> None:  # fmt: skip
    """jsonargparse buries these under ~40 lines ("Does not validate against any of the Union subtypes")."""
    bad = cli_env / "bad.yaml"
    bad.write_text(config)
    code, err = run_console(["fit", "--config", str(QUICKSTART), "--config", str(bad), *FAST], monkeypatch, capsys)
    assert code == status
    first_error = next(line for line in err.splitlines() if line.startswith("error:"))
    assert first_error.startswith(headline), err[-3000:]
    details = [err.find(marker) for marker in ("Traceback", "usage:", "Does not validate") if marker in err]
    assert details and err.index(first_error) < min(details)  # the message before the details, which are kept


@pytest.mark.parametrize(
    "text, headline",
    [
        ("trainer:\n  max_steps: 3\n   bad: [\n", "is not valid YAML, line 3, column 7: mapping values are not allowed here"),
        ("trainer:\n\tmax_steps: 3\n", "is not valid YAML, line 2, column 1: found character '\\t'"),
        ("", "holds nothing, not a mapping of settings"),
        ("- trainer\n", "holds a list, not a mapping of settings"),
    ],
    ids=["syntax", "tab", "empty", "list"],
)  # fmt: skip
def test_a_config_file_that_is_not_a_yaml_mapping_is_named_with_its_line(
    cli_env: Path, no_training: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    text: str, headline: str,
) -> None:  # fmt: skip
    """jsonargparse's headline names no file, and for an empty one says only "Unexpected config:"."""
    bad = cli_env / "bad.yaml"
    bad.write_text(text)
    code, err = run_console(["fit", "--config", str(QUICKSTART), "--config", str(bad), *FAST], monkeypatch, capsys)
    assert code == 2
    assert err.splitlines()[0].startswith(f"error: Config file {bad} {headline}"), err[:500]


@pytest.mark.parametrize(
    "subcommand, text, key, near",
    [
        (["fit"], "trainer: {max_stepz: 5}\n", "trainer.max_stepz", "trainer.max_steps"),
        ([], "trainer: {max_stepz: 5}\n", "trainer.max_stepz", "trainer.max_steps"),  # main(run=False): no subcommand
        (["fit"], "model:\n  schedul: cosine\n", "model.schedul", "model.schedule"),
        (["fit"], "traner:\n  max_steps: 5\n", "traner.max_steps", "trainer.max_steps"),
    ],
    ids=["fit", "no-subcommand", "model-key", "top-level-key"],
)  # fmt: skip
def test_a_mistyped_key_in_a_config_file_names_the_file_and_the_nearest_key(
    cli_env: Path, no_training: None, capsys: pytest.CaptureFixture[str],
    subcommand: list[str], text: str, key: str, near: str,
) -> None:  # fmt: skip
    """jsonargparse says "Subcommand 'fit' does not accept option 'trainer.max_stepz'" (without a subcommand: "Group
    'trainer' does not accept option 'max_stepz'"), naming neither the file nor the key meant."""
    bad = cli_env / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main([*subcommand, "--config", str(QUICKSTART), "--config", str(bad), *FAST], run=bool(subcommand))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"error: Config file {bad} sets {key}, which is not an option: did you mean {near}?", err[:500]


def test_ckpt_path_to_a_text_file_says_what_the_file_is(cli_env: Path, no_training: None) -> None:
    notes = cli_env / "notes.txt"
    notes.write_text("lr 0.002 looked best\n")
    with pytest.raises(ValueError) as err:  # torch.load said "IndexError: pop from empty list"
        main(["fit", "--config", str(QUICKSTART), *FAST, "--ckpt_path", str(notes)])
    message = str(err.value)
    assert f"--ckpt_path {notes} is not a checkpoint: it is a text file of 21 bytes starting with 'lr 0.002 looked best'" in message
    assert "runs/<name>/version_N/checkpoints/last.ckpt" in message  # what to give instead


def test_a_cut_off_checkpoint_is_named_as_one(cli_env: Path, no_training: None) -> None:
    """torch.save's zip archive cut in half (a copy or save that did not finish): refused as cut off, not as 'not a
    checkpoint'; the whole file is accepted by the same check."""
    whole = cli_env / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, whole)
    half = cli_env / "half.ckpt"
    half.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"--ckpt_path {half} looks cut off or corrupt: .*Copy it again"):
        main(["fit", "--config", str(QUICKSTART), *FAST, "--ckpt_path", str(half)])
    from lightning_speed.checkpoints import check_checkpoint_file

    check_checkpoint_file(whole)


def test_strategies_set_both_under_timesteps_and_in_trainer_callbacks_are_refused(cli_env: Path) -> None:
    """SpeeD under timesteps: (the quickstart's) and again as a callback: one error naming both places, before
    training, instead of Lightning's note on duplicate stateful callbacks."""
    from lightning_speed.callbacks import TimestepCallback

    twice = cli_env / "twice.yaml"
    twice.write_text("trainer:\n  callbacks:\n    - class_path: lightning_speed.callbacks.SpeeD\n"
                     "      init_args: {tau: 700, k: 5.0}\n")
    with pytest.raises(ValueError, match=r"Time-step strategies are set 2 times \(timesteps: SpeeD\(tau=700.*; "
                                         r"trainer.callbacks: TimestepCallback\(SpeeD.*remove the others"):
        main(["--config", str(QUICKSTART), "--config", str(twice), *FAST], run=False)
    alone = main(["--config", str(QUICKSTART), "--config", str(twice), "--timesteps", "null", *FAST], run=False)
    assert sum(isinstance(c, TimestepCallback) for c in alone.trainer.callbacks) == 1


def test_checkpoint_of_another_backbone_size_gets_a_short_summary(cli_env: Path, no_training: None) -> None:
    small = main(["--config", str(QUICKSTART), "--model.backbone.init_args.base_channels", "8"], run=False).model
    run_dir = cli_env / "runs" / "small" / "version_0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("# the configuration the checkpoint was trained with\n")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": small.state_dict(), "global_step": 10}, ckpt)
    with pytest.raises(ValueError) as err:
        main(["fit", "--config", str(QUICKSTART), *FAST, "--ckpt_path", str(ckpt)])
    message = str(err.value)
    lines = message.splitlines()
    assert lines[0].startswith(f"The checkpoint {ckpt} was trained with another model configuration: ")
    assert "tensors have other shapes" in lines[0]
    import re

    shown = [re.fullmatch(r"  ([\w.]+): checkpoint (\([\d, ]+\)), model (\([\d, ]+\))", line) for line in lines[1:]]
    shown = [m for m in shown if m]
    assert 1 <= len(shown) <= 4 and all(m[2] != m[3] for m in shown)  # a few keys, each with both shapes
    assert f"lightning-speed fit --config {run_dir / 'config.yaml'} --ckpt_path {ckpt}" in message
    assert len(lines) <= 7  # a summary, not one line per tensor


def test_a_run_pointed_at_an_earlier_run_folder_never_changes_its_files(cli_env: Path, no_training: None) -> None:
    run_dir = cli_env / "runs" / "quickstart" / "version_0"
    earlier = {"config.yaml": b"# the earlier run's configuration\n", "hparams.yaml": b"lr: 0.002\n",
               "checkpoints/last.ckpt": b"\x80 earlier weights", "events.out.tfevents.1.host": b"events"}  # fmt: skip
    for name, data in earlier.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_bytes(data)
    pointed = [
        "fit", "--config", str(QUICKSTART), "--trainer.accelerator", "cpu",
        "--trainer.logger.init_args.save_dir", str(cli_env / "runs"), "--trainer.logger.init_args.version", "0",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="in_channels"):  # fails at setup, after the run folder is known
        main([*pointed, "--model.backbone.init_args.in_channels", "3"])
    after = {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert {name: after.get(name) for name in earlier} == earlier  # byte-identical, config.yaml included
    # Lightning opens a TensorBoard writer before the setup hooks, so an empty events file may be added.
    assert all(name.startswith("events.out.tfevents.") for name in set(after) - set(earlier))


def test_a_run_that_trains_in_an_earlier_run_folder_keeps_its_config(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = cli_env / "runs" / "quickstart" / "version_0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("# the earlier run's configuration\n")
    main([
        "fit", "--config", str(QUICKSTART), "--trainer.accelerator", "cpu", "--trainer.max_steps", "1",
        "--trainer.logger.init_args.save_dir", str(cli_env / "runs"), "--trainer.logger.init_args.version", "0",
        "--trainer.enable_progress_bar", "false", "--fid", "null", "--samples", "null", "--checkpoint", "null",
    ])  # fmt: skip
    assert (run_dir / "config.yaml").read_text() == "# the earlier run's configuration\n"
    assert yaml.safe_load((run_dir / "config-1.yaml").read_text())["trainer"]["max_steps"] == 1
    assert f"{run_dir / 'config.yaml'} belongs to an earlier run and is kept; this run's configuration is in config-1.yaml" in capsys.readouterr().err


# ------------------------------------------------------------- values the parser or Lightning let through
@pytest.mark.parametrize(
    "config, fragments",
    [
        ("trainer:\n  precision: bf17-mixed\n",  # a union of Literals: every alternative, so the valid strings show
         ["error: trainer.precision: Expected a <class 'int'> or typing.Literal[", "'bf16-mixed'", "Got value: bf17-mixed"]),
        ("model:\n  optimizer: torch.optim.Adamw\n",  # the reason, not the search
         ["error: model.optimizer: module 'torch.optim' has no attribute 'Adamw'. Got value: torch.optim.Adamw"]),
    ],
    ids=["precision-typo", "optimizer-typo"],
)  # fmt: skip
def test_union_errors_name_every_alternative_and_the_reason(
    cli_env: Path, no_training: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    config: str, fragments: list[str],
) -> None:  # fmt: skip
    bad = cli_env / "bad.yaml"
    bad.write_text(config)
    code, err = run_console(["fit", "--config", str(QUICKSTART), "--config", str(bad), *FAST], monkeypatch, capsys)
    first_error = next(line for line in err.splitlines() if line.startswith("error:"))
    assert code == 2 and all(fragment in first_error for fragment in fragments), first_error


def test_a_strategy_file_alone_is_told_to_come_after_a_base_config(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_console(["fit", "--config", str(REPO / "configs" / "strategies" / "speed.yaml")], monkeypatch, capsys)
    first_error = next(line for line in err.splitlines() if line.startswith("error:"))
    assert code == 2 and "model.backbone" in first_error
    assert "give the base config first, e.g. --config configs/fashion_mnist.yaml --config configs/strategies/speed.yaml" in first_error


def test_a_config_file_that_replaces_another_files_strategy_is_refused(
    cli_env: Path, no_training: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_speed.cli import check_one_strategy

    strategies = REPO / "configs" / "strategies"
    base = str(REPO / "configs" / "fashion_mnist.yaml")
    with pytest.raises(SystemExit) as exit_info:  # before: trained with P2 alone, SpeeD dropped without a word
        main(["fit", "--config", base, "--config", str(strategies / "speed.yaml"), "--config", str(strategies / "p2.yaml")])
    assert exit_info.value.code == 2  # a usage error: the message, no traceback
    assert capsys.readouterr().err.startswith(
        f"error: {strategies / 'p2.yaml'} sets timesteps P2Weighting, but {strategies / 'speed.yaml'} already set SpeeD")
    with pytest.raises(ValueError, match="p2.yaml sets timesteps P2Weighting, but .*quickstart.yaml already set SpeeD"):
        check_one_strategy([str(QUICKSTART), str(strategies / "p2.yaml")])
    # what composes: a base's null first, the same class again, a file of init_args only, null (the uniform
    # baseline, test_configs), and after a null another class
    args_only = cli_env / "k2.yaml"
    args_only.write_text("timesteps:\n  init_args: {k: 2.0}\n")
    check_one_strategy([base, str(strategies / "speed.yaml"), str(strategies / "speed_k2.yaml"), str(args_only)])
    check_one_strategy([str(QUICKSTART), str(strategies / "uniform.yaml"), str(strategies / "p2.yaml")])
    check_one_strategy([base, str(strategies / "speed.yaml"), "{timesteps: null}"])  # inline YAML, like uniform.yaml
    from lightning_speed.cli import timesteps_args

    with pytest.raises(ValueError, match="p2.yaml sets timesteps P2Weighting"):  # -c and --config= are config files too
        timesteps_args(["fit", "-c", str(QUICKSTART), "--config=" + str(strategies / "p2.yaml")])
    # a list of strategies (one per role) is one strategy of the run too
    study = REPO / "configs" / "study" / "speed_sampling_min_snr.yaml"
    with pytest.raises(ValueError, match="speed_sampling_min_snr.yaml sets timesteps SpeeD [+] MinSNRWeighting, but "
                                         ".*speed.yaml already set SpeeD"):
        check_one_strategy([base, str(strategies / "speed.yaml"), str(study)])
    check_one_strategy([str(QUICKSTART), str(strategies / "uniform.yaml"), str(study)])


def test_a_base_config_after_a_strategy_file_is_refused(
    cli_env: Path, no_training: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: ``--config speed.yaml --config fashion_mnist.yaml`` trained the base's ``timesteps: null`` (the uniform
    baseline, named uniform) and dropped SpeeD without a word; a base of the same class put its arguments over the
    strategy file's (speed_k2.yaml's k 2 became quickstart's 5)."""
    from lightning_speed.cli import check_one_strategy

    strategies = REPO / "configs" / "strategies"
    base, speed = REPO / "configs" / "fashion_mnist.yaml", strategies / "speed.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(speed), "--config", str(base)])
    assert exit_info.value.code == 2  # a usage error: the message, no traceback
    message = capsys.readouterr().err.split("\n(the usage")[0]
    assert message.startswith("error: ")
    assert f"{base} is a base config, and it comes after {speed}, which set timesteps SpeeD" in message
    assert "timesteps: null (the uniform baseline) would silently replace" in message
    assert f"Give the base config first, then the strategy: --config {base} --config {speed}" in message
    with pytest.raises(ValueError, match=r"quickstart.yaml is a base config, .*speed_k2.yaml, which set timesteps SpeeD: "
                                         r"the base's own SpeeD arguments would silently replace"):
        check_one_strategy([str(strategies / "speed_k2.yaml"), str(QUICKSTART)])
    # still composes: the base first; uniform.yaml after a config with a strategy (its uniform baseline)
    cli = main(["--config", str(QUICKSTART), "--config", str(strategies / "uniform.yaml")], run=False)
    assert cli.config["timesteps"] is None and cli.config["trainer"]["logger"]["init_args"]["name"] == "uniform"
    # an override file (no model or data keys) given last on purpose merges into the strategy, as a strategy file does
    override = cli_env / "override.yaml"
    override.write_text("trainer: {max_steps: 3}\ntimesteps: {class_path: lightning_speed.timesteps.SpeeD, init_args: {tau: 800}}\n")
    cli = main(["--config", str(base), "--config", str(speed), "--config", str(override)], run=False)
    assert cli.config["timesteps"]["init_args"]["tau"] == 800 and cli.config["trainer"]["max_steps"] == 3


def test_a_strategy_class_named_on_the_command_line_starts_from_its_own_defaults(cli_env: Path, no_training: None) -> None:
    """Before: ``--timesteps P2Weighting`` after quickstart.yaml's SpeeD (k 5) kept k 5 for P2 (default 1): jsonargparse
    keeps the arguments a new class shares with the old one, and SpeeD's k and P2's k mean different things."""
    from lightning_speed.callbacks import TimestepCallback
    from lightning_speed.cli import timesteps_args
    from lightning_speed.timesteps import P2Weighting

    def strategy(*extra: str) -> dict[str, Any]:
        config = main(["--config", str(QUICKSTART), *extra], run=False).config["timesteps"]
        return {"class": config["class_path"].rsplit(".", 1)[-1], **config["init_args"].as_dict()}

    assert strategy("--timesteps", "P2Weighting") == {"class": "P2Weighting", "k": 1.0, "gamma": 1.0, "scale": 1.0}
    cli = main(["--config", str(QUICKSTART), "--timesteps.class_path=lightning_speed.timesteps.P2Weighting",
                "--timesteps.init_args.gamma", "2"], run=False)  # fmt: skip
    (callback,) = (c for c in cli.trainer.callbacks if isinstance(c, TimestepCallback))
    (p2,) = callback.strategies
    assert isinstance(p2, P2Weighting) and (p2.k, p2.gamma) == (1.0, 2.0)
    assert strategy("--timesteps", "{class_path: P2Weighting, init_args: {gamma: 3}}")["k"] == 1.0
    # the same class: its arguments still merge into the config's
    same = strategy("--timesteps", "SpeeD", "--timesteps.init_args.k", "3")
    assert same["class"] == "SpeeD" and (same["k"], same["tau"], same["lam"]) == (3.0, 700, 0.6)
    with pytest.raises(ValueError, match=re.escape(
        "--timesteps.init_args.k 3 came before --timesteps P2Weighting, which starts P2Weighting from its own defaults"
    )):  # it would be dropped
        timesteps_args(["fit", "--config", str(QUICKSTART), "--timesteps.init_args.k", "3", "--timesteps", "P2Weighting"])
    with pytest.raises(ValueError, match=r"speed.yaml sets timesteps SpeeD, but --timesteps P2Weighting already set P2Weighting"):
        timesteps_args(["--config", str(QUICKSTART), "--timesteps", "P2Weighting", "--config",
                        str(REPO / "configs" / "strategies" / "speed.yaml")])  # fmt: skip
    # a list on the command line: one sampling and one weighting strategy
    cli = main(["--config", str(QUICKSTART), "--timesteps", "[{class_path: LogitNormalSampling}, {class_path: MinSNRWeighting}]"],
               run=False)  # fmt: skip
    (callback,) = (c for c in cli.trainer.callbacks if isinstance(c, TimestepCallback))
    assert callback.name == "LogitNormalSampling + MinSNRWeighting"
    with pytest.raises(ValueError, match="Only one sampling strategy can be active, but 2 are given: SpeeD, LogitNormalSampling"):
        main(["--config", str(QUICKSTART), "--timesteps", "[{class_path: SpeeD}, {class_path: LogitNormalSampling}]"],
             run=False)  # fmt: skip


def test_an_integer_batch_limit_is_a_number_of_batches(cli_env: Path, no_training: None) -> None:
    """``limit_val_batches: 1`` is one batch, as in Lightning's Python API; jsonargparse made it 1.0 (all batches), since
    the Trainer types it ``float | int | None`` and tries float first."""
    limits = cli_env / "limits.yaml"
    limits.write_text("trainer:\n  limit_test_batches: 1\n  limit_predict_batches: 1.0\n")
    trainer = main(["--config", str(QUICKSTART), "--config", str(limits), "--trainer.limit_val_batches", "1",
                    "--trainer.limit_train_batches", "0.5"], run=False).trainer  # fmt: skip
    limits_set = {name: getattr(trainer, name) for name in
                  ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")}  # fmt: skip
    assert limits_set == {"limit_train_batches": 0.5, "limit_val_batches": 1, "limit_test_batches": 1, "limit_predict_batches": 1.0}
    assert [type(v) for v in limits_set.values()] == [float, int, int, float]


def test_a_run_without_a_logger_writes_its_config_next_to_its_checkpoints_only(cli_env: Path) -> None:
    """``--trainer.logger false``: no run folder, so Lightning's log_dir is the current folder, and each run added a
    config.yaml, config-1.yaml, ... there. The config now goes where the run's checkpoints go, or nowhere."""
    run = ["fit", "--config", str(QUICKSTART), "--trainer.accelerator", "cpu", "--trainer.max_steps", "1",
           "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--fid", "null", "--samples", "null"]  # fmt: skip
    main([*run, "--checkpoint.init_args.dirpath", str(cli_env / "ckpts")])
    assert (cli_env / "ckpts" / "last.ckpt").is_file()
    assert yaml.safe_load((cli_env / "ckpts" / "config.yaml").read_text())["trainer"]["max_steps"] == 1
    main([*run, "--checkpoint", "null", "--trainer.enable_checkpointing", "false"])  # saves nothing: no config
    main(["validate", "--config", str(QUICKSTART), *FAST, "--trainer.logger", "false"])
    configs = sorted(str(p.relative_to(cli_env)) for p in cli_env.rglob("config*.yaml"))
    assert configs == [str(Path("ckpts") / "config.yaml")]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--trainer.gradient_clip_val", "-1"], "trainer.gradient_clip_val must be >= 0"),  # Lightning: clipping off
        (["--trainer.val_check_interval", "0"], "trainer.val_check_interval must be > 0"),  # Lightning: 1/0 at step 1
        (["--checkpoint.init_args.dirpath", "a_file"], "a_file, which is a file, not a folder"),  # made absolute
        (["--samples.init_args.save_dir", "a_file"], "SampleGridCallback.save_dir is a_file, which is a file"),
        (["--samples.init_args.save_dir", "a_file/grids"], "save_dir is a_file/grids, which cannot be created"),
    ],
    ids=["negative-clip", "val-interval-0", "checkpoint-dir-is-a-file", "grid-dir-is-a-file", "grid-dir-under-a-file"],
)  # fmt: skip
def test_trainer_values_and_output_folders_that_would_fail_late_fail_first(
    cli_env: Path, no_training: None, extra: list[str], fragment: str
) -> None:
    (cli_env / "a_file").write_text("not a folder\n")
    steps = ["--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]  # fast_dev_run
    with pytest.raises(ValueError, match=re.escape(fragment)):  # would reset val_check_interval
        main(["fit", "--config", str(QUICKSTART), *steps, "--trainer.logger.init_args.save_dir", str(cli_env), *extra])


def test_a_checkpoints_hyperparameters_that_override_configured_values_are_named(cli_env: Path) -> None:
    import lightning

    model = main(["--config", str(QUICKSTART)], run=False).model
    ckpt = cli_env / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": lightning.__version__,
                "hyper_parameters": {"schedule": "linear"}}, ckpt)
    evaluate = ["validate", "--config", str(QUICKSTART), *FAST, "--trainer.logger", "false", "--ckpt_path", str(ckpt)]
    with pytest.warns(UserWarning, match="model.schedule: configured 'cosine', checkpoint 'linear'"):
        main([*evaluate, "--model.schedule", "cosine"])  # LightningCLI uses the checkpoint's linear
    with warnings.catch_warnings():  # the same value configured: nothing to say
        warnings.filterwarnings("error", message=".*trained with other model hyperparameters")
        main(evaluate)


def test_resuming_a_checkpoint_of_the_other_process_is_refused(cli_env: Path) -> None:
    """A DDPM checkpoint under the flow config: LightningCLI would restore process ddpm and train a DDPM."""
    import lightning

    model = main(["--config", str(QUICKSTART)], run=False).model
    ckpt = cli_env / "ddpm.ckpt"
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": lightning.__version__,
                "hyper_parameters": {"process": "ddpm"}}, ckpt)
    with pytest.raises(ValueError, match=r"holds a ddpm model, but the configuration trains a flow model "
                                         r"\(model.process\): resume it with its own config.yaml"):
        main(["fit", "--config", str(QUICKSTART), *FAST, "--model.process", "flow", "--ckpt_path", str(ckpt)])


def test_validate_without_a_checkpoint_says_it_evaluates_untrained_weights(cli_env: Path) -> None:
    with pytest.warns(UserWarning, match="validate without --ckpt_path evaluates the model's initial, untrained weights"):
        main(["validate", "--config", str(QUICKSTART), *FAST, "--trainer.logger", "false"])


def test_resuming_names_the_optimizer_settings_the_checkpoint_replaces(cli_env: Path) -> None:
    """Lightning restores the optimizer's and the LR scheduler's state over the configured ones on resume."""
    run = ["fit", "--config", str(QUICKSTART), *FAST[2:], "--trainer.fast_dev_run", "false", "--trainer.max_steps", "1",
           "--trainer.logger", "false", "--trainer.limit_val_batches", "0", "--trainer.enable_model_summary", "false",
           "--samples", "null", "--fid", "null", "--checkpoint.init_args.dirpath", str(cli_env / "ckpt"),
           "--model.lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--model.lr_scheduler.init_args.step_size", "100"]
    main(run)  # lr 0.002, gamma 0.1
    resume = [*run, "--ckpt_path", str(cli_env / "ckpt" / "last.ckpt")]
    with pytest.warns(UserWarning, match="holds the state of an optimizer configured otherwise") as record:
        cli = main([*resume, "--model.optimizer.init_args.lr", "1e9", "--model.lr_scheduler.init_args.gamma", "0.5"])
    message = next(str(w.message) for w in record if "configured otherwise" in str(w.message))
    assert "  model.optimizer.init_args.lr: configured 1000000000.0, checkpoint 0.002\n" in message
    assert "  model.lr_scheduler.init_args.gamma: configured 0.5, checkpoint 0.1\n" in message
    assert "weight_decay" not in message and "betas" not in message  # only what differs
    group = cli.trainer.optimizers[0].param_groups[0]
    assert group["initial_lr"] == 0.002 and cli.trainer.lr_scheduler_configs[0].scheduler.gamma == 0.1  # as said
    with warnings.catch_warnings():  # resumed as configured: nothing to say
        warnings.filterwarnings("error", message=".*optimizer configured otherwise")
        main(resume)
