"""A user's runs from YAML: resuming with other settings, the subcommands, add-on files on bases they do not fit.

Each test parses and instantiates only, or trains nothing before the point it checks.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning
import pytest
import torch

from lightning_speed.cli import SpeedCLI, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = str(CONFIGS / "quickstart.yaml")
UNIFORM = str(CONFIGS / "strategies" / "uniform.yaml")
CPU = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.logger", "false",
       "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip


def first_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The exit status 2 of a usage error, and the first line of its report."""
    with pytest.raises(SystemExit) as exit_info:
        main(args, prog="lightning-speed")
    assert exit_info.value.code == 2
    return next(line for line in capsys.readouterr().err.splitlines() if line.startswith("error:"))


@pytest.fixture
def no_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's ``fit`` does nothing: what it checks before (``before_fit``) is what is tested."""
    monkeypatch.setattr(SpeedCLI, "fit", lambda self, **kwargs: None)


def speed_checkpoint(folder: Path, config: str | None = None) -> Path:
    """A SpeeD run's checkpoint of the quickstart model at step 7, with the run's config.yaml beside it if given."""
    model = main(["--config", QUICKSTART, *CPU], run=False).model
    (folder / "checkpoints").mkdir(parents=True)
    ckpt = folder / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": lightning.__version__,
                "global_step": 7, "callbacks": {"TimestepCallback{'strategies': 'SpeeD'}": {}}}, ckpt)
    if config is not None:
        (folder / "config.yaml").write_text(config)
    return ckpt


def resume_warnings(args: list[str]) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        main(["fit", *args, *CPU])
    return [str(w.message) for w in record if "time-step strategy" in str(w.message)]


def test_resuming_without_the_strategy_file_says_the_strategy_changes(cli_env: Path, no_fit: None) -> None:
    """``--config fashion_mnist.yaml --ckpt_path <a SpeeD run>`` (the strategy file forgotten) trained uniform t from
    the checkpoint's step on, with only Lightning's note on a callback state it could not place."""
    ckpt = speed_checkpoint(cli_env / "run")
    (message,) = resume_warnings(["--config", QUICKSTART, "--config", UNIFORM, "--ckpt_path", str(ckpt)])
    assert message.startswith(f"--ckpt_path {ckpt} was trained with the time-step strategy SpeeD, but this run trains "
                              "with none (uniform t, unit weights): the strategy changes at step 7, and the "
                              "checkpoint's strategy state"), message
    assert resume_warnings(["--config", QUICKSTART, "--ckpt_path", str(ckpt)]) == []  # the same class: nothing to say


def test_resuming_with_other_strategy_arguments_names_both(cli_env: Path, no_fit: None) -> None:
    """speed.yaml's run resumed with k 2 (speed_k2.yaml): the class's state carries over, the arguments change."""
    saved = ("timesteps:\n  class_path: lightning_speed.timesteps.SpeeD\n"
             "  init_args: {tau: 700, k: 5.0, dual: true, lam: 0.6}\n")
    ckpt = speed_checkpoint(cli_env / "run", saved)
    (message,) = resume_warnings(["--config", QUICKSTART, "--timesteps.init_args.k", "2", "--ckpt_path", str(ckpt)])
    assert ("trained with the time-step strategy SpeeD(tau=700, k=5.0, dual=True, lam=0.6), but this run trains with "
            "SpeeD(tau=700, k=2.0, dual=True, lam=0.6): the strategy changes at step 7. ") in message, message
    assert f"--config {cli_env / 'run' / 'config.yaml'} --ckpt_path {ckpt}" in message
    assert resume_warnings(["--config", QUICKSTART, "--ckpt_path", str(ckpt)]) == []


def test_the_test_subcommand_reports_the_loss_on_the_test_split(cli_env: Path) -> None:
    """``lightning-speed test`` is offered by the command's usage; it failed with "No `test_step()` method defined"."""
    with pytest.warns(UserWarning, match="test without --ckpt_path evaluates the model's initial, untrained weights"):
        cli = main(["test", "--config", QUICKSTART, *CPU, "--trainer.limit_test_batches", "1",
                    "--data.init_args.batch_size", "4"])  # fmt: skip
    loss = cli.trainer.callback_metrics["test/loss"]
    assert torch.isfinite(loss) and loss > 0


def test_predict_is_refused_before_any_work_with_what_to_use_instead(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``predict`` loaded the data and the checkpoint, then failed: "`Trainer.predict` requires `forward` method"."""
    line = first_error(["predict", "--config", QUICKSTART], capsys)
    assert line.startswith("error: argument subcommand: invalid choice: 'predict' (choose from 'fit', 'validate', "
                           "'test'). A diffusion model predicts nothing from a data set: it generates images"), line


def test_callback_arguments_on_a_config_without_that_callback_are_refused(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """study/ema_warmup.yaml sets ``ema: {init_args: ...}``; after ``ema: null`` jsonargparse built an EMA from the
    class's defaults (decay 0.999) plus those arguments: the run averaged although its configuration had no EMA."""
    warmup = str(CONFIGS / "study" / "ema_warmup.yaml")
    line = first_error(["fit", "--config", QUICKSTART, "--ema", "null", "--config", warmup, "--print_config"], capsys)
    assert line == (f"error: Config file {warmup} sets arguments of ema (ema: without class_path), but ema is null "
                    "before it (the configuration has no such callback): compose the file after a config that sets "
                    "ema, or give the class_path there (lightning_speed.callbacks.ema.EMAWeightAveraging).")
    no_grids = ["fit", "--config", QUICKSTART, "--samples", "null"]
    line = first_error([*no_grids, "--samples.init_args.num_samples", "8", "--print_config"], capsys)
    assert "sets an argument of samples, but samples is null before it" in line, line
    assert line.endswith("e.g. --samples SampleGridCallback --samples.init_args.num_samples VALUE."), line
    # what composes: the file on a config with an EMA, and arguments after the class is named again
    assert main(["--config", QUICKSTART, "--config", warmup, *CPU], run=False).config.ema.init_args.power == 0.75
    config = main(["--config", QUICKSTART, "--samples", "null", "--samples", "SampleGridCallback",
                   "--samples.init_args.num_samples", "8", *CPU], run=False).config  # fmt: skip
    assert config.samples.init_args.num_samples == 8
