"""lightning_speed.analysis: increments, Psi's rate, the areas, auto tau, the figure and its CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_speed.analysis import (
    AREA_NAMES,
    analyse,
    auto_tau,
    increment_mean_scale,
    increment_variance,
    main,
    psi_rate_peak,
    resolve_tau,
    timestep_areas,
)
from lightning_speed.schedules import NoiseSchedule

from _fixtures import cancellation, float64_rtol

REPO = Path(__file__).resolve().parents[1]


def test_peak_and_pivots_of_the_paper_schedules():
    linear = NoiseSchedule.from_name("linear", 1000)
    assert psi_rate_peak(linear) == 219
    assert auto_tau(linear) == 642
    assert auto_tau(NoiseSchedule.from_name("cosine", 1000)) == 959
    assert auto_tau(NoiseSchedule.from_name("quadratic", 1000)) == 829
    assert auto_tau(NoiseSchedule.from_name("constant", 1000)) == 229


def test_auto_tau_matches_the_official_rule_at_T_1000():
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    official = int(np.flatnonzero(np.gradient(np.sqrt(1 - ab)) < 1e-4)[0]) + 1
    assert auto_tau(NoiseSchedule(1 - ab / np.concatenate([[1.0], ab[:-1]]))) == official == 642


def test_auto_tau_keeps_its_place_when_T_changes():
    # the threshold scales as 1e-4 * 1000 / T: the pivot stays at ~64% of the linear process
    assert auto_tau(NoiseSchedule.from_name("linear", 100)) == 64
    assert auto_tau(NoiseSchedule.from_name("linear", 500)) == 321


def test_auto_tau_falls_back_when_the_schedule_never_converges():
    schedule = NoiseSchedule.from_name("constant", 50)  # alpha_bar_(T-1) = 0.36: never pure noise
    with pytest.warns(UserWarning, match="never converges"):
        assert auto_tau(schedule) == 49
    with pytest.warns(UserWarning):
        areas = timestep_areas(schedule, "auto")
    assert len(areas.convergence) == 1


def test_auto_tau_stays_below_T():
    # cosine at T = 20 first dips below the threshold at its very last step
    assert auto_tau(NoiseSchedule.from_name("cosine", 20)) == 19


def test_increment_variance_formula_and_monte_carlo():
    schedule = NoiseSchedule.from_name("linear", 1000)
    b = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - b)
    expected = (np.sqrt(1 - b[1:]) - 1) ** 2 * (1 - ab[:-1]) + b[1:]
    # alpha_bar is a product of up to T roundings; sqrt(1 - b) - 1 and sqrt(ab_{t+1}) - sqrt(ab_t) cancel,
    # amplifying those roundings by |terms| / |difference| (about 2 / b_t, 2e4 at t = 0).
    root = np.sqrt(ab)
    mean_scale = root[1:] - root[:-1]
    rtol = float64_rtol(operations=1000, amplification=cancellation(root[1:], mean_scale))
    assert rtol < 1e-6  # still a real check: the formulas differ from each other by far more than this
    np.testing.assert_allclose(increment_variance(schedule).numpy(), expected, rtol=rtol)
    np.testing.assert_allclose(increment_mean_scale(schedule).numpy(), mean_scale, rtol=rtol)
    # simulate x_t | x0 and one forward step
    gen = torch.Generator().manual_seed(0)
    x0, n = 0.8, 400_000
    for t in (0, 219, 700):
        x_t = np.sqrt(ab[t]) * x0 + np.sqrt(1 - ab[t]) * torch.randn(n, generator=gen, dtype=torch.float64).numpy()
        x_next = np.sqrt(1 - b[t + 1]) * x_t + np.sqrt(b[t + 1]) * torch.randn(n, generator=gen, dtype=torch.float64).numpy()
        delta = x_next - x_t
        assert delta.var() == pytest.approx(expected[t], rel=0.02)
        assert delta.mean() == pytest.approx(x0 * (np.sqrt(ab[t + 1]) - np.sqrt(ab[t])), abs=4 * np.sqrt(expected[t] / n))


def test_areas_of_linear_T_1000():
    areas = timestep_areas(NoiseSchedule.from_name("linear", 1000), tau=700)
    assert areas.acceleration == range(0, 219)
    assert areas.deceleration == range(219, 700)
    assert areas.convergence == range(700, 1000)
    labels = areas.labels()
    assert labels[218] == 0 and labels[219] == 1 and labels[699] == 1 and labels[700] == 2
    assert areas.fractions() == pytest.approx({"acceleration": 0.219, "deceleration": 0.481, "convergence": 0.3})
    assert tuple(areas.ranges()) == AREA_NAMES
    auto = timestep_areas(NoiseSchedule.from_name("linear", 1000))
    assert auto.tau == 642


def test_areas_when_tau_is_below_the_peak():
    areas = timestep_areas(NoiseSchedule.from_name("linear", 1000), tau=100)
    assert areas.acceleration == range(0, 100) and len(areas.deceleration) == 0
    assert (areas.labels() == 2).sum() == 900


@pytest.mark.parametrize(("tau", "match"), [(0, "at least 1"), (1000, "smaller than"), ("soon", "'auto'"), (2.5, "integer")])
def test_resolve_tau_rejects_bad_values(tau, match):
    with pytest.raises(ValueError, match=match):
        resolve_tau(tau, NoiseSchedule.from_name("linear", 1000))


def test_analyse_collects_everything():
    result = analyse("cosine", 1000, tau="auto")
    assert result.increment_variance.shape == (999,) and result.psi_rate.shape == (1000,)
    assert result.areas.tau == 959 and result.schedule == "cosine"


def test_cli_prints_the_areas(capsys):
    main(["--schedule", "linear", "--num-timesteps", "1000", "--tau", "700"])
    out = capsys.readouterr().out
    assert "peak(dPsi/dt)=219 tau=700 (auto pivot 642)" in out
    assert "convergence   t in [700, 1000)" in out


def test_cli_module_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "analysis.png"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_speed.analysis", "--schedule", "linear", "--num-timesteps", "1000", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**_env(), "MPLBACKEND": "Agg"},
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tau=642" in result.stdout


def test_plot_analysis_has_a_row_per_schedule():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from lightning_speed.analysis import plot_analysis

    fig = plot_analysis(["linear", "cosine"], 1000)
    assert len(fig.axes) == 6
    import matplotlib.pyplot as plt

    plt.close(fig)


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env
