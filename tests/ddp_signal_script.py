"""One rank of a 2-process DDP fit on CPU (gloo) with SyncFreeDDPStrategy and CheckpointOnSignal, which sends itself a
real SIGTERM in the middle of a given training step, for tests/test_distributed.py.

    python tests/ddp_signal_script.py OUT_DIR LAG SIGNAL_AT [ctrl-c]

The test starts both ranks itself, as torchrun or SLURM do (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT`` set), so
that a signal reaches only the ranks it is sent to. ``SIGNAL_AT`` is ``"3,-"`` for "rank 0 at step 3, rank 1 never".
With ``ctrl-c`` the test starts rank 0 alone, Lightning's launcher starts rank 1 in the same process group, and the
signal is SIGINT to the whole group, as a terminal's Ctrl+C sends it. Each rank writes ``OUT_DIR/rank<r>.txt``: the
global step at which it stopped.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn

from lightning_speed.callbacks import CheckpointOnSignal
from lightning_speed.distributed import SyncFreeDDPStrategy

STEPS = 40


class Tiny(pl.LightningModule):
    def __init__(self, signal_at: int | None, ctrl_c: bool = False) -> None:
        super().__init__()
        self.net = nn.Linear(4, 4)
        self.signal_at, self.ctrl_c = signal_at, ctrl_c

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        pause = 0.2 if self.ctrl_c else 0.02  # Ctrl+C comes while the other ranks pause, not inside a collective
        if self.global_step + 1 == self.signal_at:  # handled now, before this step's gradient all-reduce
            if self.ctrl_c:
                time.sleep(0.05)
                ctrl_c()
            else:
                os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(pause)
        (x,) = batch
        return (self.net(x) - x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4 * STEPS, 4)), batch_size=2)


def ctrl_c() -> None:
    """SIGINT to every process of this process group, as a terminal's Ctrl+C: the other ranks first, this one 50 ms
    later (as when its main thread is busy elsewhere), so each rank handles every SIGINT it gets apart from the next
    (two that arrive together are handled once)."""
    group, me = os.getpgrp(), os.getpid()
    for pid in (int(name) for name in os.listdir("/proc") if name.isdigit()):
        try:
            if pid != me and os.getpgid(pid) == group:
                os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    time.sleep(0.05)
    os.kill(me, signal.SIGINT)


def main(out_dir: str, lag: int, signal_at: str, how: str = "sigterm") -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set by the test, or by Lightning in the rank it starts
    at = signal_at.split(",")[rank]
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=SyncFreeDDPStrategy(sigterm_check_lag=lag), max_steps=STEPS,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[CheckpointOnSignal(dirpath=out_dir)], default_root_dir=out_dir,
    )
    try:
        trainer.fit(Tiny(None if at == "-" else int(at), ctrl_c=how == "ctrl-c"))
    finally:
        Path(out_dir, f"rank{rank}.txt").write_text(str(trainer.global_step))
        # a gloo group left to interpreter shutdown can abort the process there (see ddp_script.py)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:5])
