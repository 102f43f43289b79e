"""The first line of the CLI's error for common mistakes in strategy and config names: the cause and the fix.

Each parses only (``--print_config``, ``run=False`` or an error before instantiation): no training.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_speed.cli import check_one_strategy, main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BASE = str(CONFIGS / "fashion_mnist.yaml")
QUICKSTART = str(CONFIGS / "quickstart.yaml")


def first_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The exit status 2 of a usage error, and the first line of its report."""
    with pytest.raises(SystemExit) as exit_info:
        main(args, prog="lightning-speed")
    assert exit_info.value.code == 2
    return next(line for line in capsys.readouterr().err.splitlines() if line.startswith("error:"))


def test_a_mistyped_key_under_print_config_names_the_nearest_key(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --print_config jsonargparse reports the key from the top-level parser, which holds only the subcommands:
    the hint named no key and pointed at ``lightning-speed --help``, which lists no option."""
    bad = cli_env / "bad.yaml"
    bad.write_text("trainer:\n  max_step: 5\n")
    line = first_error(["fit", "--config", BASE, "--config", str(bad), "--print_config"], capsys)
    assert line == f"error: Config file {bad} sets trainer.max_step, which is not an option: did you mean trainer.max_steps?"


@pytest.mark.parametrize(("given", "meant"), [
    ("lightning_speed.timesteps.Speed", "lightning_speed.timesteps.SpeeD"),  # a class; not the module speed
    ("lightning_speed.timesteps.MinSnrWeighting", "lightning_speed.timesteps.MinSNRWeighting"),
    ("lightning_speed.timestep.SpeeD", "lightning_speed.timesteps"),
    ("Sped", "lightning_speed.timesteps.SpeeD"),  # a short name, as docs/configs.md's --timesteps P2Weighting
    ("P2weighting", "lightning_speed.timesteps.P2Weighting"),
])  # fmt: skip
def test_a_mistyped_strategy_class_names_the_nearest_one(
    cli_env: Path, capsys: pytest.CaptureFixture[str], given: str, meant: str
) -> None:
    line = first_error(["fit", "--config", BASE, "--timesteps", given, "--print_config"], capsys)
    assert line.endswith(f"; did you mean {meant}?"), line


def test_a_mistyped_class_in_a_config_file_names_the_nearest_one(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = cli_env / "speed.yaml"
    bad.write_text((CONFIGS / "strategies" / "speed.yaml").read_text().replace("timesteps.SpeeD", "timesteps.Speed"))
    line = first_error(["fit", "--config", BASE, "--config", str(bad), "--print_config"], capsys)
    assert "has no attribute 'Speed'; did you mean lightning_speed.timesteps.SpeeD?" in line, line
    line = first_error(["fit", "--config", BASE, "--timesteps", "lightning_speed.timesteps.Zzz", "--print_config"], capsys)
    assert line.endswith("has no attribute 'Zzz'"), line  # nothing near: no hint


@pytest.mark.parametrize("option", [["--timesteps.init_args.tau", "600"], ["--timesteps.tau=600"]])
def test_strategy_arguments_without_a_strategy_class_say_so(
    cli_env: Path, capsys: pytest.CaptureFixture[str], option: list[str]
) -> None:
    """A base alone has ``timesteps: null``: jsonargparse said "timesteps: Strategy: Option 'tau' is not accepted",
    as if SpeeD took no tau."""
    line = first_error(["fit", "--config", BASE, *option, "--print_config"], capsys)
    name = option[0].split("=")[0]
    assert line.startswith(f"error: No time-step strategy class is set for {name} (timesteps is null"), line
    assert line.endswith(f"e.g. --timesteps SpeeD {name} 600."), line
    line = first_error(["fit", "--config", BASE, "--config", str(CONFIGS / "strategies" / "speed.yaml"),
                        "--timesteps", "null", *option, "--print_config"], capsys)
    assert "No time-step strategy class is set" in line


def test_a_file_of_strategy_arguments_without_a_class_says_so(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args_only = cli_env / "tau600.yaml"
    args_only.write_text("timesteps:\n  init_args: {tau: 600}\n")
    line = first_error(["fit", "--config", BASE, "--config", str(args_only), "--print_config"], capsys)
    assert line.startswith(f"error: Config file {args_only} sets arguments of the time-step strategy (timesteps: "
                           "without class_path), but no strategy class is set before it"), line
    check_one_strategy([BASE, str(CONFIGS / "strategies" / "speed.yaml"), str(args_only)])  # after a class: merges


def test_another_strategy_file_on_a_config_with_its_own_strategy_gets_a_fix_that_works(cli_env: Path) -> None:
    """quickstart.yaml trains SpeeD itself: a strategy file after it was told to "give one strategy file per run,
    after the base config", which is what the command did."""
    p2 = str(CONFIGS / "strategies" / "p2.yaml")
    uniform = str(CONFIGS / "strategies" / "uniform.yaml")
    with pytest.raises(ValueError) as err:
        check_one_strategy([QUICKSTART, p2])
    message = str(err.value)
    assert "Give one strategy file per run" not in message
    assert f"put configs/strategies/uniform.yaml before {p2} (it clears SpeeD), or give the class on the command " \
           "line: --timesteps P2Weighting." in message
    for fix in (["--config", uniform, "--config", p2], ["--timesteps", "P2Weighting"]):  # both fixes train P2's own k
        config = main(["--config", QUICKSTART, *fix], run=False).config
        assert config.timesteps.class_path == "lightning_speed.timesteps.P2Weighting"
        assert config.timesteps.init_args.k == 1.0  # not SpeeD's k 5
    with pytest.raises(ValueError, match="Give one strategy file per run"):  # after a strategy file: as before
        check_one_strategy([BASE, str(CONFIGS / "strategies" / "speed.yaml"), p2])
