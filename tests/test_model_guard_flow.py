"""DivergenceGuard names a flow's times as they are: floats in [0, 1], not their integer parts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_speed.callbacks import DivergenceError

from test_guard import Regression, trainer  # pytest puts tests/ on sys.path


class FlowRegression(Regression):
    """Regression whose batches carry a flow's times in [0, 1] instead of integer steps."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        out["t"] = torch.tensor([0.125, 0.25, 0.5, 0.875])
        return out


def test_a_flows_times_are_shown_as_times(tmp_path: Path) -> None:
    with pytest.raises(DivergenceError) as err:
        trainer(tmp_path).fit(FlowRegression(nan_at=3))
    message = str(err.value)
    assert "Flow times of that batch (4): [0.1250, 0.2500, 0.5000, 0.8750], min 0.1250, max 0.8750." in message


def test_integer_time_steps_are_shown_as_before(tmp_path: Path) -> None:
    with pytest.raises(DivergenceError) as err:
        trainer(tmp_path).fit(Regression(nan_at=3))
    assert "Time steps of that batch (4): [3, 103, 203, 303], min 3, max 303." in str(err.value)
