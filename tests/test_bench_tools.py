"""The benchmark scripts' arithmetic and argument checks, without running a benchmark: FLOPs against a hand count,
the warm-up of FID timing, the facts every results file carries, and bad arguments refused before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch


def run_cli(module, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [f"python -m {module.__name__}", *argv])
    threads = torch.get_num_threads()
    try:
        module.main()
    finally:
        torch.set_num_threads(threads)  # --smoke runs on one thread


def test_training_flops_of_a_dit_match_the_hand_count() -> None:
    """Forward: per token 2 x (3d^2 + d^2 + 8d^2) for qkv, output and MLP, 4 N d for the attention's two products,
    per image 2 x 6d^2 for adaLN, the patch embedding, the final layer and the time embedding. Backward: twice the
    forward, less the input gradients nobody asks for (the images into the patch embedding, the sinusoids into the
    time embedding). Exact integers: the counter counts the same products."""
    from benchmarks.throughput import flops_per_image
    from lightning_speed.backbones import DiT

    d, heads, depth, p, size, c = 32, 2, 2, 2, 8, 4
    torch.manual_seed(0)
    net = DiT(preset="DiT-S/2", in_channels=c, image_size=size, learn_sigma=True, depth=depth, hidden_size=d,
              num_heads=heads, patch_size=p)
    n = (size // p) ** 2
    block = 2 * n * (3 * d * d + d * d + 8 * d * d) + 4 * n * n * d + 2 * d * 6 * d
    patch = 2 * n * (c * p * p) * d
    final = 2 * d * 2 * d + 2 * n * d * (p * p * 2 * c)
    time_in = 2 * 256 * d
    forward = depth * block + patch + final + time_in + 2 * d * d
    assert flops_per_image(net, torch.device("cpu"), 2, (c, size, size)) == 3 * forward - patch - time_in


def test_fid_timing_warms_up_every_batch_size_it_samples() -> None:
    from benchmarks.fid_speed import warmup_sizes

    assert warmup_sizes([5000, 10000], 1000) == [1000]
    assert warmup_sizes([500, 10000], 1000) == [500, 1000]  # 500 alone; 10,000 in full batches
    assert warmup_sizes([10000], 3000) == [1000, 3000]  # three full batches and one of 1000
    assert warmup_sizes([8], 16) == [8]


def test_fid_speed_results_name_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import fid_speed

    monkeypatch.setattr(fid_speed, "time_variant", lambda args, variant: {"card": "cpu", "date": "d", "seconds": {}})
    out = tmp_path / "fid.json"
    run_cli(fid_speed, ["--smoke", "--variants", "eager", "--counts", "8", "--out", str(out)], monkeypatch)
    result = json.loads(out.read_text())["eager"]
    assert result["command"] == f"python -m benchmarks.fid_speed --smoke --variants eager --counts 8 --out {out}"


def test_step_profile_results_name_the_command_and_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import step_profile

    monkeypatch.setattr(step_profile, "plain_loop", lambda *args, **kwargs: 1.0)
    monkeypatch.setattr(step_profile, "plain_step", lambda *args, **kwargs: lambda: None)
    monkeypatch.setattr(step_profile, "breakdown", lambda *args: {})
    out = tmp_path / "profile.json"
    argv = ["--smoke", "--batch-sizes", "4", "--variants", "base", "--out", str(out)]
    run_cli(step_profile, argv, monkeypatch)
    result = json.loads(out.read_text())
    assert result["command"] == " ".join(["python -m benchmarks.step_profile", *argv]) and result["card"] == "cpu"


@pytest.mark.parametrize(("module", "argv", "message"), [
    ("fid_speed", ["--counts", "0"], "--counts, --batch-size and --steps must be at least 1"),
    ("fid_speed", ["--batch-size", "0"], "--counts, --batch-size and --steps must be at least 1"),
    ("step_profile", ["--profile-steps", "0"], "--profile-steps must be at least 1"),
    ("step_profile", ["--warmup", "0"], "--profile-steps must be at least 1"),
    ("dit_throughput", ["--repeats", "0"], "--batch, --repeats and --warmup must be at least 1"),
    ("dit_throughput", ["--preset", "DiT-B/2", "DiT-Q/2"], "invalid choice: 'DiT-Q/2'"),
    ("latent_throughput", ["--presets", "DiT-Q/2"], "invalid choice: 'DiT-Q/2'"),
    ("latent_throughput", ["--repeats", "0"], "--repeats and --warmup must be at least 1"),
    ("dit_roofline", ["--preset", "DiT-Q/2"], "invalid choice: 'DiT-Q/2'"),
    ("ddp_scaling", ["--dit-preset", "DiT-Q/2"], "invalid choice: 'DiT-Q/2'"),
    ("strategy_cost", ["--warmup-steps", "0"], "--warmup-steps must be at least 1"),
])
def test_bad_arguments_are_refused_before_any_work(module: str, argv: list[str], message: str,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import importlib

    script = importlib.import_module(f"benchmarks.{module}")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script, ["--smoke", *argv, "--out", str(tmp_path / "out.json")], monkeypatch)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_ddp_scaling_refuses_a_warm_up_of_no_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """No warm-up step would time the compilation in the first window."""
    from benchmarks import ddp_scaling

    monkeypatch.setattr(ddp_scaling, "orchestrate", lambda args: pytest.fail("measured despite --warmup 0"))
    with pytest.raises(SystemExit, match="--warmup, --unet-batches, --dit-batches, --devices and --profile-steps"):
        run_cli(ddp_scaling, ["--smoke", "--warmup", "0"], monkeypatch)


def test_a_smoke_run_of_the_trainer_rows_stays_on_the_cpu_on_a_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """--smoke runs every row on the CPU; the Trainer rows chose the GPU whenever one was there (their ratio to the
    CPU rows then meant nothing). On a machine that says it has a GPU, the Trainer a smoke run builds is a CPU one."""
    from benchmarks import throughput

    class Built(Exception):
        pass

    def trainer(**kwargs):
        raise Built(kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(throughput.pl, "Trainer", trainer)
    backbone = throughput.seeded_backbone(True, torch.device("cpu"))
    with pytest.raises(Built) as built:
        throughput.lightning_loop(backbone, None, batch=4, warmup=1, steps=2, speed=False, smoke=True)
    settings = built.value.args[0]
    assert settings["accelerator"] == "cpu" and settings["precision"] == "32-true"
