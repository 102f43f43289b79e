"""DPM-Solver++(2M) against closed forms, DDIM and diffusers.

Gaussian data x0 ~ N(0, s^2) has the exact denoiser x0_hat(x_t) = sqrt(ab_t) s^2 x_t / v_t, v_t = ab_t s^2 + 1 - ab_t,
and its probability-flow ODE is linear: it maps x_t to sqrt(v_u / v_t) x_t. A solver that calls this denoiser is
linear in its noise too, so its samples are K x_T with a gain K that one call on x_T = 1 measures without sampling
noise. The exact gain of the chain (from t = T-1 to t = 0, then the network's x0 at t = 0) is
K* = sqrt(v_0 / v_{T-1}) sqrt(ab_0) s^2 / v_0, and K - K* is the solver's discretisation error alone.
"""

import math

import pytest
import torch
from torch import nn

from lightning_speed import DiffusionModule, variance
from lightning_speed.callbacks import FIDCallback, SampleGridCallback
from lightning_speed.process import GaussianDiffusion
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.solvers import ddim_step, dpmpp_2m_step, multistep_ratios, sample_loop

EPS32 = torch.finfo(torch.float32).eps


def make(prediction="epsilon", name="linear", T=1000, learn_sigma=False):
    return GaussianDiffusion(NoiseSchedule.from_name(name, T), prediction, learn_sigma=learn_sigma)


def exact_model(d, s, variance_out=False):
    """The exact prediction for x0 ~ N(0, s^2) in ``d``'s parameterisation (learned-variance channels: noise)."""
    ab_all = d.schedule.alpha_bar.double()

    def model(x, t):
        ab = ab_all[t].view(-1, *([1] * (x.ndim - 1)))
        x0 = ab.sqrt() * s**2 * x.double() / (ab * s**2 + 1 - ab)
        eps = (x.double() - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = {"epsilon": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[d.prediction].float()
        return torch.cat([out, torch.randn_like(out)], dim=1) if variance_out else out

    return model


def gain(d, s, solver, steps):
    return sample_loop(d, exact_model(d, s), torch.ones(1, 1), solver, steps, clip_denoised=False).item()


def exact_gain(d, s):
    ab = d.schedule.alpha_bar.double()
    v = ab * s**2 + 1 - ab
    return ((v[0] / v[-1]).sqrt() * ab[0].sqrt() * s**2 / v[0]).item()


def error(d, s, solver, steps):
    return abs(gain(d, s, solver, steps) - exact_gain(d, s))


# -- the distribution ------------------------------------------------------------------------------
def test_samples_have_the_data_variance():
    """100 steps of DPM-Solver++(2M) sample N(0, s^2). Tolerance: 5 standard deviations of the mean and of the
    mean of squares of N draws (s / sqrt(N), s^2 sqrt(2 / N)), plus the discretisation, dominated by the
    first-order step into t = 0: it misses about 1 - ab_{t_1} of variance (x0_hat's slope still changes there by
    about sigma_{t_1}^2 / s^2). DDIM, first order, misses more than that at the same steps."""
    d, s, n, steps = make(), 0.5, 100_000, 100
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    t_1 = variance.respaced_timesteps(1000, steps)[1]
    tolerance = 5 * s**2 * math.sqrt(2 / n) + (1 - d.schedule.alpha_bar[t_1].item())
    out = sample_loop(d, exact_model(d, s), noise, "dpmpp_2m", steps, clip_denoised=False)
    assert abs(out.mean().item()) < 5 * s / math.sqrt(n)
    assert abs(out.square().mean().item() - s**2) < tolerance
    ddim = sample_loop(d, exact_model(d, s), noise, "ddim", steps, clip_denoised=False)
    assert abs(ddim.square().mean().item() - s**2) > tolerance


@pytest.mark.parametrize("name,s", [("linear", 0.5), ("cosine", 1.0)])
@pytest.mark.parametrize("steps,factor", [(10, 1), (20, 2), (40, 10)])
def test_error_is_far_below_ddims(name, s, steps, factor):
    """The gain's error against the exact flow, at the step counts an FID is read with.

    On the linear schedule at 10 steps the two are close (0.11 and 0.14): the first-order step into t = 0 starts
    at t_1 = 111, where sigma^2 = 0.13, and loses about sigma^2 / 2s^2 of the gain. From 20 steps on the gap
    widens (linear: 3x at 20, 50x at 40; cosine: 15x and 40x)."""
    d = make(name=name)
    assert error(d, s, "dpmpp_2m", steps) * factor < error(d, s, "ddim", steps)


def test_convergence_order():
    """Halving the step halves DDIM's error (first order) and quarters DPM-Solver++(2M)'s (second order).

    Measured on the cosine schedule, whose sigma^2 grows like t^2 near t = 0, so that the first-order step into
    t = 0 (error about sigma_{t_1}^2) is second order too. On the linear schedule sigma^2 grows like t there and
    that step's error, small but first order, takes over past about 100 steps; unit-variance data keeps the
    2M error from changing sign between the step counts, where a ratio of errors says nothing."""
    d, s = make(name="cosine"), 1.0
    for solver, low, high in (("ddim", 0.8, 1.2), ("dpmpp_2m", 1.5, 3.5)):
        errors = [error(d, s, solver, steps) for steps in (20, 40, 80)]
        orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
        assert all(low < p < high for p in orders), (solver, errors, orders)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_every_prediction_converts_to_the_same_x0(prediction):
    """Exact models in every parameterisation give the same samples up to float32 rounding of the conversion."""
    noise = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    reference, d = make("x0"), make(prediction)
    a = sample_loop(reference, exact_model(reference, 0.5), noise, "dpmpp_2m", 20, clip_denoised=False)
    b = sample_loop(d, exact_model(d, 0.5), noise, "dpmpp_2m", 20, clip_denoised=False)
    torch.testing.assert_close(b, a, rtol=0, atol=20 * 8 * EPS32 * noise.abs().max().item())


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_zero_terminal_snr(prediction):
    """alpha_bar = 0 at t = T-1: lambda = -inf there, so the step after the first has an infinite previous step and
    stays first order (ratio 0, not nan); the samples still have the data's variance."""
    betas = NoiseSchedule.from_name("linear", 200).betas.clone()
    betas[-1] = 1.0
    d = GaussianDiffusion(NoiseSchedule(betas), prediction)
    ratios = multistep_ratios(variance.respace(d.schedule, 50).schedule.alpha_bar)
    assert torch.isfinite(ratios).all() and ratios[-2] == 0
    noise = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0))
    out = sample_loop(d, exact_model(d, 0.5), noise, "dpmpp_2m", 50, clip_denoised=False)
    t_1 = variance.respaced_timesteps(200, 50)[1]  # tolerance as in test_samples_have_the_data_variance
    tolerance = 5 * 0.25 * math.sqrt(2 / 20_000) + (1 - d.schedule.alpha_bar[t_1].item())
    assert abs(out.square().mean().item() - 0.25) < tolerance


def test_learned_sigma_uses_the_mean_only():
    plain, learned = make(), make(learn_sigma=True)
    noise = torch.randn(32, 1, 2, 2)
    a = sample_loop(plain, exact_model(plain, 0.5), noise, "dpmpp_2m", 20)
    b = sample_loop(learned, exact_model(learned, 0.5, variance_out=True), noise, "dpmpp_2m", 20)
    torch.testing.assert_close(b, a, rtol=0, atol=0)


# -- the steps -------------------------------------------------------------------------------------
def test_2m_step_by_hand():
    """Lu et al. 2022, algorithm 2, in float64: x_s = sigma_s / sigma_t x_t - alpha_s (e^-h - 1) D with
    D = (1 + 1 / 2r) x0 - 1 / 2r x0_previous, r = h_previous / h, lambda = log(alpha / sigma)."""
    ab_prev, ab_t, ab_s = 0.1, 0.3, 0.6  # the previous, this and the next step's alpha_bar
    lam = {ab: 0.5 * math.log(ab / (1 - ab)) for ab in (ab_prev, ab_t, ab_s)}
    h, h_prev = lam[ab_s] - lam[ab_t], lam[ab_t] - lam[ab_prev]
    x_t, x0, previous = 0.7, 0.4, 0.1
    r = h_prev / h
    D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous
    expected = math.sqrt((1 - ab_s) / (1 - ab_t)) * x_t - math.sqrt(ab_s) * (math.exp(-h) - 1) * D
    ratios = multistep_ratios(torch.tensor([0.9, ab_s, ab_t, ab_prev, 0.01], dtype=torch.float64))
    assert ratios[2].item() == pytest.approx(h / h_prev, rel=1e-12)
    assert ratios[[0, 1, 4]].tolist() == [0, 0, 0]  # the readout, the step into index 0, the first step
    got = dpmpp_2m_step(*(torch.tensor(v, dtype=torch.float64) for v in (x_t, x0, previous, ab_t, ab_s)), ratios[2])
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # without the previous estimate's correction it is DDIM's step
    eps = (x_t - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
    first = dpmpp_2m_step(*(torch.tensor(v, dtype=torch.float64) for v in (x_t, x0, previous, ab_t, ab_s, 0.0)))
    assert first.item() == pytest.approx(ddim_step(torch.tensor(x0), torch.tensor(eps), torch.tensor(ab_t),
                                                   torch.tensor(ab_s)).item(), rel=1e-6)


@pytest.mark.parametrize("steps", [2, 3])
def test_first_order_chains_are_ddim(steps):
    """With 2 or 3 steps there is no second-order step (the first, the one into t = 0 and the readout are first
    order): the samples are DDIM's, bit for bit."""
    d = make()
    noise = torch.randn(64, 1)
    torch.testing.assert_close(sample_loop(d, exact_model(d, 0.5), noise, "dpmpp_2m", steps),
                               sample_loop(d, exact_model(d, 0.5), noise, "ddim", steps), rtol=0, atol=0)


def test_first_step_is_ddims_and_the_second_is_not():
    d = make()
    noise = torch.randn(64, 1)
    seen = {"ddim": [], "dpmpp_2m": []}
    for solver, inputs in seen.items():
        model = exact_model(d, 0.5)
        sample_loop(d, lambda x, t: inputs.append(x.clone()) or model(x, t), noise, solver, 10)
    assert torch.equal(seen["ddim"][1], seen["dpmpp_2m"][1])  # after the first step
    # after the first 2M step: apart by more than rounding (little: near pure noise x0_hat is about sqrt(ab) s^2 x)
    assert (seen["ddim"][2] - seen["dpmpp_2m"][2]).abs().max() > 100 * EPS32 * noise.abs().max()


def test_deterministic_given_the_noise():
    d = make()
    noise = torch.randn(64, 1)
    a = sample_loop(d, exact_model(d, 0.5), noise, "dpmpp_2m", 20, generator=torch.Generator().manual_seed(1))
    b = sample_loop(d, exact_model(d, 0.5), noise.clone(), "dpmpp_2m", 20, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_clipped_samples_lie_in_the_pixel_range():
    """Data wider than [-1, 1] (s = 1.5): the clamped x0 enters the 2M extrapolation and the readout."""
    d = make()
    out = sample_loop(d, exact_model(d, 1.5), torch.randn(4096, 1), "dpmpp_2m", 20)
    assert out.abs().max() <= 1 and (out.abs() == 1).float().mean() > 0.2


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 1}, "solver_steps must be an integer from 2 to T = 100"),
    ({"steps": 101}, "solver_steps must be an integer from 2 to T = 100"),
    ({"eta": 0.0}, "eta applies to the ddim solver only.*dpmpp_2m is deterministic"),
    ({"solver": "dpm++2m"}, "Unknown solver 'dpm\\+\\+2m'; choose one of 'ddim', 'ddpm', 'dpmpp_2m'"),
])
def test_bad_arguments(kwargs, match):
    d = make(T=100)
    kwargs = {"solver": "dpmpp_2m", "steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_loop(d, exact_model(d, 0.5), torch.randn(2, 1), **kwargs)


# -- diffusers -------------------------------------------------------------------------------------
def diffusers_samples(d, model, noise, steps, **config):
    """diffusers' DPMSolverMultistepScheduler on our respaced time steps without t = 0 (``timesteps``), ending at
    sigma(t = 0) with a first-order step (``final_sigmas_type="sigma_min"``, ``euler_at_final``), then the
    model's x0 at t = 0: the same network calls and steps as ``sample_loop``."""
    diffusers = pytest.importorskip("diffusers")
    kind = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}[d.prediction]
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=d.num_timesteps, trained_betas=d.schedule.betas.numpy(), prediction_type=kind,
        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="sigma_min", euler_at_final=True, **config)
    scheduler.set_timesteps(timesteps=variance.respaced_timesteps(d.num_timesteps, steps).flip(0)[:-1].tolist())
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.repeat(x.shape[0])), t, x).prev_sample
    t0 = torch.zeros(x.shape[0], dtype=torch.long)
    return d.split_prediction(model(x, t0), x, t0)[0]


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_matches_diffusers(prediction):
    """Both run in float32 with the same steps: they may differ by a few roundings per step (8 at most: the
    conversion to x0 and the update), relative to the samples' size, over 20 steps. (Measured: 1.5e-6.)"""
    d, steps = make(prediction), 20
    noise = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    ours = sample_loop(d, exact_model(d, 0.5), noise, "dpmpp_2m", steps, clip_denoised=False)
    theirs = diffusers_samples(d, exact_model(d, 0.5), noise, steps)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=steps * 8 * EPS32 * ours.abs().max().item())


def test_clipping_matches_diffusers_thresholding_at_one():
    """diffusers' thresholding with sample_max_value = 1 clamps x0 to [-1, 1], as clip_denoised does; the readout
    at t = 0 is clamped too. Data wider than [-1, 1] (s = 1.5) makes the clamp act at every step."""
    d, steps = make(), 20
    noise = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    ours = sample_loop(d, exact_model(d, 1.5), noise, "dpmpp_2m", steps, clip_denoised=True)
    theirs = diffusers_samples(d, exact_model(d, 1.5), noise, steps, thresholding=True, sample_max_value=1.0)
    torch.testing.assert_close(ours, theirs.clamp(-1, 1), rtol=0, atol=steps * 8 * EPS32)


# -- where solvers are chosen ----------------------------------------------------------------------
class GaussianEpsilon(nn.Module):
    """The exact epsilon of x0 ~ N(0, 0.25) as a backbone (x, t, y) -> eps."""

    def __init__(self):
        super().__init__()
        ab = NoiseSchedule.from_name("linear", 1000).alpha_bar.double()
        self.register_buffer("slope", ((1 - ab).sqrt() / (ab * 0.25 + 1 - ab)).float())
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x, t, y=None):
        return self.gain * self.slope[t].view(-1, 1, 1, 1) * x


def test_module_samples_with_dpmpp_2m():
    module = DiffusionModule(GaussianEpsilon(), image_shape=(1, 8, 8))
    noise = torch.randn(16, 1, 8, 8)
    out = module.sample(16, solver="dpmpp_2m", solver_steps=20, noise=noise, clip_denoised=False)
    d = module.diffusion
    expected = sample_loop(d, exact_model(d, 0.5), noise, "dpmpp_2m", 20, clip_denoised=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=20 * 8 * EPS32 * noise.abs().max().item())
    assert module.sample(16, solver="dpmpp_2m", solver_steps=20, noise=noise).abs().max() <= 1  # pixels: clipped


def test_callbacks_and_yaml_take_dpmpp_2m():
    from jsonargparse import ArgumentParser

    assert FIDCallback(solver="dpmpp_2m", solver_steps=20).solver == "dpmpp_2m"
    assert SampleGridCallback(solver="dpmpp_2m").solver == "dpmpp_2m"
    with pytest.raises(ValueError, match="eta applies to the ddim solver only"):
        FIDCallback(solver="dpmpp_2m", eta=0.0)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(FIDCallback, "fid")
    parser.add_class_arguments(SampleGridCallback, "samples")
    config = parser.parse_string("fid: {solver: dpmpp_2m, solver_steps: 20}\nsamples: {solver: dpmpp_2m}\n")
    assert (config.fid.solver, config.samples.solver) == ("dpmpp_2m", "dpmpp_2m")
