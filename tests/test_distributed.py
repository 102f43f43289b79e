"""SyncFreeDDPStrategy: the SIGTERM agreement without a per-step wait, across two real gloo processes; its options."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DISTRIBUTED_ENV
from ddp_sigterm_script import LAG, SIGNAL_AT  # pytest puts tests/ on sys.path
from lightning_speed.distributed import SyncFreeDDPStrategy

REPO = Path(__file__).resolve().parents[1]


def test_every_rank_stops_at_the_same_step_lag_steps_after_rank_0s_sigterm(ddp_run: Path) -> None:
    """ddp_sigterm_script.py on the two gloo ranks of the ddp_run fixture (conftest.py)."""
    stopped = [(ddp_run / "sigterm" / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert stopped == [f"{SIGNAL_AT + LAG} {SIGNAL_AT}"] * 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
@pytest.mark.parametrize(("lag", "signal_at", "stop"), [
    (2, "3,-", 5),  # rank 0 only, in the middle of step 3: stop lag steps later
    (2, "-,3", 5),  # rank 1 only
    (2, "5,3", 5),  # both, rank 0 two steps later
    (0, "3,5", 3),  # both, rank 1 two steps later; lag 0 stops at the step of the first signal
])  # fmt: skip
def test_a_real_sigterm_to_some_ranks_stops_every_rank_at_one_step_with_a_checkpoint_and_status_143(
    tmp_path: Path, lag: int, signal_at: str, stop: int
) -> None:
    """ddp_signal_script.py on two gloo ranks started as torchrun does, each sending itself SIGTERM in the middle of a
    step. Lightning's handler, in place, runs a broadcast inside the handler that pairs with the other rank's gradient
    all-reduce: both ranks hang, which this test reports after its timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0"}
    logs = [tmp_path / f"log{r}.txt" for r in (0, 1)]
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "ddp_signal_script.py"), str(tmp_path), str(lag),
                               signal_at], env={**env, "LOCAL_RANK": str(r), "RANK": str(r)}, cwd=tmp_path,
                              stdout=logs[r].open("w"), stderr=subprocess.STDOUT)
             for r in (0, 1)]  # fmt: skip
    try:
        for proc in procs:
            proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks hang after SIGTERM:\n" + "\n".join(log.read_text()[-1500:] for log in logs))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [128 + signal.SIGTERM] * 2, logs[0].read_text()[-3000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [str(stop)] * 2
    checkpoint = torch.load(tmp_path / "interrupted.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == stop


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
def test_ctrl_c_under_lightnings_launcher_stops_every_rank_at_one_step_with_a_checkpoint_and_status_130(
    tmp_path: Path,
) -> None:
    """docs/multi_gpu.md's one-node command, stopped with Ctrl+C: the terminal sends SIGINT to every process of its
    foreground group, the rank Lightning's launcher started included. Forwarded by rank 0 as well, that rank would get
    it twice and take the second for a second Ctrl+C: it stops at once, without a checkpoint, and rank 0 fails at its
    next collective."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}  # Lightning's launcher sets the ranks
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    log = tmp_path / "log.txt"
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "ddp_signal_script.py"), str(tmp_path), "2", "3,-",
                             "ctrl-c"], env=env, cwd=tmp_path, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # a process group of its own, as a terminal's foreground job
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("the ranks hang after Ctrl+C:\n" + log.read_text()[-3000:])
    assert proc.returncode == 128 + signal.SIGINT, log.read_text()[-3000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["5"] * 2  # step 3 + lag 2, on both ranks
    checkpoint = torch.load(tmp_path / "interrupted.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 5


def test_options_are_checked_and_ddp_kwargs_pass_through() -> None:
    strategy = SyncFreeDDPStrategy(static_graph=True, gradient_as_bucket_view=True)
    assert (strategy.sigterm_check_lag, strategy.init_stream) == (2, "side")
    assert strategy._ddp_kwargs == {"static_graph": True, "gradient_as_bucket_view": True}
    for bad, error in ((-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="sigterm_check_lag must be an integer.*0 is Lightning's per-step check"):
            SyncFreeDDPStrategy(sigterm_check_lag=bad)
    with pytest.raises(ValueError, match="init_stream 'default'; choose one of 'current', 'side'"):
        SyncFreeDDPStrategy(init_stream="default")
