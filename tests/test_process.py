"""The diffusion process and the solvers against closed forms.

Gaussian data x0 ~ N(mu, s^2) has an exact posterior given x_t, so the optimal denoiser, the
optimal learned variance and the exact reverse step are known: the loss, the VLB and every
solver are checked against those hand-computed values.
"""

import math

import pytest
import torch

from lightning_speed import variance
from lightning_speed.process import DiffusionLosses, GaussianDiffusion
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.solvers import ddim_step, guided, sample_loop

MU, STD = 0.3, 0.5


def make(prediction="epsilon", name="linear", T=1000, learn_sigma=False):
    return GaussianDiffusion(NoiseSchedule.from_name(name, T), prediction, learn_sigma=learn_sigma)


def zero_terminal_snr(T=200):
    """The linear schedule with its last beta set to 1: alpha_bar_{T-1} = 0."""
    betas = NoiseSchedule.from_name("linear", T).betas.clone()
    betas[-1] = 1.0
    return NoiseSchedule(betas)


def gaussian_posterior(ab, x, mu=MU, std=STD):
    """E[x0 | x_t], Var[x0 | x_t] and E[eps | x_t] for x0 ~ N(mu, std^2), x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
    var_xt = ab * std**2 + 1 - ab
    mean_x0 = mu + ab.sqrt() * std**2 * (x - ab.sqrt() * mu) / var_xt
    mean_eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / var_xt
    return mean_x0, std**2 * (1 - ab) / var_xt, mean_eps


def optimal_model(d, variance_out=None):
    """The exact E[prediction | x_t] for Gaussian data (optionally with variance channels appended)."""
    ab = d.schedule.alpha_bar
    mean_x0, _, mean_eps = gaussian_posterior(ab, torch.zeros(()))  # at x = 0; both are affine in x
    slope_x0 = ab.sqrt() * STD**2 / (ab * STD**2 + 1 - ab)
    slope_eps = (1 - ab).sqrt() / (ab * STD**2 + 1 - ab)
    tables = {  # prediction = offset + slope * x_t, per t
        "epsilon": (mean_eps, slope_eps),
        "x0": (mean_x0, slope_x0),
        "v": (ab.sqrt() * mean_eps - (1 - ab).sqrt() * mean_x0, ab.sqrt() * slope_eps - (1 - ab).sqrt() * slope_x0),
    }
    offset, slope = (table.float() for table in tables[d.prediction])

    def model(x, t):
        shape = (-1, *([1] * (x.ndim - 1)))
        out = offset[t].view(shape) + slope[t].view(shape) * x
        return out if variance_out is None else torch.cat([out, variance_out(x, t)], dim=1)

    return model


# -- forward process, targets, loss ------------------------------------------------------------
def test_forward_process_mean_and_variance():
    d = make()
    torch.manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7)
    for t in (0, 219, 700, 999):
        tt = torch.full((x0.shape[0],), t)
        xt = d.q_sample(x0, tt, torch.randn_like(x0))
        ab = d.schedule.alpha_bar[t].item()
        assert xt.mean().item() == pytest.approx(ab**0.5 * 0.7, abs=0.01)
        # 200k draws: the sample variance's relative standard error is sqrt(2 / n) = 0.0032; 0.02 is 6 of them
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.02)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_cast_model_keeps_the_tables_at_least_float32(dtype):
    """precision="bf16-true" casts every buffer of the module. The tables are rebuilt from the float64 schedule in
    float32 (float64 in a float64 model), so q_sample(x0 = 1, eps = 0) is sqrt(alpha_bar_t) to one rounding of the
    table's dtype (bf16 would give 1 for t < 15, off by up to 7e-4), and sampling (learned variance) is unchanged."""
    d = make("v", learn_sigma=True)
    model = optimal_model(d, lambda x, t: torch.tanh(x) * 0.8)
    noise = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    before = sample_loop(d, model, noise, "ddpm", 50, generator=torch.Generator().manual_seed(1))
    parent = torch.nn.Module()  # Lightning casts the LightningModule; the cast reaches the process through it
    parent.diffusion = d
    parent.to(dtype)
    wide = torch.promote_types(dtype, torch.float32)
    assert {buffer.dtype for buffer in d.buffers()} == {wide} and len(list(d.buffers())) == 3 + 5
    torch.testing.assert_close(d.posterior.coef_x0, variance.posterior_tables(d.schedule).coef_x0.to(wide), rtol=0, atol=0)
    t = torch.arange(1000)
    x_t = d.q_sample(torch.ones(1000, 1, dtype=wide), t, torch.zeros(1000, 1, dtype=wide)).flatten()
    exact = d.schedule.alpha_bar.sqrt()
    torch.testing.assert_close(x_t.double(), exact, rtol=torch.finfo(wide).eps / 2, atol=0)
    if wide == torch.float32:
        after = sample_loop(d, model, noise, "ddpm", 50, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_split_prediction_inverts_target(prediction):
    d = make(prediction)
    torch.manual_seed(1)
    x0, noise = torch.randn(16, 3, 4, 4), torch.randn(16, 3, 4, 4)
    t = torch.randint(0, 1000, (16,))
    xt = d.q_sample(x0, t, noise)
    x0_hat, eps_hat = d.split_prediction(d.target(x0, noise, t), xt, t)
    torch.testing.assert_close(eps_hat, noise, atol=2e-3, rtol=1e-3)
    # x0 from eps is ill-conditioned at the noisiest steps; check where alpha_bar is not tiny.
    keep = d.alpha_bar[t] > 1e-3
    torch.testing.assert_close(x0_hat[keep], x0[keep], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_training_losses_is_the_per_sample_mse_of_the_prediction(prediction):
    """A model off its target by a constant c has per-sample MSE c^2 exactly; no VLB without learned sigma."""
    d = make(prediction)
    x0, noise = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    t = torch.tensor([0, 10, 500, 900, 999])
    offsets = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4]).view(-1, 1, 1, 1)
    model = lambda x_t, tt: d.target(x0, noise, tt) + offsets  # noqa: E731
    losses = d.training_losses(model, x0, t, noise)
    assert isinstance(losses, DiffusionLosses) and losses.vlb is None
    torch.testing.assert_close(losses.mse, offsets.flatten() ** 2, rtol=1e-5, atol=1e-6)


def _kl_by_hand(mean_gap: float, log_var_true: float, log_var_model: float) -> float:
    """KL(N(m1, e^lv1) || N(m2, e^lv2)) per dimension, in nats, written out."""
    return 0.5 * (log_var_model - log_var_true + math.exp(log_var_true - log_var_model)
                  + mean_gap**2 * math.exp(-log_var_model) - 1)


@pytest.mark.parametrize("T", [1000, 100])
def test_learned_sigma_vlb_matches_hand_computed_kl(T):
    """vlb = lambda_vlb * T * KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) / log 2, by hand from the betas;
    the MSE ignores the variance channels."""
    d = make(T=T, learn_sigma=True)
    betas = d.schedule.betas.tolist()
    ab = d.schedule.alpha_bar.tolist()
    t = torch.tensor([1, 10, T // 2, T - 1])
    x0 = torch.rand(4, 1, 2, 2) * 2 - 1
    noise = torch.randn(4, 1, 2, 2)
    err, v = 0.1, 0.3  # eps off by 0.1 everywhere; variance output 0.3
    model = lambda x_t, tt: torch.cat([noise + err, torch.full_like(x_t, v)], dim=1)  # noqa: E731
    losses = d.training_losses(model, x0, t, noise)
    expected = []
    for step in t.tolist():
        b, a, a_prev = betas[step], ab[step], ab[step - 1]
        beta_tilde = b * (1 - a_prev) / (1 - a)
        coef_x0 = b * math.sqrt(a_prev) / (1 - a)
        gap = coef_x0 * err * math.sqrt((1 - a) / a)  # posterior means differ by coef_x0 (x0 - x0_hat)
        frac = (v + 1) / 2
        log_var = frac * math.log(b) + (1 - frac) * math.log(beta_tilde)
        expected.append(_kl_by_hand(gap, math.log(beta_tilde), log_var) / math.log(2) * 0.001 * T)
    torch.testing.assert_close(losses.vlb, torch.tensor(expected), rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(losses.mse, torch.full((4,), err**2), rtol=1e-4, atol=1e-7)


def test_learned_sigma_decoder_term_at_t0():
    """At t = 0 the VLB term is the discretised Gaussian NLL of 8-bit x0 (exact normal CDF by hand)."""
    d = make(learn_sigma=True)
    x0 = (torch.tensor([3.0, 100.0, 128.0, 250.0]) / 127.5 - 1).view(1, 1, 2, 2)
    noise = torch.randn(1, 1, 2, 2)
    t = torch.zeros(1, dtype=torch.long)
    # eps exact: x0_hat = x0, so the model mean is x0 (coef_x0 = 1, coef_xt = 0 at t = 0); v = 1: variance beta_0.
    model = lambda x_t, tt: torch.cat([noise, torch.ones_like(x_t)], dim=1)  # noqa: E731
    vlb = d.training_losses(model, x0, t, noise).vlb
    sigma = math.sqrt(d.schedule.betas[0].item())
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    bin_mass = phi(1 / 255 / sigma) - phi(-1 / 255 / sigma)  # every pixel sits at the centre of its bin
    expected = -math.log(bin_mass) / math.log(2)
    assert vlb.item() == pytest.approx(expected, rel=2e-3)


def test_optimal_learned_variance_minimises_the_vlb():
    """For Gaussian data with the optimal mean, E[KL] = 1/2 (log(sigma^2 / beta_tilde) + (beta_tilde +
    coef_x0^2 Var[x0|x_t]) / sigma^2 - 1), minimal at sigma*^2 = beta_tilde + coef_x0^2 Var[x0|x_t]:
    the v for sigma* gives that minimum, by Monte Carlo, and nearby v give more."""
    d = make(learn_sigma=True)
    n, t_val = 200_000, 40
    ab = d.schedule.alpha_bar.double()
    b, a, a_prev = d.schedule.betas[t_val].item(), ab[t_val].item(), ab[t_val - 1].item()
    beta_tilde = b * (1 - a_prev) / (1 - a)
    coef_x0 = b * math.sqrt(a_prev) / (1 - a)
    var_x0 = STD**2 * (1 - a) / (a * STD**2 + 1 - a)
    best = beta_tilde + coef_x0**2 * var_x0
    v_best = 2 * (math.log(best) - math.log(beta_tilde)) / (math.log(b) - math.log(beta_tilde)) - 1
    gen = torch.Generator().manual_seed(0)
    x0 = MU + STD * torch.randn(n, 1, generator=gen)
    noise = torch.randn(n, 1, generator=gen)
    t = torch.full((n,), t_val)

    def mean_vlb(v):
        model = optimal_model(d, lambda x, tt: torch.full_like(x, v))
        return d.training_losses(model, x0, t, noise).vlb.double().mean().item() * math.log(2)  # nats (lambda T = 1)

    def expected(v):
        log_var = (v + 1) / 2 * math.log(b) + (1 - v) / 2 * math.log(beta_tilde)
        return 0.5 * (log_var - math.log(beta_tilde) + (beta_tilde + coef_x0**2 * var_x0) / math.exp(log_var) - 1)

    at_best = mean_vlb(v_best)
    assert at_best == pytest.approx(0.5 * math.log(best / beta_tilde), rel=0.02)
    for v in (v_best - 0.3, v_best + 0.3):
        assert mean_vlb(v) == pytest.approx(expected(v), rel=0.02)
        assert mean_vlb(v) > at_best


def test_vlb_trains_only_the_variance():
    """Stop-gradient on the mean: the VLB's gradient reaches the variance output, not the prediction."""
    d = make(learn_sigma=True)
    x0, noise, t = torch.rand(3, 1, 2, 2) * 2 - 1, torch.randn(3, 1, 2, 2), torch.tensor([0, 5, 700])
    out = torch.cat([noise + 0.2, torch.zeros_like(x0)], dim=1).requires_grad_()
    losses = d.training_losses(lambda x_t, tt: out, x0, t, noise)
    (grad,) = torch.autograd.grad(losses.vlb.sum(), out)
    assert grad[:, :1].abs().max() == 0 and grad[:, 1:].abs().min() > 0


@pytest.mark.parametrize("tables_on", ["meta", "cpu"])
def test_data_on_another_device_than_the_tables_names_the_fix(tables_on):
    """The meta device stands in for an accelerator: tables on one device, the batch and t on another."""
    d = make(T=50).to(tables_on)
    data_on = "cpu" if tables_on == "meta" else "meta"
    x0, t = torch.zeros(2, 1, 2, 2, device=data_on), torch.zeros(2, dtype=torch.long, device=data_on)
    with pytest.raises(RuntimeError, match=rf"schedule tables are on {tables_on} but the images are on {data_on} "
                                           rf"and the time steps on {data_on}: move the module .* "
                                           rf"module.to\('{data_on}'\)"):
        d.training_losses(lambda x, tt: x, x0, t)
    with pytest.raises(RuntimeError, match=rf"time steps on {data_on}"):  # t alone elsewhere
        d.training_losses(lambda x, tt: x, torch.zeros(2, 1, 2, 2, device=tables_on), t)



@pytest.mark.parametrize(("t", "match"), [
    (torch.tensor([0, -1]), r"time steps in \[0, 49\].*from -1 to 0"),  # indexing would wrap to T - 1
    (torch.tensor([0, 50]), r"time steps in \[0, 49\].*from 0 to 50"),
    (torch.tensor([0.0, 0.5]), r"integer time steps.*torch.float32.*flow times"),
    (torch.tensor([[0], [1]]), r"shaped \(2,\), one per image"),
    (torch.tensor([0, 1, 2]), r"shaped \(2,\), one per image"),
])
def test_time_steps_outside_the_schedule_are_refused(t, match):
    """t indexes the tables: a negative step would silently read alpha_bar_(T-1), one of T or more fails deep in the
    gather (a device assert on an accelerator). Values are read on the CPU only, as the flow's times are."""
    d = make(T=50)
    with pytest.raises(ValueError, match=match):
        d.training_losses(lambda x, tt: x, torch.zeros(2, 1, 2, 2), t)

def test_training_losses_compile_without_graph_breaks_on_the_cpu():
    """The CPU check of the step values is eager only: under torch.compile reading them broke every compiled step's
    graph in two. fullgraph=True fails on any break; aot_eager keeps it fast."""
    torch._dynamo.reset()
    d = make(T=50, learn_sigma=True)
    conv = torch.nn.Conv2d(1, 2, 1)  # epsilon and the variance interpolation of a 1-channel image

    def net(x, t):
        return conv(x)

    losses = torch.compile(lambda x0, t, noise: d.training_losses(net, x0, t, noise).vlb, backend="aot_eager",
                           fullgraph=True)
    x0, noise, t = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.tensor([0, 7, 49])
    torch.testing.assert_close(losses(x0, t, noise), d.training_losses(net, x0, t, noise).vlb)


# -- zero terminal SNR ------------------------------------------------------------------------
def test_epsilon_prediction_on_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="zero terminal SNR.*prediction 'v'"):
        GaussianDiffusion(zero_terminal_snr(), "epsilon")


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_zero_terminal_snr_samples_gaussian_data(prediction):
    """v and x0 predictions recover x0 where alpha_bar = 0: the exact model samples N(mu, std^2)."""
    d = GaussianDiffusion(zero_terminal_snr(), prediction)
    noise = torch.randn(10_000, 1, generator=torch.Generator().manual_seed(0))
    out = sample_loop(d, optimal_model(d), noise, "ddim", steps=200, clip_denoised=False)
    assert torch.isfinite(out).all()
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(STD, rel=0.02)


# -- solvers --------------------------------------------------------------------------------
def _moments(d, solver, steps, model=None, **kw):
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(10_000, 1, generator=gen)
    out = sample_loop(d, model or optimal_model(d), noise, solver, steps, clip_denoised=False, generator=gen, **kw)
    return out.mean().item(), out.std().item()


@pytest.mark.parametrize("solver", ["ddpm", "ddim"])
def test_solvers_recover_gaussian_data(solver):
    """With the exact denoiser, all T steps reproduce the data distribution, and fewer steps converge
    towards it (coarse steps under-disperse with a fixed variance, a known discretisation bias)."""
    d = make()
    mean, std = _moments(d, solver, 1000)
    assert mean == pytest.approx(MU, abs=0.02)
    assert std == pytest.approx(STD, rel=0.02)
    errors = [abs(_moments(d, solver, steps)[1] - STD) for steps in (25, 250)]
    assert errors[1] < errors[0]


def test_ddpm_is_ddim_with_eta_one():
    """With fixed variance, ancestral DDPM on the respaced chain and DDIM(eta=1) are the same step."""
    d = make(T=100)
    noise = torch.randn(64, 2)
    a = sample_loop(d, optimal_model(d), noise, "ddpm", 20, generator=torch.Generator().manual_seed(1))
    b = sample_loop(d, optimal_model(d), noise, "ddim", 20, eta=1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_ddim_is_deterministic_and_ddpm_is_not():
    d = make(T=100)
    model = optimal_model(d)
    noise = torch.randn(64, 2)
    torch.testing.assert_close(sample_loop(d, model, noise, "ddim", 20), sample_loop(d, model, noise.clone(), "ddim", 20),
                               rtol=0, atol=0)
    c = sample_loop(d, model, noise, "ddpm", 20, generator=torch.Generator().manual_seed(1))
    e = sample_loop(d, model, noise, "ddpm", 20, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(c, e)


def test_solver_visits_the_iddpm_respaced_steps():
    """solver_steps=250 over T = 1000 calls the network at improved DDPM's 250 steps, 999 first."""
    d = make()
    seen = []
    model = optimal_model(d)
    sample_loop(d, lambda x, t: seen.append(t[0].item()) or model(x, t), torch.randn(2, 1), "ddim", 250)
    assert seen == variance.respaced_timesteps(1000, 250).flip(0).tolist()
    assert seen[0] == 999 and seen[-1] == 0 and {4, 164, 169, 995} <= set(seen) and 165 not in seen


def _reference_iddpm(d, model, noise, kept, generator):
    """improved-diffusion's p_sample loop on a respaced chain, written out in float64 from the betas."""
    ab_all = d.schedule.alpha_bar.double()
    x = noise.double()
    for i in reversed(range(len(kept))):
        ab, ab_prev = ab_all[kept[i]], (ab_all[kept[i - 1]] if i > 0 else torch.tensor(1.0, dtype=torch.float64))
        beta = 1 - ab / ab_prev
        out = model(x.float(), torch.full((x.shape[0],), kept[i])).double()
        eps, v = out.chunk(2, dim=1)
        x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
        mean = beta * ab_prev.sqrt() / (1 - ab) * x0 + (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab) * x
        if i == 0:
            return mean
        # posterior variance of this respaced step; the clipped lower end at i = 0 never adds noise
        beta_tilde = beta * (1 - ab_prev) / (1 - ab)
        log_var = (v + 1) / 2 * beta.log() + (1 - v) / 2 * beta_tilde.log()
        x = mean + (0.5 * log_var).exp() * torch.randn(x.shape, generator=generator).double()


def test_learned_variance_ddpm_matches_the_iddpm_respaced_chain():
    """Ancestral sampling with learned sigma on 25 respaced steps equals improved-diffusion's loop:
    the mean and the variance interpolated on the respaced betas, step by step."""
    d = make(learn_sigma=True)
    kept = variance.respaced_timesteps(1000, 25).tolist()
    model = optimal_model(d, lambda x, t: torch.tanh(x) * 0.8)  # a variance output that depends on x_t
    noise = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    ours = sample_loop(d, model, noise, "ddpm", 25, generator=torch.Generator().manual_seed(5))
    reference = _reference_iddpm(d, model, noise, kept, torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours.double(), reference, rtol=1e-3, atol=1e-4)


def test_optimal_learned_variance_makes_a_coarse_chain_exact():
    """For Gaussian data the reverse step of any respaced chain is Gaussian with variance
    beta_tilde' + coef_x0'^2 Var[x0|x_t]; a model that outputs the v for it samples N(mu, std^2)
    in 10 steps, where the fixed posterior variance under-disperses."""
    d = make(learn_sigma=True)
    chain = variance.respace(d.schedule, 10)
    tables = variance.posterior_tables(chain.schedule)
    index = {t: i for i, t in enumerate(chain.timesteps.tolist())}

    def v_optimal(x, t):
        i = index[t[0].item()]
        ab = chain.schedule.alpha_bar[i]
        var_x0 = STD**2 * (1 - ab) / (ab * STD**2 + 1 - ab)
        best = (tables.variance[i] + tables.coef_x0[i] ** 2 * var_x0).log()
        lo, hi = tables.log_variance[i], tables.log_beta[i]
        return torch.full_like(x, (2 * (best - lo) / (hi - lo) - 1).item())

    mean, std = _moments(d, "ddpm", 10, optimal_model(d, v_optimal))
    assert mean == pytest.approx(MU, abs=0.02) and std == pytest.approx(STD, rel=0.015)
    _, std_fixed = _moments(d, "ddpm", 10, optimal_model(d, lambda x, t: torch.full_like(x, -1.0)))
    assert abs(std_fixed - STD) > 3 * abs(std - STD)


def test_ddim_with_learned_sigma_uses_the_mean_only():
    d_fixed, d_learned = make(), make(learn_sigma=True)
    noise = torch.randn(32, 1, 2, 2)
    plain = sample_loop(d_fixed, optimal_model(d_fixed), noise, "ddim", 20)
    learned = sample_loop(d_learned, optimal_model(d_learned, lambda x, t: torch.randn_like(x)), noise, "ddim", 20)
    torch.testing.assert_close(learned, plain, rtol=0, atol=0)


def test_ddim_step_by_hand():
    x0, eps = torch.tensor([0.5]), torch.tensor([-1.0])
    ab_t, ab_s = torch.tensor(0.3), torch.tensor(0.6)
    sigma = 0.5 * math.sqrt(0.4 / 0.7 * (1 - 0.3 / 0.6))
    expected = math.sqrt(0.6) * 0.5 + math.sqrt(1 - 0.6 - sigma**2) * -1.0 + sigma * 2.0
    assert ddim_step(x0, eps, ab_t, ab_s, 0.5, torch.tensor([2.0])).item() == pytest.approx(expected, rel=1e-6)


def test_guidance_mixes_the_prediction_and_keeps_the_conditional_variance():
    def network(x, t, y):  # prediction channel: the label; variance channel: 10 * label
        y = y.float().view(-1, 1)
        return torch.cat([y.expand_as(x), 10 * y.expand_as(x)], dim=1)

    model = guided(network, torch.tensor([2, 4]), null_label=0, scale=3.0)
    out = model(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out, torch.tensor([[6.0, 20.0], [12.0, 40.0]]))  # 0 + 3 (y - 0); 10 y


@pytest.mark.parametrize("kwargs,match", [
    ({"solver": "euler"}, "Unknown solver 'euler'"),
    ({"steps": 1}, "solver_steps must be an integer from 2 to T = 100"),
    ({"steps": 101}, "solver_steps must be an integer from 2 to T = 100"),
    ({"solver": "ddpm", "eta": 0.5}, "eta applies to the ddim solver only"),
    ({"eta": -1.0}, r"eta must be a number in \[0, 1\]"),
    ({"eta": 1.5}, r"eta must be a number in \[0, 1\] \(0: deterministic DDIM, 1: DDPM's variance\), got 1.5"),
])
def test_bad_solver_arguments(kwargs, match):
    d = make(T=100)
    kwargs.setdefault("steps", 10)
    with pytest.raises(ValueError, match=match):
        sample_loop(d, optimal_model(d), torch.randn(2, 1), **kwargs)


def test_unknown_prediction():
    with pytest.raises(ValueError, match="epsilon"):
        make("score")


@pytest.mark.parametrize("learn_sigma,network,error,match", [
    (False, lambda x, t: (x,), TypeError, "must return the prediction as a tensor, got tuple.*`.sample`"),
    (False, lambda x, t: x.round().long(), TypeError, "floating-point predictions, got torch.int64"),
    (False, lambda x, t: x[:, :1], ValueError, r"the data's 3 channels.*got \(2, 1, 4, 4\): set its out_channels to 3\."),
    (False, lambda x, t: x[:, :, ::2, ::2], ValueError, r"keep the input's batch size and size \(4, 4\)"),
    (False, lambda x, t: torch.cat([x, x], 1), ValueError, "out_channels to 3, or learn_sigma=True in the model"),
    (True, lambda x, t: x, ValueError, "2C = 6 channels.*out_channels to 6, or learn_sigma=False in the model"),
])
def test_network_output_is_checked_before_the_loss(learn_sigma, network, error, match):
    """A wrong output type, dtype or shape fails on host metadata, naming the fix, instead of broadcasting."""
    d = make(T=100, learn_sigma=learn_sigma)
    x0 = torch.randn(2, 3, 4, 4)
    with pytest.raises(error, match=match):
        d.training_losses(network, x0, torch.tensor([0, 50]))
    with pytest.raises(error, match=match):
        sample_loop(d, network, x0, steps=2)
