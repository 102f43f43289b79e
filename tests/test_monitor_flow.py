"""TimestepMonitor on a flow: continuous t counted in bins, split into the flow's areas (``flow.flow_areas``).

A plain flow-matching module on 2-D points trains with uniform t (shift 1): each t lands in the convergence area
[tau, 1) with probability p = 1 - tau, so the logged share over n draws is binomial, with standard deviation
sqrt(p (1 - p) / n); the test allows 5 of them (a false failure about once in 1.7 million runs).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_speed import flow
from lightning_speed.callbacks import SpeeD, TimestepCallback, TimestepMonitor
from lightning_speed.timesteps import TimestepStrategy, UniformSampling

from _fixtures import cpu_trainer

BATCH, STEPS = 256, 20


class FlowPoints(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2))
        self.timesteps = TimestepStrategy(flow.FlowSchedule())

    def training_step(self, batch, batch_idx):
        x0 = batch[0]
        t = self.timesteps.sample(len(x0), x0.device)
        noise = torch.randn_like(x0)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
        v = self.net(torch.cat([x_t, t[:, None]], dim=1))
        return self.timesteps.loss(t, (v - (noise - x0)).pow(2).mean(1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def fit(*callbacks: pl.Callback) -> FlowPoints:
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(BATCH * STEPS, 2)), batch_size=BATCH)
    model = FlowPoints()
    cpu_trainer(max_steps=STEPS, callbacks=list(callbacks)).fit(model, loader)
    return model


def test_the_monitor_logs_the_flow_areas_shares_of_uniform_draws() -> None:
    monitor = TimestepMonitor(log_every_n_steps=STEPS)
    fit(TimestepCallback(UniformSampling()), monitor)
    (row,) = monitor.history
    tau = flow.auto_tau()
    p = 1.0 - tau
    n = BATCH * STEPS
    assert abs(row["timesteps/share/convergence"] - p) <= 5 * math.sqrt(p * (1 - p) / n)
    assert sum(row[f"timesteps/share/{a}"] for a in ("acceleration", "deceleration", "convergence")) == pytest.approx(1)
    # the sampler's mass on the area, from its probabilities over the bins
    assert row["timesteps/p/convergence"] == pytest.approx(p, abs=1e-3)


def test_the_monitor_splits_at_speeds_flow_tau_and_sees_its_suppression() -> None:
    monitor = TimestepMonitor(log_every_n_steps=STEPS)
    fit(SpeeD(tau=0.8, k=5.0, dual=False, lam=0.6), monitor)
    assert monitor.areas.tau == pytest.approx(0.8)
    (row,) = monitor.history
    # asymmetric sampling: P(t >= tau) = (1 - tau) / (k tau + 1 - tau)
    p = 0.2 / (5 * 0.8 + 0.2)
    n = BATCH * STEPS
    assert abs(row["timesteps/share/convergence"] - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_a_step_tau_on_a_flow_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="flow time in"):
        fit(TimestepCallback(UniformSampling()), TimestepMonitor(tau=700))
