"""The convergence harness's budgets, summary entries and argument checks, on hand-made results."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest

from benchmarks.convergence import launch, report, stats
from benchmarks.convergence.__main__ import parser


def _write(folder: Path, strategy: str, seed: int, curve: list[tuple[int, float]], **fields: object) -> None:
    run = folder / f"{strategy}_s{seed}"
    run.mkdir(parents=True)
    run.joinpath("result.json").write_text(json.dumps({
        "strategy": strategy, "seed": seed, "steps_done": curve[-1][0], "fid_history": curve, "card": "card", **fields}))


def _report(out: Path, **args: object) -> dict:
    return report.report(Namespace(**{"out": str(out), "include": [], "base": "fashion_mnist.yaml", "plots": False,
                                      "smoke": True, "summary": False, **args}))


def test_a_strategy_evaluated_at_other_steps_is_compared_at_the_last_step_both_evaluated(tmp_path: Path) -> None:
    """uniform evaluates every 1000 steps, the candidate every 1500: they share step 3000 (uniform's FID 15 there),
    not uniform's last step below the candidate's last (4000, which the candidate never evaluated). The candidate
    (30 at 1500, 10 at 3000) reaches 15 at 1500 + 15 / 20 * 1500 = 2625: 3000 / 2625 = 8 / 7."""
    _write(tmp_path, "uniform", 0, [(1000, 40.0), (2000, 20.0), (3000, 15.0), (4000, 10.0)])
    _write(tmp_path, "speed", 0, [(1500, 30.0), (3000, 10.0), (4500, 8.0)])
    summary = _report(tmp_path)
    assert summary["budgets"]["speed"] == {"N": 3000, "N_half": None}  # no shared step at or below 1500
    entry = summary["N"]["speed"]
    assert entry["steps"] == 3000 and entry["baseline_fid"] == pytest.approx(15.0)
    assert entry["per_seed"] == pytest.approx([8 / 7], rel=1e-12) and entry["fid_at_steps"] == [10.0]
    assert "| speed | 0 | 3k | 15.00 | 10.00 | 1.14 |" in (tmp_path / "speedups.md").read_text()


def test_a_budget_screens_summary_entry_names_the_n_its_runs_trained() -> None:
    """A budget run trained its whole schedule of 5k steps (N = 5k) against uniform at 10k; a run stopped at 5k of
    10k's schedule has N = 10k."""
    uniform = {"strategy": "uniform", "seed": 0, "fid_history": [[5000, 20.0], [10000, 10.0]], "steps_target": 10000,
               "steps_done": 10000}
    budget = {"strategy": "uniform_onecycle", "seed": 0, "fid_history": [[2500, 15.0], [5000, 9.0]],
              "steps_target": 5000, "steps_done": 5000, "stop_at": None}
    stopped = {"strategy": "speed", "seed": 0, "fid_history": [[2500, 30.0], [5000, 12.0]], "steps_target": 10000,
               "steps_done": 5000, "stop_at": 5000}
    screened = stats.screen([uniform, budget, stopped], budget=True)
    assert screened["uniform_onecycle"]["budget"] is True and "budget" not in screened["speed"]
    budget_entry = report._screen_headline(screened["uniform_onecycle"])
    assert (budget_entry["steps"], budget_entry["N"], budget_entry["budget"]) == (5000, 5000, True)
    stopped_entry = report._screen_headline(screened["speed"])
    assert (stopped_entry["steps"], stopped_entry["N"]) == (5000, 10000)
    # uniform's mean curve (20 at 5k, 10 at 10k) reaches the stopped run's 12 at 9k: 1.8x of the way
    assert stopped_entry["how_far"] == pytest.approx(1.8)


def test_summary_sources_name_the_baseline_each_entry_was_compared_with(tmp_path: Path) -> None:
    """speed_cosine without uniform_cosine runs is compared with uniform (from another folder, --include): its
    summary entry names both folders, not its own alone."""
    mine, base, summary = tmp_path / "mine", tmp_path / "base", tmp_path / "summary.json"
    _write(base, "uniform", 0, [(50, 20.0), (100, 10.0)])
    _write(mine, "speed_cosine", 0, [(50, 10.0), (100, 8.0)])
    _report(mine, include=[str(base)], smoke=False, summary=True, summary_file=str(summary))
    entry = json.loads(summary.read_text())["speedup"]["speed_cosine"]
    assert entry["results"] == "base, mine" and entry["mean"] == pytest.approx(2.0)


@pytest.mark.parametrize("argv, message", [
    (["--per-gpu", "0"], "argument --per-gpu: takes a whole number of at least 1, got '0'"),
    (["--seeds", "0", "-1"], "argument --seeds: takes a whole number of at least 0, got '-1'"),
    (["--steps", "0"], "argument --steps: takes a whole number of at least 1, got '0'"),
    (["--stop-at", "0"], "argument --stop-at: takes a whole number of at least 1, got '0'"),
    (["--time-limit", "-5"], "argument --time-limit: takes a whole number of at least 1, got '-5'"),
    (["--gpus", "-1"], "argument --gpus: takes a whole number of at least 0, got '-1'"),
])
def test_bad_counts_are_refused_by_the_parser_naming_the_argument(argv: list[str], message: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["launch", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0", "0"], r"--gpus 0 0 names a GPU more than once: .* --per-gpu"),
    (["--time-limit", "60"], r"--time-limit 60 is shorter than --min-run-seconds 120: no run would start"),
    (["--jobs", "speed:0:0"], r"strategy:seed:steps \(steps at least 1\).*got 'speed:0:0'"),
    # a screen's stop must be a step the FID evaluates: given, or the base's (fashion_mnist_dit.yaml: every 5000)
    (["--eval-every", "2500", "--stop-at", "3000"], r"--stop-at 3000 is no step the FID evaluates \(every 2500 steps\)"),
    (["--base", "fashion_mnist_dit.yaml", "--stop-at", "2500"], r"--stop-at 2500 is no step .*every 5000 steps"),
])
def test_launch_refuses_arguments_that_start_no_run_or_share_a_gpu(argv: list[str], message: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before any run starts or any folder is written."""
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: pytest.fail("a run was started"))
    with pytest.raises(SystemExit, match=message):
        launch.launch(parser().parse_args(["launch", "--smoke", "--out", str(tmp_path / "out"), *argv]))
    assert not (tmp_path / "out").exists()


def test_a_run_trained_without_an_ema_names_no_decay() -> None:
    """--set ema=null trains without an average: its study entries must not name the base's decay."""
    from benchmarks.convergence.report import ema_args, ema_decay

    run = {"strategy": "speed", "configs": ["fashion_mnist_dit.yaml", "strategies/speed.yaml"], "overrides": []}
    assert ema_args(run)["decay"] == 0.9999
    without = {**run, "overrides": ["--ema", "null"]}
    assert ema_args(without) == {} and ema_decay([without], "speed") is None
    again = {**run, "overrides": ["--ema", "null", "--ema.init_args.decay", "0.999"]}  # a later argument counts
    assert ema_args(again) == {"decay": 0.999}
