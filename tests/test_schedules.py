import math

import numpy as np
import pytest
import torch

from lightning_speed.schedules import (
    AREA_NAMES,
    NoiseSchedule,
    as_schedule,
    auto_tau,
    psi_rate_peak,
    resolve_tau,
    timestep_areas,
)

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


@pytest.mark.parametrize("T", [2, 10, 20])
def test_linear_refuses_a_T_whose_scaled_betas_reach_one(T):
    with pytest.raises(ValueError, match=rf"at T = {T} its last beta is {20 / T:g} .*more than 20 steps, or the cosine"):
        NoiseSchedule.from_name("linear", T)
    assert NoiseSchedule.from_name("linear", 21).alpha_bar[-1] > 0  # the smallest T it takes keeps a positive SNR


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


@pytest.mark.parametrize("betas", [[0.1], [0.0, 0.1], [0.5, 1.5], [1.0, 0.5], [float("nan"), 0.1]])
def test_bad_betas(betas):
    with pytest.raises(ValueError, match="beta"):
        NoiseSchedule(torch.tensor(betas))


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="linear, quadratic, cosine, constant"):
        NoiseSchedule.from_name("sigmoid")


# ------------------------------------------------------------------ pivot, tau and areas
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


@pytest.mark.parametrize(
    ("tau", "error", "match"),
    [(0, ValueError, "at least 1"), (1000, ValueError, r"smaller than .* T=1000 .*\[1, 999\].*'auto' for 642"),
     ("soon", ValueError, "positive integer or 'auto'"), (2.5, TypeError, "positive integer or 'auto'"),
     (True, TypeError, "positive integer or 'auto'")],
)
def test_resolve_tau_rejects_bad_values(tau, error, match):
    with pytest.raises(error, match=match):
        resolve_tau(tau, NoiseSchedule.from_name("linear", 1000))


# ------------------------------------------------------------------ schedules people bring from diffusers
def rescale_betas_zero_snr(betas: torch.Tensor) -> torch.Tensor:
    """diffusers' rescale_betas_zero_snr (Lin et al. 2024, Algorithm 1), written out here."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


@pytest.fixture(params=[torch.float64, torch.float32], ids=["float64", "float32"])
def zero_snr_betas(request) -> torch.Tensor:
    return rescale_betas_zero_snr(torch.linspace(1e-4, 0.02, 1000, dtype=request.param))


def test_zero_terminal_snr_schedule_is_accepted(zero_snr_betas):
    assert zero_snr_betas[-1].item() == 1.0  # the final beta of such a schedule
    from_betas = NoiseSchedule(zero_snr_betas)
    from_products = NoiseSchedule.from_alphas_cumprod(torch.cumprod(1 - zero_snr_betas, 0))
    for s in (from_betas, from_products):
        assert s.alpha_bar[-1].item() == 0.0 and s.snr[-1].item() == 0.0 and s.psi[-1].item() == 1.0
        assert torch.isfinite(s.snr).all() and torch.isfinite(s.psi_rate).all()
        assert (s.snr[:-1] > 0).all()
    # sqrt(alpha_bar) is the linear schedule's, shifted to end at 0 and rescaled to keep its start
    root = NoiseSchedule.from_name("linear", 1000).alpha_bar.sqrt()
    expected = (root - root[-1]) * root[0] / (root[0] - root[-1])
    # shifting by root[-1] cancels where root is close to it (the last steps): that amplifies the
    # rounding of the 1000-step product by root / (root - root[-1])
    amplification = cancellation(root[:-1].numpy(), (root - root[-1])[:-1].numpy())
    eps = torch.finfo(zero_snr_betas.dtype).eps
    rtol = float64_rtol(operations=1000, amplification=amplification) * eps / np.finfo(np.float64).eps
    np.testing.assert_allclose(from_betas.alpha_bar.sqrt()[:-1].numpy(), expected[:-1].numpy(), rtol=rtol)


def test_zero_terminal_snr_tables_are_finite_and_closed_form(zero_snr_betas):
    from lightning_speed.timesteps import MinSNRWeighting, P2Weighting, SpeeD

    s = NoiseSchedule(zero_snr_betas)
    snr = s.snr.numpy()
    for prediction, formula in (("epsilon", lambda x: np.minimum(x, 5) / x), ("v", lambda x: np.minimum(x, 5) / (x + 1)),
                                ("x0", lambda x: np.minimum(x, 5))):
        table = MinSNRWeighting(gamma=5).bind(s, prediction).table.numpy()
        assert np.isfinite(table).all()
        np.testing.assert_allclose(table[:-1], formula(snr[:-1]), rtol=1e-6)  # float32 table
    # at SNR = 0: epsilon's min(SNR, 5) / SNR is 1 for every SNR <= 5, so its limit is 1; v's and x0's are 0
    assert MinSNRWeighting().bind(s, "epsilon").table[-1].item() == 1.0
    assert MinSNRWeighting().bind(s, "v").table[-1].item() == 0.0
    p2 = P2Weighting().bind(s).table.numpy()
    np.testing.assert_allclose(p2, 1 / (1 + snr), rtol=1e-6)
    assert p2[-1] == 1.0
    with pytest.raises(ValueError, match=r"P2 with k = 0 is infinite where SNR = 0.*t = 999.*use k > 0"):
        P2Weighting(k=0.0).bind(s)
    speed = SpeeD(tau="auto").bind(s)
    assert np.isfinite(speed.table.numpy()).all()
    speed.manual_seed(0)
    drawn = speed.sample(10_000)
    assert 0 <= int(drawn.min()) and int(drawn.max()) <= 999 and 1 <= speed.resolved_tau < 1000


def test_half_precision_alphas_cumprod_is_converted():
    exact = NoiseSchedule.from_name("linear", 100)  # betas 1e-3 .. 0.2: every step resolvable in float16
    with pytest.warns(UserWarning, match="float16: converted to float64"):
        half = NoiseSchedule.from_alphas_cumprod(exact.alpha_bar.half())
    assert half.alpha_bar.dtype == torch.float64
    # float16 keeps 11 significant bits: relative rounding <= 2^-11 (subnormals at the tail: absolute 2^-25)
    np.testing.assert_allclose(half.alpha_bar.numpy(), exact.alpha_bar.numpy(), rtol=2**-11, atol=2**-25)
    assert abs(auto_tau(half) - auto_tau(exact)) <= 1


def test_half_precision_that_loses_the_schedule_names_the_cause():
    ab = NoiseSchedule.from_name("linear", 1000).alpha_bar.half()  # 0.9999 rounds to 1.0 in float16
    with pytest.raises(ValueError, match=r"torch.float16.*too coarse.*t = 0, 1.*rounds to 1.*float32 or float64"):
        NoiseSchedule.from_alphas_cumprod(ab)


@pytest.mark.parametrize(
    ("alphas_cumprod", "match"),
    [
        (torch.tensor([0.9, 0.95, 0.5]), r"decrease strictly.*t = 1 an entry is not smaller than the one before"),
        (torch.tensor([1.0, 0.9, 0.5]), r"decrease strictly, starting below 1.*t = 0"),
        (torch.tensor([0.9, 0.0, 0.0]), r"t = 2 .*Only the last entry may be 0"),
        (torch.tensor([0.9, float("nan"), 0.1]), r"non-finite entries at t = 1"),
        (torch.tensor([0.9, 0.5, -0.1]), r"must lie in \[0, 1\]; entries at t = 2"),
        (torch.tensor([[0.9, 0.5]]), r"1-D floating-point tensor"),
        (torch.tensor([9, 5]), r"1-D floating-point tensor"),
    ],
)
def test_bad_alphas_cumprod_say_what_is_wrong(alphas_cumprod, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_alphas_cumprod(alphas_cumprod)


def test_only_the_last_beta_may_be_one():
    with pytest.raises(ValueError, match=r"the last may be exactly 1.*at t = 1"):
        NoiseSchedule(torch.tensor([0.1, 1.0, 0.5]))
    assert NoiseSchedule(torch.tensor([0.1, 0.5, 1.0])).alpha_bar[-1].item() == 0.0


def test_as_schedule_reads_what_modules_hold():
    linear = NoiseSchedule.from_name("linear", 1000)

    class Scheduler:
        alphas_cumprod = linear.alpha_bar.float()

    assert as_schedule(linear) is linear
    assert as_schedule(Scheduler()).name == "Scheduler"
    assert auto_tau(as_schedule(linear.alpha_bar.numpy())) == 642
    with pytest.raises(TypeError, match="Cannot read a noise schedule from str.*NoiseSchedule.from_name"):
        as_schedule("linear")
