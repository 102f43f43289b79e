"""Moving to several processes: what each rank says and does when stopped, and how the callbacks report across ranks."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightning_speed.callbacks import CheckpointOnSignal

from test_signals import TinyModule, tiny_trainer  # pytest puts tests/ on sys.path

posix = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")


def _handled(rank: int, world_size: int, signum: int) -> CheckpointOnSignal:
    guard = CheckpointOnSignal()
    guard.setup(SimpleNamespace(global_rank=rank, world_size=world_size), None, "fit")
    guard._lightning_handler = lambda signum, frame: None  # Lightning's handler, installed at fit
    guard._handle(signum, None)
    return guard


@posix
def test_ctrl_c_is_announced_once_and_a_sigterm_names_its_rank(capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl+C reaches every rank of the terminal's process group: one line (rank 0's), not one per rank. A SIGTERM
    can reach some ranks only: each says which rank got it."""
    for rank in (0, 1):
        assert _handled(rank, 2, signal.SIGINT).received == signal.SIGINT  # every rank records it
    err = capsys.readouterr().err
    assert err.count("Received SIGINT: stopping after the current step") == 1
    _handled(1, 2, signal.SIGTERM)
    assert "Received SIGTERM on rank 1: stopping after the current step" in capsys.readouterr().err
    _handled(0, 1, signal.SIGTERM)  # one process: no rank named
    assert "Received SIGTERM: stopping" in capsys.readouterr().err


@posix
def test_a_resumed_fit_with_the_same_callback_is_not_stopped_by_the_earlier_signal(tmp_path: Path) -> None:
    """A notebook (or script) resuming a run stopped by Ctrl+C, with the same callbacks: the resumed fit trains to
    max_steps; the earlier signal stopped it again after one step, with "Stopped by SIGINT" and status 130."""
    guard = CheckpointOnSignal(dirpath=str(tmp_path / "ckpt"))
    model = TinyModule(signal_at=3, signum=signal.SIGINT)
    with pytest.raises(SystemExit) as stop:
        tiny_trainer(tmp_path, guard, max_steps=6).fit(model)
    assert stop.value.code == 128 + signal.SIGINT and guard.received == signal.SIGINT
    model.signal_at = None
    trainer = tiny_trainer(tmp_path, guard, max_steps=6)
    trainer.fit(model, ckpt_path=str(tmp_path / "ckpt" / "interrupted.ckpt"))
    assert trainer.global_step == 6
    assert guard.received is None and guard.checkpoint_path is None
