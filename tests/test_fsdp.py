"""FSDP with the SpeeD callbacks and the EMA, through the shipped config, on 2 GPUs (Lightning refuses FSDP on the
CPU; the EMA's shard path also runs on the CPU in test_ema.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ROOTS = [REPO / ".data", Path("/usr/share/datasets/fashion-mnist")]
DATA = next((p for p in DATA_ROOTS if (p / "train-images-idx3-ubyte.gz").exists()), None)

pytestmark = [
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs 2 CUDA GPUs (Lightning refuses it on the CPU)"),
    pytest.mark.skipif(DATA is None, reason="needs the Fashion-MNIST files (apt-get install dataset-fashion-mnist)"),
]


def _run(out: Path, steps: int, ckpt: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(REPO / "tests" / "fsdp_script.py"), str(out), str(DATA), str(steps)]
    proc = subprocess.run(command + ([ckpt] if ckpt else []), cwd=out, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out / f"result_{steps}.pt", weights_only=False)


def _assert_average(checkpoint: dict, reference: dict, steps: int) -> None:
    """The gathered shard average equals the float64 EMA of the gathered weights, to fp32 rounding.

    The first update copies exactly; each later fp32 lerp ``a + w (b - a)`` rounds twice, each time by at most
    half an ulp of a value no larger than twice the tensor's largest magnitude S: 2 eps S per step. ``4 steps eps S``
    leaves a factor 2 for S changing over the steps."""
    average = checkpoint["state_dict"]
    assert reference.keys() <= average.keys()
    for name, expected in reference.items():
        got = average[name].double()
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        tolerance = 4 * steps * torch.finfo(torch.float32).eps * scale
        torch.testing.assert_close(got, expected, rtol=0, atol=tolerance, msg=lambda m: f"{name}: {m}")


def test_fsdp_trains_dit_with_speed_and_a_sharded_ema_that_checkpoints_and_resumes(tmp_path: Path) -> None:
    first = _run(tmp_path, steps=4)
    assert first["strategy"] == "FSDPStrategy" and first["world_size"] == 2 and first["speed"]
    assert first["ema_is_shards"]  # no full copy on any rank
    # each rank averages about half of the weights (FSDP pads the flat shards to equal sizes)
    assert abs(sum(first["shard_numel"]) - first["total_numel"]) < 0.01 * first["total_numel"]
    assert max(first["shard_numel"]) < 0.6 * first["total_numel"]
    saved = torch.load(first["checkpoint"], map_location="cpu", weights_only=False)
    assert int(saved["averaging_state"]["n_averaged"]) == first["n_averaged"] == 4
    _assert_average(saved, first["reference"], steps=4)
    for name, value in first["last_weights"].items():  # the training weights, not the average
        assert torch.equal(saved["current_model_state"][name], value), name
    assert not torch.equal(saved["state_dict"]["backbone.final.linear.weight"],
                           saved["current_model_state"]["backbone.final.linear.weight"])

    resumed = _run(tmp_path, steps=7, ckpt=first["checkpoint"])
    for name, value in saved["current_model_state"].items():  # resumed from the training weights
        assert torch.equal(resumed["start_weights"][name], value), name
    final = torch.load(resumed["checkpoint"], map_location="cpu", weights_only=False)
    assert int(final["averaging_state"]["n_averaged"]) == resumed["n_averaged"] == 7
    _assert_average(final, resumed["reference"], steps=7)
