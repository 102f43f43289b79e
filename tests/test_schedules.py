import math

import numpy as np
import pytest
import torch

from lightning_speed.schedules import NoiseSchedule

from _fixtures import cancellation, float64_rtol


def test_linear_closed_form():
    s = NoiseSchedule.from_name("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    expected = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(s.alpha_bar.numpy(), expected, rtol=float64_rtol(operations=1000))


def test_linear_scales_with_T():
    s = NoiseSchedule.from_name("linear", 250)
    assert s.betas[0].item() == pytest.approx(4e-4)
    assert s.betas[-1].item() == pytest.approx(0.08)


def test_quadratic_closed_form():
    s = NoiseSchedule.from_name("quadratic", 100)
    np.testing.assert_allclose(s.betas.sqrt().numpy(), np.linspace(0.01, math.sqrt(0.02), 100), rtol=float64_rtol(operations=4))


def test_cosine_closed_form():
    T, s_ = 1000, 0.008
    s = NoiseSchedule.from_name("cosine", T)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert s.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert s.betas.max().item() <= 0.999


def test_constant_closed_form():
    s = NoiseSchedule.from_name("constant", 50)
    np.testing.assert_allclose(s.alpha_bar.numpy(), 0.98 ** np.arange(1, 51), rtol=float64_rtol(operations=50))


def test_snr_psi_and_rate():
    s = NoiseSchedule.from_name("linear", 1000)
    ab = s.alpha_bar.numpy()
    # 1 - ab cancels where ab is near 1 (t = 0: 1e4 x); the gradient's differences cancel again.
    psi = 1 - ab
    rtol = float64_rtol(operations=4, amplification=cancellation(ab, psi))
    np.testing.assert_allclose(s.snr.numpy(), ab / psi, rtol=rtol)
    np.testing.assert_allclose(s.psi.numpy(), psi, rtol=rtol)
    rate = np.gradient(psi)
    rate_amplification = cancellation(ab, psi) * cancellation(psi[2:], rate[1:-1])
    np.testing.assert_allclose(s.psi_rate.numpy(), rate, rtol=float64_rtol(operations=6, amplification=rate_amplification))
    # The paper: dPsi/dt of the linear schedule peaks at t = 219.
    assert int(s.psi_rate.argmax()) == 219


def test_custom_betas_and_create():
    s = NoiseSchedule.create([0.1, 0.2, 0.3])
    assert s.num_timesteps == 3
    assert s.alpha_bar[-1].item() == pytest.approx(0.9 * 0.8 * 0.7)
    assert NoiseSchedule.create(s) is s


@pytest.mark.parametrize("betas", [[0.1], [0.0, 0.1], [0.5, 1.0], [float("nan"), 0.1]])
def test_bad_betas(betas):
    with pytest.raises(ValueError, match="beta"):
        NoiseSchedule(torch.tensor(betas))


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="linear, quadratic, cosine, constant"):
        NoiseSchedule.from_name("sigmoid")
