"""SyncFreeDDPStrategy: the SIGTERM agreement without a per-step wait, across two real gloo processes; its options."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_speed.distributed import LaggedSigtermCheck, SyncFreeDDPStrategy

STEPS, SIGNAL_AT, LAG = 8, 3, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out: str) -> None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    stopped = {}
    for lag in (LAG, 0):  # 0: Lightning's check, which decides at the step of the signal
        trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), received_sigterm=False)
        check = LaggedSigtermCheck(trainer, lag=lag)  # type: ignore[arg-type]
        stopped[lag] = None
        for step in range(STEPS):
            # only rank 0 gets the signal (as when a scheduler signals the main process); rank 1 learns it from rank 0
            trainer.received_sigterm = rank == 0 and step >= SIGNAL_AT
            try:
                check()
            except SIGTERMException:
                stopped[lag] = step
                break
    dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(f"{stopped[LAG]} {stopped[0]}")


def test_every_rank_stops_at_the_same_step_lag_steps_after_rank_0s_sigterm(tmp_path: Path) -> None:
    mp.start_processes(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    stopped = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert stopped == [f"{SIGNAL_AT + LAG} {SIGNAL_AT}"] * 2


def test_options_are_checked_and_ddp_kwargs_pass_through() -> None:
    strategy = SyncFreeDDPStrategy(static_graph=True, gradient_as_bucket_view=True)
    assert (strategy.sigterm_check_lag, strategy.init_stream) == (2, "side")
    assert strategy._ddp_kwargs == {"static_graph": True, "gradient_as_bucket_view": True}
    for bad, error in ((-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="sigterm_check_lag must be an integer.*0 is Lightning's per-step check"):
            SyncFreeDDPStrategy(sigterm_check_lag=bad)
    with pytest.raises(ValueError, match="init_stream 'default'; choose one of 'current', 'side'"):
        SyncFreeDDPStrategy(init_stream="default")
