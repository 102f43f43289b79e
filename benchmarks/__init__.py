"""Benchmarks of lightning_speed, run from the repository root as modules:

    python -m benchmarks.throughput      training images/s: plain PyTorch loop, Trainer, SpeeD, EMA
    python -m benchmarks.step_profile    where one training step's time goes
    python -m benchmarks.fid_speed       seconds per FID point
    python -m benchmarks.ddp_scaling     images/s on N GPUs over 1
    python -m benchmarks.convergence     FID against training step: launch runs, train one, report

Raw results go to benchmarks/results/; BENCHMARKS.md reads them.
"""
