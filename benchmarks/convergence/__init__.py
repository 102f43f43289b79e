"""Convergence: does a time-step strategy reach the uniform baseline's FID in fewer steps?

Each run composes a base config (``--base``, default ``configs/fashion_mnist.yaml``) with the config
files of one run (``runs.RUNS``: a strategy, an ablation, a schedule), trains it through the project's
CLI, evaluates FID (EMA weights, the FID callback of the config, the offline Fashion-MNIST feature
network) every ``--eval-every`` steps, and writes ``<out>/<run>_s<seed>/result.json`` (FID curve,
per-area training loss from TimestepMonitor, wall time per part, the config files and overrides).
Runs execute as processes spread over ``--gpus`` (``--per-gpu`` at a time on each). Every run
checkpoints when it stops (N reached, or the launch's optional ``--time-limit`` spent), and running the
same command again skips finished runs and resumes the others from their checkpoints, so a long
benchmark can also run in parts.

    python -m benchmarks.convergence launch --strategies uniform speed --seeds 0 1 --steps 20000 --gpus 0 1
    python -m benchmarks.convergence launch --jobs uniform:0:20000 speed_sampling_only:0:10000 ...
    python -m benchmarks.convergence launch --base fashion_mnist_dit.yaml --jobs uniform:0:30000 speed:0:30000 ...
    python -m benchmarks.convergence launch --base fashion_mnist_dit.yaml --jobs uniform:0:10000 loss_decrease:0:10000 \
        --stop-at 5000 --summary-key speedup_study ...   # a screen: N = 10k's schedule to 5k ("screen" in speedups.json)
    python -m benchmarks.convergence launch --base fashion_mnist_sit.yaml --jobs uniform:0:10000 speed_auto:0:10000 ...
    python -m benchmarks.convergence report --out benchmarks/results/convergence
    python -m benchmarks.convergence launch --smoke ...   # tiny CPU run for the test suite

Modules: ``runs`` (the config files of each run), ``run`` (one training run), ``launch`` (many runs as
processes), ``report`` (speed-ups, speedups.json, summary.json), ``plots`` (the figures).
"""
