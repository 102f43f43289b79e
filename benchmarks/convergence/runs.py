"""The runs of the convergence benchmark: each is a list of config files composed on the base.

Paths are relative to configs/. A run is reproduced by the CLI alone:
``lightning-speed fit --config configs/<base> --config configs/<file> ...`` (result.json lists both).
"""

from __future__ import annotations

from benchmarks.common import REPO

CONFIGS = REPO / "configs"
BASE = "fashion_mnist.yaml"
# summary.json's speed-up key of each base config's study (another base: "speedup_<its file name>")
BASE_KEYS = {BASE: "speedup", "fashion_mnist_dit.yaml": "speedup_dit", "fashion_mnist_sit.yaml": "speedup_flow"}
# The FID curve's solver of each base's protocol (the flow base samples with Euler; the others with DDIM)
PROTOCOL_SOLVERS = {"fashion_mnist_sit.yaml": "euler-50"}

# The shipped strategies, each compared with uniform t on the same schedule.
STRATEGIES: dict[str, tuple[str, ...]] = {
    "uniform": ("strategies/uniform.yaml",),
    "speed": ("strategies/speed.yaml",),
    "speed_auto": ("strategies/speed_auto.yaml",),
    "speed_cosine": ("strategies/speed_auto.yaml", "schedules/cosine.yaml"),
    "p2": ("strategies/p2.yaml",),
    "min_snr": ("strategies/min_snr.yaml",),
    "logit_normal": ("strategies/logit_normal.yaml",),
    "clts": ("strategies/clts.yaml",),
    "loss_aware": ("strategies/loss_aware.yaml",),
}
# Ablations for studying SpeeD: one change to a strategy, named after the change.
ABLATIONS: dict[str, tuple[str, ...]] = {
    "uniform_cosine": ("strategies/uniform.yaml", "schedules/cosine.yaml"),  # the baseline of speed_cosine
    "speed_k2": ("strategies/speed_k2.yaml",),  # milder suppression of t >= tau
    "speed_no_dual": ("ablations/speed_no_dual.yaml",),
    "speed_lam1": ("ablations/speed_lam1.yaml",),  # does the full change-aware shape rescue asymmetric sampling?
    "speed_sampling_only": ("ablations/speed_sampling_only.yaml",),  # asymmetric sampling, w = 1
    "speed_weighting_only": ("ablations/speed_weighting_only.yaml",),  # uniform t, SpeeD's w
    # lambda and tau of change-aware weighting alone; lambda 1 at tau 700, the best variant measured, ships
    # as the strategy change_aware.
    "speed_weighting_only_lam05": ("ablations/speed_weighting_only_lam05.yaml",),
    "speed_weighting_only_lam08": ("ablations/speed_weighting_only_lam08.yaml",),
    "speed_weighting_only_lam1": ("strategies/change_aware.yaml",),
    "speed_weighting_only_lam1_tau_auto": ("ablations/speed_weighting_only_lam1_tau_auto.yaml",),
    "speed_weighting_only_lam1_tau850": ("ablations/speed_weighting_only_lam1_tau850.yaml",),
}
# Candidates for reaching uniform's FID in half the steps (configs/study/): measured, not recommended yet.
STUDY: dict[str, tuple[str, ...]] = {
    "curriculum_speed": ("study/curriculum_speed.yaml",),  # SpeeD's sampling annealed to uniform by N / 2
    "curriculum_logit_normal": ("study/curriculum_logit_normal.yaml",),  # logit-normal, uniform from N / 2 on
    "official_code_min_snr": ("study/official_code_min_snr.yaml",),  # the SpeeD code's "min_snr": 5 / (1 + SNR)
    "official_code_clts": ("study/official_code_clts.yaml",),  # the SpeeD code's "clts": a spike at t = 300
    "laplace_log_snr": ("study/laplace_log_snr.yaml",),
    "edm_log_normal": ("study/edm_log_normal.yaml",),
    "speed_sampling_min_snr": ("study/speed_sampling_min_snr.yaml",),
    "logit_normal_change_aware": ("study/logit_normal_change_aware.yaml",),
    "loss_decrease": ("study/loss_decrease.yaml",),  # adaptive: draws follow each bin's recent loss decrease
    "stratified_uniform": ("study/stratified_uniform.yaml",),  # uniform t, one stratum of [0, T) per sample
    "stratified_speed": ("study/stratified_speed.yaml",),  # SpeeD's sampling with stratified u, SpeeD's weights
    # uniform t with a OneCycle learning rate over the run's N steps: the tuned baseline
    "uniform_onecycle": ("strategies/uniform.yaml", "study/onecycle_lr.yaml"),
    # the screen's furthest strategies on that rate, compared with it: does a strategy add to a tuned rate?
    "speed_onecycle": ("strategies/speed.yaml", "study/onecycle_lr.yaml"),
    "speed_sampling_min_snr_onecycle": ("study/speed_sampling_min_snr.yaml", "study/onecycle_lr.yaml"),
    # the EMA with a warm-up (every strategy's average lags its weights early): the lever itself, then SpeeD on it
    "uniform_ema_warmup": ("strategies/uniform.yaml", "study/ema_warmup.yaml"),
    "speed_ema_warmup": ("strategies/speed.yaml", "study/ema_warmup.yaml"),
    # both levers together, the tuned rate and the warm-up: the recipe, then SpeeD on it
    "uniform_onecycle_ema_warmup": ("strategies/uniform.yaml", "study/onecycle_lr.yaml", "study/ema_warmup.yaml"),
    "speed_onecycle_ema_warmup": ("strategies/speed.yaml", "study/onecycle_lr.yaml", "study/ema_warmup.yaml"),
    # the paper's small-data regime: 1,336 training images
    "uniform_1336": ("strategies/uniform.yaml", "study/fashion_mnist_1336.yaml"),
    "speed_1336": ("strategies/speed.yaml", "study/fashion_mnist_1336.yaml"),
}
# The study runs that a flow base takes (configs/fashion_mnist_sit.yaml): the others hold SpeeD's discrete tau (700)
# or CLTS, which have no flow form, and fail at setup there.
FLOW_STUDY = ("curriculum_logit_normal", "laplace_log_snr", "edm_log_normal", "official_code_min_snr", "loss_decrease",
              "stratified_uniform", "uniform_onecycle", "uniform_ema_warmup", "uniform_onecycle_ema_warmup",
              "uniform_1336")
RUNS: dict[str, tuple[str, ...]] = {**STRATEGIES, **ABLATIONS, **STUDY}
NAMES = sorted(RUNS)
# A strategy on another noise schedule, data set or learning rate is compared with uniform sampling there (the default: "uniform").
BASELINES = {"speed_cosine": "uniform_cosine", "speed_1336": "uniform_1336", "speed_onecycle": "uniform_onecycle",
             "speed_sampling_min_snr_onecycle": "uniform_onecycle", "speed_ema_warmup": "uniform_ema_warmup",
             "speed_onecycle_ema_warmup": "uniform_onecycle_ema_warmup"}

# Overrides that may change from one part of a run to the next without changing what it trains: N (a run is
# resumed to a larger N), paths (the same folders seen from another working directory or machine), and
# compilation (launch retries a failed part with --eager, which drops the compiled sampling too).
PER_PART = {"--trainer.max_steps", "--trainer.logger.init_args.save_dir", "--data.init_args.root",
            "--model.compile_mode", "--model.compile_sampling"}
# Overrides that differ between runs compared with each other without changing what they train or how their FID is
# measured: the seed, and how often a run evaluates and logs.
PER_RUN = {"--seed_everything", "--fid.init_args.every_n_steps", "--samples.init_args.every_n_steps",
           "--monitor.init_args.log_every_n_steps"}


def config_args(base: str, run: str) -> list[str]:
    """``--config`` arguments composing ``base`` with the config files of ``run``."""
    return [arg for name in (base, *RUNS[run]) for arg in ("--config", str(CONFIGS / name))]
