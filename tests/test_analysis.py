"""lightning_speed.analysis: the increment statistics of Figure 1, the figure and its CLI.

The schedule facts it plots (pivot, tau, areas) are tested in test_schedules.py.
"""

from __future__ import annotations

import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_speed.analysis import analyse, increment_mean_scale, increment_variance, main
from lightning_speed.schedules import NoiseSchedule

from _fixtures import cancellation, float64_rtol

REPO = Path(__file__).resolve().parents[1]


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


def test_analyse_collects_everything():
    result = analyse("cosine", 1000, tau="auto")
    assert result.increment_variance.shape == (999,) and result.psi_rate.shape == (1000,)
    assert result.areas.tau == 959 and result.schedule == "cosine"


def test_cli_prints_the_areas(capsys):
    main(["--schedule", "linear", "--num-timesteps", "1000", "--tau", "700"])
    out = capsys.readouterr().out
    assert "peak(dPsi/dt)=219 tau=700 (auto pivot 642)" in out
    assert "convergence   t in [700, 1000)" in out


@pytest.mark.parametrize("tau", ["abc", "2.5"])
def test_cli_says_what_tau_may_be(capsys, tau):
    with pytest.raises(SystemExit) as exit_info:
        main(["--tau", tau])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith(f"argument --tau: tau must be an integer time step or 'auto', got '{tau}'."), last


def test_cli_module_writes_a_png(tmp_path, monkeypatch, capsys):
    """``python -m lightning_speed.analysis ... --out``, its ``__main__`` run in this process (runpy): a new process
    would spend seconds importing torch again."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    out = tmp_path / "analysis.png"
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["python -m lightning_speed.analysis", "--schedule", "linear",
                                      "--num-timesteps", "1000", "--out", str(out)])
    with warnings.catch_warnings():  # runpy notes that this test file imported the module already
        warnings.filterwarnings("ignore", "'lightning_speed.analysis' found in sys.modules", RuntimeWarning)
        runpy.run_module("lightning_speed.analysis", run_name="__main__", alter_sys=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tau=642" in capsys.readouterr().out


def test_plot_analysis_has_a_row_per_schedule():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from lightning_speed.analysis import plot_analysis

    fig = plot_analysis(["linear", "cosine"], 1000)
    assert len(fig.axes) == 6
    import matplotlib.pyplot as plt

    plt.close(fig)
