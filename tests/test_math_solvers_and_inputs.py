"""The DDPM solvers against a direct float64 implementation of their published formulas, the flow's target under
bf16 data, and the errors for a process or schedule of the wrong kind.

The reference below is written from the papers, not from the library: DDIM eq. 12 and 16 (Song et al. 2021),
DDPM's posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 6-7) on improved DDPM's respaced chain, and
DPM-Solver++(2M) (Lu et al. 2022, algorithm 2) in the half log-SNR lambda, with first-order steps where
``solvers`` documents them. The network is the exact denoiser of Gaussian data (``test_process.optimal_model``).
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_speed import flow, variance
from lightning_speed.process import GaussianDiffusion
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.solvers import sample_loop
from test_process import optimal_model, zero_terminal_snr

EPS32 = torch.finfo(torch.float32).eps


def reference_sample(schedule, prediction, model, noise, solver, steps, eta, clip, generator):
    """The solver's chain in float64 from the formulas; noise z drawn as ``sample_loop`` draws it (float32)."""
    kept = variance.respaced_timesteps(schedule.num_timesteps, steps).tolist()
    ab_of = schedule.alpha_bar.double()
    x, previous, n = noise.double(), None, len(kept)

    def lam(ab):  # half log-SNR, +-inf at the ends
        return math.inf if ab >= 1 else -math.inf if ab <= 0 else 0.5 * math.log(ab / (1 - ab))

    for i in reversed(range(n)):
        t = kept[i]
        ab, ab_s = ab_of[t].item(), (ab_of[kept[i - 1]].item() if i > 0 else 1.0)
        out = model(x.float(), torch.full((x.shape[0],), t)).double()
        a, s = math.sqrt(ab), math.sqrt(1 - ab)
        x0 = {"epsilon": lambda: (x - s * out) / a, "x0": lambda: out, "v": lambda: a * x - s * out}[prediction]()
        if clip:
            x0 = x0.clamp(-1, 1)
        eps = (x - a * x0) / s
        z = None
        if i > 0 and (solver == "ddpm" or eta > 0):
            z = torch.randn(x.shape, generator=generator, dtype=torch.float32).double()
        if solver == "ddpm":  # q(x_s | x_t, x0) of the respaced chain, beta = 1 - ab_t / ab_s
            beta = 1 - ab / ab_s
            mean = math.sqrt(ab_s) * beta / (1 - ab) * x0 + (1 - ab_s) * math.sqrt(1 - beta) / (1 - ab) * x
            x = mean if z is None else mean + math.sqrt(beta * (1 - ab_s) / (1 - ab)) * z
        elif solver == "dpmpp_2m" and 1 < i < n - 1:
            h, h_previous = lam(ab_s) - lam(ab), lam(ab) - lam(ab_of[kept[i + 1]].item())
            r = h_previous / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous
            x = math.sqrt(1 - ab_s) / s * x - math.sqrt(ab_s) * (math.exp(-h) - 1) * d
        else:
            sigma = eta * math.sqrt(max((1 - ab_s) / (1 - ab) * (1 - ab / ab_s), 0.0))
            x = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma**2, 0.0)) * eps
            x = x if z is None else x + sigma * z
        previous = x0
    return x


@pytest.mark.parametrize("solver, eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", None), ("dpmpp_2m", None)])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_solvers_follow_the_published_formulas_in_float64(solver, eta, zero_snr):
    """Every prediction, clipped or not, few and many steps. The library runs in float32: the epsilon -> x0
    conversion divides x_t's rounding (eps32 of |x|) by sqrt(alpha_bar) >= sqrt(alpha_bar_(T-1)), and the chain adds a
    few such roundings, so the tolerance is 8 eps32 max|x| / sqrt(alpha_bar_(T-1)) (zero terminal SNR has no epsilon
    model; its smallest positive alpha_bar is then the one before the last). A wrong coefficient or time index moves
    the samples by 1e-2 or more."""
    schedule = zero_terminal_snr(200) if zero_snr else NoiseSchedule.from_name("linear", 200)
    smallest = schedule.alpha_bar[schedule.alpha_bar > 0].min().item()
    noise = 2 * torch.randn(128, 1, generator=torch.Generator().manual_seed(0))
    tolerance = 8 * EPS32 * 8.0 / math.sqrt(smallest)  # |x| stays below 8 for this noise and N(0.3, 0.5^2) data
    for prediction in (["v", "x0"] if zero_snr else ["epsilon", "v", "x0"]):
        d = GaussianDiffusion(schedule, prediction)
        model = optimal_model(d)
        for steps in (7, 50):
            for clip in (False, True):
                got = sample_loop(d, model, noise, solver, steps, eta, clip, torch.Generator().manual_seed(5))
                expected = reference_sample(schedule, prediction, model, noise, solver, steps, eta or 0.0, clip,
                                            torch.Generator().manual_seed(5))
                assert (got.double() - expected).abs().max().item() < tolerance, (prediction, steps, clip)


def test_flow_target_under_bf16_data_is_the_exact_velocity():
    """bf16 data (precision="bf16-true"): x_t is formed in float32, so the target must be eps - x0 in float32 too. The
    exact velocity then has a loss of a few float32 roundings (0 here: the same subtraction), where a bf16 difference
    would be off by up to 2^-9 of |v| (a loss of about 1e-5 for unit data)."""
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(4, 3, 8, 8, generator=g).bfloat16() for _ in range(2))
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    exact = noise.double() - x0.double()
    target = flow.RectifiedFlow().target(x0, noise, t)
    assert target.dtype == torch.float32
    assert (target.double() - exact).abs().max().item() <= EPS32 * exact.abs().max().item()
    losses = flow.loss(lambda x, tt: exact.float(), x0, t, noise)
    assert losses.max().item() <= (EPS32 * exact.abs().max().item()) ** 2
    # float64 data keeps float64 (the library never narrows a wider dtype)
    assert flow.velocity(x0.double(), noise.double()).dtype == torch.float64


def test_a_diffusion_needs_a_noise_schedule():
    with pytest.raises(TypeError, match="needs a NoiseSchedule, got str.*NoiseSchedule.create"):
        GaussianDiffusion("linear")
    with pytest.raises(TypeError, match="got FlowSchedule.*RectifiedFlow"):
        GaussianDiffusion(flow.FlowSchedule(3.0))


def test_the_ddpm_solvers_refuse_a_flow_and_name_its_sampler():
    with pytest.raises(TypeError, match="got RectifiedFlow.*flow.sample_loop"):
        sample_loop(flow.RectifiedFlow(), lambda x, t: x, torch.randn(2, 1), "ddim", 10)
