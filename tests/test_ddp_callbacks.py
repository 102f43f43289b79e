"""The callbacks under a real 2-process DDP fit on CPU (gloo): what must agree across ranks does."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch


def test_callbacks_keep_ranks_in_step_under_ddp(ddp_run: Path) -> None:
    """ddp_callbacks_script.py's fit, run by the ddp_run fixture (conftest.py)."""
    from ddp_callbacks_script import BATCH, HISTORY, STEPS, T  # pytest puts tests/ on sys.path

    out = ddp_run / "callbacks"
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert (r0["world_size"], r1["world_size"]) == (2, 2)
    # each rank draws its own t (own generator) and its own noise (its global seed moved by its rank) ...
    assert r0["drawn"].shape == (STEPS * BATCH,) and not torch.equal(r0["drawn"], r1["drawn"])
    assert len(r0["noise"]) == len(r1["noise"]) == STEPS
    assert not any(torch.equal(a, b) for a, b in zip(r0["noise"], r1["noise"]))
    # ... from one distribution: the loss-aware history holds the losses of both ranks, the same on each
    assert int(r0["counts"].sum()) == 2 * STEPS * BATCH
    assert torch.equal(r0["counts"], torch.bincount(torch.cat([r0["drawn"], r1["drawn"]]), minlength=T))
    assert torch.equal(r0["history"], r1["history"]) and torch.equal(r0["probs"], r1["probs"])
    assert bool((r0["counts"] >= HISTORY).all()) == bool((r0["probs"] != 1.0 / T).any())  # learned p once warm
    # the EMA weights are identical on both ranks
    assert all(torch.equal(a, b) for a, b in zip(r0["ema"], r1["ema"], strict=True))
    # FID of both ranks' samples, one value, the same on both ranks
    assert r0["fid"] == r1["fid"] and [s for s, _ in r0["fid"]] == [STEPS] and math.isfinite(r0["fid"][0][1])
    # logged once: one metrics file (rank 0's), one row per logged step for the FID
    files = list((out / "logs").rglob("metrics.csv"))
    assert len(files) == 1
    rows = list(csv.DictReader(files[0].open()))
    assert [row["step"] for row in rows if row.get("fid")] == [str(STEPS)]
    assert any(row.get("train/loss") for row in rows)
