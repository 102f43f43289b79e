"""SyncFreeDDPStrategy: the SIGTERM agreement without a per-step wait, across two real gloo processes; its options."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddp_sigterm_script import LAG, SIGNAL_AT  # pytest puts tests/ on sys.path
from lightning_speed.distributed import SyncFreeDDPStrategy


def test_every_rank_stops_at_the_same_step_lag_steps_after_rank_0s_sigterm(ddp_run: Path) -> None:
    """ddp_sigterm_script.py on the two gloo ranks of the ddp_run fixture (conftest.py)."""
    stopped = [(ddp_run / "sigterm" / f"rank{r}.txt").read_text() for r in (0, 1)]
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
