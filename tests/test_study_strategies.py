"""The convergence study's candidates (configs/study/, ``STUDY`` in benchmarks/convergence/runs.py).

Closed forms: log-SNR tables against direct numerical integration and against draws of the continuous
density mapped to the nearest step; the SpeeD code's ``min_snr`` (5 / (1 + SNR)) and ``clts`` (a spike at
t = 300). Statistics: the curriculum's mixture at a given step (chi-square, threshold at a false-alarm
probability of 1e-6). Checkpoints, a sampling and a weighting strategy installed together, and two CLI
steps of every study run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from scipy import integrate, stats

from benchmarks.convergence.runs import CONFIGS, RUNS, STUDY
from conftest import have_fashion_mnist  # pytest puts tests/ on sys.path
from lightning_speed.callbacks import TimestepCallback
from lightning_speed.cli import main
from lightning_speed.schedules import NoiseSchedule
from lightning_speed.timesteps import (
    CLTSSampling,
    CurriculumSampling,
    EDMLogNormalSampling,
    LaplaceLogSNRSampling,
    LogitNormalSampling,
    LossAwareSampling,
    LossDecreaseSampling,
    MinSNRWeighting,
    P2Weighting,
    SpeeD,
    StratifiedSampling,
    TableSampling,
    edm_log_normal_probabilities,
    laplace_log_snr_probabilities,
)

from _fixtures import EPS64, float64_rtol
from test_strategy_callbacks import Recorder, TinyDiffusion, asymmetric, change_aware, fit, install, loader, trainer

FALSE_ALARM = 1e-6


def zero_terminal_snr(T: int = 1000) -> NoiseSchedule:
    betas = NoiseSchedule.from_name("linear", T).betas.clone()
    betas[-1] = 1.0
    return NoiseSchedule(betas, name="linear_zero_snr")


SCHEDULES = {
    "linear": lambda: NoiseSchedule.from_name("linear", 1000),
    "cosine": lambda: NoiseSchedule.from_name("cosine", 1000),
    "zero_snr": zero_terminal_snr,
}


def chi_square_ok(draws: torch.Tensor, probs: np.ndarray, false_alarm: float = FALSE_ALARM) -> tuple[float, float]:
    """Pearson's statistic of ``draws`` against ``probs`` (bins expecting fewer than 5 pooled) and the
    threshold that an exact sampler exceeds with probability ``false_alarm``."""
    n = draws.numel()
    counts = np.bincount(draws.numpy(), minlength=len(probs)).astype(float)
    expected = n * probs
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    assert observed[~keep].sum() == 0, "draws where the table has no mass"
    statistic = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return statistic, float(stats.chi2.ppf(1 - false_alarm, keep.sum() - 1))


# --------------------------------------------------------------------------- log-SNR densities
def log_snr_edges_numpy(schedule: NoiseSchedule) -> np.ndarray:
    ab = schedule.alpha_bar.numpy()
    with np.errstate(divide="ignore"):
        lam = np.log(ab / (1.0 - ab))
    return np.concatenate([[np.inf], 0.5 * (lam[:-1] + lam[1:]), [-np.inf]])


DENSITIES = {  # (our table, the distribution of lambda, its centre, its scale)
    "laplace": (lambda s: laplace_log_snr_probabilities(s, 0.0, 0.5), stats.laplace(loc=0.0, scale=0.5), 0.0, 0.5),
    # ln sigma ~ N(-1.2, 1.2^2) and lambda = log(1 / sigma^2) = -2 ln sigma ~ N(2.4, 2.4^2)
    "edm": (lambda s: edm_log_normal_probabilities(s, -1.2, 1.2), stats.norm(loc=2.4, scale=2.4), 2.4, 2.4),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("density", sorted(DENSITIES))
def test_log_snr_tables_integrate_the_density_over_each_steps_interval(density: str, schedule: str) -> None:
    table, dist, centre, scale = DENSITIES[density]
    sched = SCHEDULES[schedule]()
    ours = table(sched).numpy()
    edges = log_snr_edges_numpy(sched)
    assert ours.dtype == np.float64 and ours.shape == (1000,) and (ours >= 0).all()
    assert abs(ours.sum() - 1.0) <= 1000 * EPS64  # the edges telescope to the whole line
    reference, error = np.zeros(1000), np.zeros(1000)
    for t in range(1000):
        upper, lower = edges[t], edges[t + 1]
        for a, b in [(lower, min(upper, centre)), (max(lower, centre), upper)]:  # split at the kink / the mode
            if a < b:
                value, err = integrate.quad(dist.pdf, a, b, epsabs=0.0, epsrel=1e-11, limit=200)
                reference[t] += value
                error[t] += err
    if schedule == "zero_snr":
        assert ours[-1] == reference[-1] == 0.0  # lambda = -inf is one point: no mass
        ours, reference, error, edges = ours[:-1], reference[:-1], error[:-1], edges[:-1]
    # Our P(t) is a difference of two tail probabilities (the side of the centre the step lies on), each exact
    # to a few ulps of its value, whose argument (lambda - c) / scale carries rounding of the log-SNR: the
    # error relative to P grows with the cancellation and with the argument (linearly for Laplace's exp,
    # quadratically for the normal's tail). Beside it, quad's own error bound.
    upper, lower = edges[:-1], edges[1:]
    right = lower >= centre
    operands = np.where(right, np.maximum(dist.sf(lower), dist.sf(upper)), np.maximum(dist.cdf(upper), dist.cdf(lower)))
    finite = np.where(np.isfinite(edges), np.abs(edges - centre) / scale, 0.0)
    argument = np.maximum(finite[:-1], finite[1:])
    amplification = np.maximum(1.0, operands / reference) * (1 + argument) ** 2
    tolerance = error + float64_rtol(8, 1.0) * amplification * reference
    assert np.all(np.abs(ours - reference) <= tolerance), np.max(np.abs(ours - reference) / tolerance)


def test_log_snr_tables_match_draws_of_the_continuous_density_at_the_nearest_step() -> None:
    """Independent of the edges: draw lambda from the continuous density (EDM: through ln sigma and
    sigma^2 = (1 - alpha_bar) / alpha_bar), take the step whose log-SNR is nearest, compare histograms."""
    sched = NoiseSchedule.from_name("linear", 1000)
    ab = sched.alpha_bar.numpy()
    lam = -2.0 * np.log(np.sqrt((1 - ab) / ab))  # each step's log-SNR, through its EDM sigma
    rng = np.random.default_rng(0)
    draws = {"laplace": rng.laplace(0.0, 0.5, 100_000), "edm": -2.0 * rng.normal(-1.2, 1.2, 100_000)}
    for name, values in draws.items():
        steps = np.concatenate([np.abs(lam[None] - chunk[:, None]).argmin(1) for chunk in np.array_split(values, 20)])
        statistic, threshold = chi_square_ok(torch.as_tensor(steps), DENSITIES[name][0](sched).numpy())
        assert statistic < threshold, (name, statistic, threshold)


@pytest.mark.parametrize("build", [LaplaceLogSNRSampling, EDMLogNormalSampling])
def test_log_snr_strategies_draw_their_tables(build: Any) -> None:
    sampler = build().bind(NoiseSchedule.from_name("cosine", 1000))
    assert isinstance(sampler, TableSampling)
    sampler.manual_seed(0)
    statistic, threshold = chi_square_ok(sampler.sample(200_000), sampler.probs.double().numpy())
    assert statistic < threshold


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: LaplaceLogSNRSampling(b=0), "b .* must be a positive number, got 0"),
        (lambda: LaplaceLogSNRSampling(mu=float("nan")), "mu .* must be a finite number"),
        (lambda: EDMLogNormalSampling(p_std=-1.2), "p_std .* must be a positive number"),
    ],
)
def test_log_snr_arguments_fail_at_construction(build: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


# --------------------------------------------------------------------------- the SpeeD code's variants
def test_official_code_min_snr_is_five_times_p2() -> None:
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - betas)
    snr = ab / (1 - ab)
    weights = P2Weighting(k=1.0, gamma=1.0, scale=5.0).bind(NoiseSchedule.from_name("linear", 1000)).table.double().numpy()
    np.testing.assert_allclose(weights, 5.0 / (1.0 + snr), rtol=2 * np.finfo(np.float32).eps)  # stored in float32
    assert round(float(weights[500]), 2) == 4.61 and round(float(weights[999]), 1) == 5.0
    min_snr = MinSNRWeighting(gamma=5.0).bind(NoiseSchedule.from_name("linear", 1000)).table
    assert float(min_snr[500]) == float(min_snr[999]) == 1.0  # what Min-SNR-5 gives there
    with pytest.raises(ValueError, match="P2's scale must be a positive number, got 0"):
        P2Weighting(scale=0)


def test_official_code_clts_is_a_spike_at_300_mixed_with_uniform() -> None:
    sampler = CLTSSampling(mu=300.0, sigma=0.001, total_steps=50_000).bind(NoiseSchedule.from_name("linear", 1000))
    target = sampler.target_probs.double()
    assert float(target[300]) == 1.0 and float(target.sum()) == 1.0
    sampler.set_step(20_000)  # a = 0.4
    a = 0.4
    expected = np.full(1000, (1 - a) / 1000)
    expected[300] += a
    np.testing.assert_allclose(sampler.probabilities().double().numpy(), expected, rtol=1e-6)
    sampler.manual_seed(0)
    draws = sampler.sample(200_000)
    statistic, threshold = chi_square_ok(draws, expected)
    assert statistic < threshold
    sampler.set_step(80_000)  # past 50k: all mass on t = 300 (the SpeeD code's uniform share would be negative)
    assert torch.equal(sampler.sample(64), torch.full((64,), 300))


# --------------------------------------------------------------------------- curriculum
LINEAR = NoiseSchedule.from_name("linear", 1000)


def curriculum(early: Any, shape: str = "linear", schedule: NoiseSchedule = LINEAR) -> CurriculumSampling:
    """A bound curriculum with switch 1: it reaches uniform t at the max_steps given to set_step."""
    return CurriculumSampling(early, switch=1.0, shape=shape).bind(schedule)


def test_curriculum_share_follows_the_step() -> None:
    linear, step = curriculum(LogitNormalSampling(), "linear"), curriculum(LogitNormalSampling(), "step")
    for s, a_linear, a_step in [(0, 1.0, 1.0), (100, 0.75, 1.0), (399, 1 / 400, 1.0), (400, 0.0, 0.0), (10_000, 0.0, 0.0)]:
        linear.set_step(s, 400)
        step.set_step(s, 400)
        assert linear.anneal_steps == step.anneal_steps == 400
        assert linear.share == pytest.approx(a_linear) and step.share == a_step
    half = CurriculumSampling(LogitNormalSampling(), switch=0.5)
    half.set_step(10, 1000)
    assert half.anneal_steps == 500 and half.share == pytest.approx(0.98)


@pytest.mark.parametrize("early", ["asymmetric", "logit_normal"])
@pytest.mark.parametrize("share", [0.3, 0.8])
def test_curriculum_draws_the_mixture_at_a_given_step(early: str, share: float) -> None:
    inner = asymmetric(700, 5.0, dual=False) if early == "asymmetric" else LogitNormalSampling()
    sampler = curriculum(inner)
    sampler.set_step(round((1 - share) * 1000), 1000)
    assert sampler.share == pytest.approx(share)
    expected = share * inner.probabilities().double().numpy() + (1 - share) / 1000
    np.testing.assert_allclose(sampler.probabilities().double().numpy(), expected, rtol=1e-6)
    sampler.manual_seed(1)
    draws = torch.cat([sampler.sample(50_000) for _ in range(4)])
    statistic, threshold = chi_square_ok(draws, expected)
    assert statistic < threshold, (statistic, threshold)
    if early == "asymmetric":  # the share of t < tau: a Binomial count, 5 standard deviations
        p = share * 3500 / 3800 + (1 - share) * 0.7
        n = draws.numel()
        assert abs(float((draws < 700).float().mean()) - p) < 5 * np.sqrt(p * (1 - p) / n)


def test_curriculum_ends_are_the_early_strategy_and_uniform() -> None:
    sampler = curriculum(asymmetric(700, 5.0, dual=True))
    sampler.set_step(0, 10)
    sampler.manual_seed(7)
    alone = asymmetric(700, 5.0, dual=True).bind(LINEAR)
    alone.manual_seed(8)  # the early strategy's seed is the curriculum's + 1
    assert torch.equal(sampler.sample(33), alone.sample(33))  # a = 1: dual pairs kept
    sampler.set_step(10, 10)
    statistic, threshold = chi_square_ok(sampler.sample(100_000), np.full(1000, 1e-3))
    assert statistic < threshold
    assert sampler.tau == 700 and sampler.resolved_tau == 700


def test_curriculum_state_round_trip() -> None:
    schedule = NoiseSchedule.from_name("cosine", 100)
    make = lambda: curriculum(asymmetric("auto", 5.0), schedule=schedule)  # noqa: E731
    sampler = make()
    sampler.manual_seed(3)
    sampler.set_step(20, 50)
    sampler.sample(16)
    state = sampler.extra_state()
    assert state["step"] == 20 and state["early"]["seed"] == 4
    expected = sampler.sample(64)
    fresh = make()
    fresh.set_step(0, 50)
    fresh.load_extra_state(state)
    assert fresh.step == 20 and fresh.share == pytest.approx(0.6)
    assert torch.equal(fresh.sample(64), expected)


def test_a_curriculum_resumed_with_another_max_steps_says_how_its_share_moves() -> None:
    """The checkpoint keeps the length annealed over (switch 0.5 of 10000: 5000); a resume with max_steps 20000 warns
    with the shares before and after (1 - 2500 / 5000 = 0.50 -> 1 - 2500 / 10000 = 0.75) and the switch that keeps the
    curriculum (5000 / 20000 = 0.25); the same length resumes quietly, and once."""
    import warnings

    schedule = NoiseSchedule.from_name("linear", 100)
    make = lambda: CurriculumSampling(LogitNormalSampling()).bind(schedule)  # noqa: E731
    first = make()
    first.set_step(2_500, 10_000)
    state = first.extra_state()
    assert state["anneal_steps"] == 5_000
    same = make()
    same.load_extra_state(state)
    assert same.share == 0.5  # the checkpoint's curriculum before the run's length is known
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.set_step(2_500, 10_000)
    longer = make()
    longer.load_extra_state(state)
    with pytest.warns(UserWarning, match=r"resumed at step 2500 with trainer.max_steps=20000, but it was annealing to "
                                         r"uniform t over 5000 steps.*from a = 0.50 to 0.75. Set switch: 0.25 to keep"):
        longer.set_step(2_500, 20_000)
    assert longer.share == 0.75 and longer.anneal_steps == 10_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        longer.set_step(2_501, 20_000)
    shorter = make()
    shorter.load_extra_state(state)
    with pytest.warns(UserWarning, match=r"from a = 0.50 to 0.00. The run now ends before the old switch step"):
        shorter.set_step(2_500, 4_000)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: CurriculumSampling(LossAwareSampling()), ValueError, "fixed distribution, got LossAwareSampling"),
        (lambda: CurriculumSampling(CLTSSampling()), ValueError, "fixed distribution, got CLTSSampling"),
        (lambda: CurriculumSampling(CurriculumSampling(LogitNormalSampling())), ValueError,
         r"draw each t on its own, got CurriculumSampling.*CurriculumSampling\(LogitNormalSampling\(\.\.\.\)\)"),
        (lambda: CurriculumSampling(StratifiedSampling(SpeeD(lam=None))), ValueError,
         r"draw each t on its own, got StratifiedSampling.*a stratified batch.*CurriculumSampling\(SpeeD\(\.\.\.\)\)"),
        (lambda: CurriculumSampling(SpeeD()), ValueError, r"early=SpeeD\(.*lam=0.6\) also weights the loss.*SpeeD\(lam=None\)"),
        (lambda: CurriculumSampling(SpeeD(k=1, dual=False, lam=None)), ValueError, r"early=SpeeD\(.*\) draws uniform t"),
        (lambda: CurriculumSampling(LogitNormalSampling(), shape="cosine"), ValueError, "Unknown curriculum shape 'cosine'"),
        (lambda: CurriculumSampling(LogitNormalSampling(), switch=0), ValueError, r"switch must be a number in \(0, 1\]"),
        (lambda: CurriculumSampling(LogitNormalSampling(), switch=1.5), ValueError, r"switch must be a number in \(0, 1\]"),
        (lambda: CurriculumSampling(P2Weighting()), TypeError, "early must be a sampling strategy"),
    ],
)
def test_bad_study_arguments_fail_at_construction(build: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build()


def test_curricula_refuse_a_step_that_is_no_optimizer_step() -> None:
    """A step below 0 gave the curriculum a share above 1 (a negative uniform mass in its probabilities) and moved
    CLTS's tables past uniform (a negative probability at t = 300 for the official spike); a tensor step would be
    read on the host, a sync on the GPU."""
    for sampler in (curriculum(LogitNormalSampling()), CLTSSampling(sigma=0.001).bind(LINEAR)):
        with pytest.raises(ValueError, match=r"step must be an integer of at least 0, got -1; the optimizer step"):
            sampler.set_step(-1, 10)
        with pytest.raises(TypeError, match="step must be an integer, got tensor"):
            sampler.set_step(torch.tensor(3), 10)
        sampler.set_step(np.int64(3), 10)
        assert sampler.step == 3 and type(sampler.step) is int


def test_curriculum_anneals_over_a_fraction_of_max_steps() -> None:
    module = TinyDiffusion()
    early = LogitNormalSampling()
    strategy = CurriculumSampling(early, switch=0.5)
    fit(module, [install(strategy, seed=0)], steps=8)
    assert module.timesteps.sampler is strategy and strategy.early is early and early.num_timesteps == 1000
    assert strategy.anneal_steps == 4
    assert strategy.step == 7 and strategy.share == 0.0  # set at the start of the last step
    module = TinyDiffusion()
    fit(module, [install(CurriculumSampling(asymmetric(tau="auto")), seed=0)], steps=1)
    assert module.timesteps.tau == 642  # the early strategy's tau splits the monitor's areas


def test_curriculum_needs_max_steps() -> None:
    rec = Recorder()
    with pytest.raises(ValueError, match="but max_steps is -1: set trainer.max_steps"):
        trainer(-1, [install(CurriculumSampling(LogitNormalSampling())), rec], max_epochs=1).fit(TinyDiffusion(), loader())
    assert rec.t == []  # at setup, before any step


class _StopAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


RESUMABLE = {
    "curriculum": lambda: install(CurriculumSampling(asymmetric(tau=12, k=5), switch=0.6)),
    "curriculum_step": lambda: install(CurriculumSampling(LogitNormalSampling(), switch=0.3, shape="step")),
    "curriculum_weighted": lambda: install(CurriculumSampling(LogitNormalSampling(), switch=0.6), change_aware(tau=12)),
    # adaptive: the loss averages are part of the state; min_count 1 makes it adapt within these steps
    "loss_decrease": lambda: install(LossDecreaseSampling(bins=4, fast=0.5, slow=0.9, min_count=1.0)),
}


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=cuda)])
@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_resume_continues_the_same_time_steps(name: str, accelerator: str, tmp_path: Path) -> None:
    total, stop, make = 10, 5, RESUMABLE[name]
    pl.seed_everything(0)
    full = fit(TinyDiffusion(num_timesteps=20, schedule="cosine"), [make()], steps=total, accelerator=accelerator)

    pl.seed_everything(0)
    first, first_callback = Recorder(), make()
    first_trainer = trainer(total, [first_callback, first, _StopAt(stop)], accelerator=accelerator)
    first_trainer.fit(TinyDiffusion(num_timesteps=20, schedule="cosine"), loader())
    assert first_trainer.global_step == stop
    ckpt = tmp_path / "stop.ckpt"
    first_trainer.save_checkpoint(ckpt)

    pl.seed_everything(123)  # another global seed: the sampler's state must come from the checkpoint
    second = Recorder()
    resumed = make()
    trainer(total, [resumed, second], accelerator=accelerator).fit(
        TinyDiffusion(num_timesteps=20, schedule="cosine"), loader(), ckpt_path=ckpt
    )
    assert len(second.t) == total - stop
    for step, (a, b) in enumerate(zip(full.t, [*first.t, *second.t])):
        assert torch.equal(a, b), f"step {step} differs"
    if isinstance(resumed.sampling, CurriculumSampling):
        assert resumed.sampling.step == total - 1
    else:  # adapted by the stop, so the draws after it depend on the restored loss averages
        assert not torch.allclose(first_callback.sampling.bin_probs.cpu(), torch.full((4,), 0.25))


@cuda
def test_study_samplers_never_sync_on_the_gpu() -> None:
    curricula = [curriculum(asymmetric(700, 5.0, dual=True)), curriculum(LogitNormalSampling(), "step")]
    samplers = [*curricula, LaplaceLogSNRSampling().bind(LINEAR), EDMLogNormalSampling().bind(LINEAR),
                CLTSSampling(mu=300.0, sigma=0.001).bind(LINEAR)]
    weights = P2Weighting(scale=5.0).bind(LINEAR).to("cuda")
    strategy = TinyDiffusion().timesteps
    strategy.weights = weights
    for s in samplers:
        s.manual_seed(0)
        strategy.sampler = s
        strategy.sample(4, "cuda")  # move the tables and build the generators outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (0, 50, 100):  # a = 1, 0.5, 0
            for s in samplers:
                s.set_step(step, 100)
                strategy.sampler = s
                t = strategy.sample(256, "cuda")
                loss = strategy.loss(t, torch.rand(256, device="cuda"), torch.rand(256, device="cuda"))
                assert t.is_cuda and loss.is_cuda
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(s.early.generator.device.type == "cuda" for s in curricula)


# --------------------------------------------------------------------------- a sampling and a weighting strategy
def test_a_sampling_and_a_weighting_strategy_draw_like_the_sampling_one_alone() -> None:
    sampling, weighting = asymmetric(tau=700, k=5), MinSNRWeighting(gamma=5.0)
    module = TinyDiffusion()
    callback = install(sampling, weighting, seed=3)
    rec = fit(module, [callback], steps=3)
    assert module.timesteps.sampler is sampling and module.timesteps.weights is weighting
    assert module.timesteps.tau == 700
    alone = fit(TinyDiffusion(), [install(asymmetric(tau=700, k=5), seed=3)], steps=3)
    snr = module.timesteps.schedule.snr
    for a, b, w in zip(rec.t, alone.t, rec.weight):
        assert torch.equal(a, b)
        torch.testing.assert_close(w, (5 / snr).clamp(max=1).float()[a])
    assert set(callback.state_dict()) == {"sampling", "rank"}


def test_a_curriculum_next_to_a_weighting_follows_the_step() -> None:
    strategy = CurriculumSampling(LogitNormalSampling(), switch=1.0)
    fit(TinyDiffusion(), [install(strategy, P2Weighting(scale=5.0))], steps=3)
    assert strategy.step == 2 and strategy.anneal_steps == 3


# --------------------------------------------------------------------------- the study's configs
def test_every_study_file_is_composed_by_a_study_run() -> None:
    files = {f"study/{p.name}" for p in (CONFIGS / "study").glob("*.yaml")}
    used = {f for files_ in STUDY.values() for f in files_}
    assert files == {f for f in used if f.startswith("study/")}
    assert set(STUDY) <= set(RUNS)


@pytest.mark.parametrize("run", sorted(STUDY))
def test_every_study_run_trains_two_cli_steps_on_the_quickstart_base(run: str, cli_env: Path) -> None:
    """The quickstart sets SpeeD: strategies/uniform.yaml clears it before the run's files, as the CLI requires
    of a strategy file of another class."""
    files = ["quickstart.yaml", "strategies/uniform.yaml", *RUNS[run]]
    if any("1336" in f for f in files) and not have_fashion_mnist():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    args = ["fit", *(a for f in files for a in ("--config", str(CONFIGS / f))),
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(cli_env / "runs"), "--trainer.accelerator", "cpu",
            "--fid", "null", "--samples", "null", "--checkpoint", "null", "--trainer.enable_checkpointing", "false"]
    cli = main(args)
    model, trainer_ = cli.model, cli.trainer
    assert trainer_.global_step == 2
    strategies = None  # the classes of the last file that sets them
    for f in files:
        config = yaml.safe_load((CONFIGS / f).read_text())
        if "timesteps" in config:
            value = config["timesteps"]
            strategies = value and [item["class_path"].rsplit(".", 1)[-1] for item in (value if isinstance(value, list) else [value])]
    installed = [cb for cb in trainer_.callbacks if isinstance(cb, TimestepCallback)]
    if strategies is None:
        assert installed == [] and type(model.timesteps.sampler).__name__ == "UniformSampling"
    else:
        (cb,) = installed
        assert [type(s).__name__ for s in cb.strategies] == strategies
        assert model.timesteps.sampler is (cb.sampling or model.timesteps.sampler)
        assert model.timesteps.weights is (cb.weighting or model.timesteps.weights)
        assert {cb.sampling, cb.weighting} - {None} == set(cb.strategies)  # each strategy plays its role
    if isinstance(model.timesteps.sampler, CurriculumSampling):
        assert model.timesteps.sampler.anneal_steps == 1 and model.timesteps.sampler.step == 1
    if run == "official_code_clts":
        assert float(model.timesteps.sampler.target_probs[300]) == 1.0
    if run.endswith("_onecycle"):  # the tuned rate, alone or under a strategy
        (config,) = trainer_.lr_scheduler_configs
        scheduler = config.scheduler
        assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and config.interval == "step"
        assert scheduler.total_steps == 2 and scheduler.last_epoch == 2  # the run's length: the cycle ends with it
    if run.endswith("_1336"):
        assert type(cli.datamodule).__name__ == "FashionMNISTDataModule" and cli.datamodule.train_subset == 1336
        assert cli.datamodule.split_size("train") == 1336 and cli.datamodule.split_size("test") == 10_000


# --------------------------------------------------------------------------- the paper's data regime
def test_train_subset_is_a_fixed_subset_of_the_training_images(tmp_path: Path) -> None:
    from lightning_speed.data import FashionMNISTDataModule
    from test_data import write_fake_fashion

    write_fake_fashion(tmp_path, n_train=40, n_test=6)
    full = FashionMNISTDataModule(root=str(tmp_path), val_images=6)
    full.setup("fit")
    images, labels = full._split("train")
    subsets = []
    for seed in (0, 1):  # the data seed shuffles batches; it does not choose the subset
        dm = FashionMNISTDataModule(root=str(tmp_path), train_subset=7, seed=seed, val_images=6)
        dm.setup("fit")
        sub_images, sub_labels = dm._split("train")
        assert sub_images.shape == (7, 1, 32, 32) and dm.split_size("test") == 6
        rows = [int(np.flatnonzero((images == image).flatten(1).all(1))[0]) for image in sub_images]
        assert rows == sorted(set(rows)) and torch.equal(labels[rows], sub_labels)  # distinct rows, in file order
        subsets.append(rows)
    assert subsets[0] == subsets[1]
    assert subsets[0] == sorted(np.random.RandomState(0).permutation(40)[:7].tolist())  # SUBSET_SEED, legacy stream
    assert dm.hparams.train_subset == 7
    with pytest.raises(ValueError, match="train_subset=41 but .* holds 40 training images: use train_subset <= 40"):
        FashionMNISTDataModule(root=str(tmp_path), train_subset=41, val_images=6).setup("fit")
    with pytest.raises(ValueError, match="train_subset must be an integer of at least 1, got 0"):
        FashionMNISTDataModule(train_subset=0)
