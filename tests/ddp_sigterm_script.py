"""LaggedSigtermCheck on two real gloo ranks, for tests/test_distributed.py: only rank 0 gets the signal (as when a
scheduler signals the main process), rank 1 learns it from rank 0's broadcast.

``main`` runs on each rank of an initialised 2-process group: tests/ddp_script.py calls it after its fits, in the
same two processes. Each rank writes ``OUT_DIR/rank<r>.txt``: the step at which the check stopped it with lag
``LAG``, then with lag 0 (Lightning's check, which decides at the step of the signal).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_speed.distributed import LaggedSigtermCheck

STEPS, SIGNAL_AT, LAG = 8, 3, 2


def main(out_dir: str) -> None:
    rank = dist.get_rank()
    stopped = {}
    for lag in (LAG, 0):
        trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), received_sigterm=False)
        check = LaggedSigtermCheck(trainer, lag=lag)  # type: ignore[arg-type]
        stopped[lag] = None
        for step in range(STEPS):
            trainer.received_sigterm = rank == 0 and step >= SIGNAL_AT
            try:
                check()
            except SIGTERMException:
                stopped[lag] = step
                break
    Path(out_dir, f"rank{rank}.txt").write_text(f"{stopped[LAG]} {stopped[0]}")
