"""DivergenceGuard: a non-finite loss, gradient or weight stops the run and never reaches a checkpoint.

In-process runs use a tiny linear module that can be made to diverge at a chosen step; the
CLI test trains the quickstart with a learning rate of 1e9 through the ``lightning-speed`` entry point.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_speed.callbacks import DivergenceError, DivergenceGuard
from lightning_speed.cli import console

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


class Regression(pl.LightningModule):
    """Linear regression on random data; from step ``nan_at`` on, its loss (or only its gradient) is NaN."""

    def __init__(self, nan_at: int | None = None, where: str = "loss") -> None:
        super().__init__()
        self.net = nn.Linear(4, 4)
        self.nan_at, self.where = nan_at, where

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (x,) = batch
        loss = (self.net(x) - x).pow(2).mean()
        step = self.global_step + 1  # the step this batch makes
        if self.nan_at is not None and step >= self.nan_at:
            if self.where == "loss":
                loss = loss * float("nan")
            else:  # finite loss, infinite gradient
                self.net.weight.register_hook(lambda g: g * float("inf"))
        t = torch.arange(len(x)) * 100 + step  # recognisable "time steps" of this batch
        return {"loss": loss, "t": t}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=4)


def trainer(tmp_path: Path, *callbacks: Callback, max_steps: int = 6) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), callbacks=[DivergenceGuard(), *callbacks],
    )  # fmt: skip


def every_step(tmp_path: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, save_top_k=-1, save_last=True)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_nan_loss_stops_with_step_timesteps_and_last_good_checkpoint(tmp_path: Path) -> None:
    run = trainer(tmp_path, every_step(tmp_path))
    with pytest.raises(DivergenceError) as err:
        run.fit(Regression(nan_at=3))
    message = str(err.value)
    assert "the loss became nan at step 3" in message
    assert "Time steps of that batch (4): [3, 103, 203, 303]" in message
    last = tmp_path / "ckpt" / "last.ckpt"
    assert f"The last good checkpoint is {last} (step 2)" in message
    assert "lower the learning rate (now 0.01; --model.optimizer.init_args.lr, or the lr your configure_optimizers" in message
    assert "--trainer.gradient_clip_val 1.0, Trainer(gradient_clip_val=1.0)" in message
    assert f"resume with --ckpt_path {last}" in message
    assert run.global_step == 3  # stopped right after the bad step
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_a_diverging_run_leaves_earlier_checkpoints_byte_identical(tmp_path: Path) -> None:
    """A second run writing into the same folder diverges at its first step: nothing is replaced."""
    trainer(tmp_path, every_step(tmp_path), max_steps=2).fit(Regression())
    before = digests(tmp_path / "ckpt")
    assert "last.ckpt" in before
    # The guard reads its flag at checkpoints too: with reads every 1000 steps, the save still refuses.
    late = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[DivergenceGuard(check_every_n_steps=1000), every_step(tmp_path)],
    )  # fmt: skip
    with pytest.raises(DivergenceError, match=r"(?s)the loss became nan at step 1\b.*no checkpoint before diverging") as err:
        late.fit(Regression(nan_at=1))
    assert "earlier checkpoints on disk are unchanged" in str(err.value)
    assert digests(tmp_path / "ckpt") == before


def test_infinite_gradient_with_finite_loss_is_caught(tmp_path: Path) -> None:
    with pytest.raises(DivergenceError, match=r"the gradients became non-finite at step 2 \(loss \d"):
        trainer(tmp_path).fit(Regression(nan_at=2, where="gradient"))


def test_nonfinite_weights_are_never_saved(tmp_path: Path) -> None:
    """Weights broken outside the loss and gradients (here by hand): the checkpoint check catches them."""

    class Corrupt(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.net.bias[0] = float("inf")

    with pytest.raises(DivergenceError, match=r"weights contain non-finite values at step 2 \(net.bias\)"):
        trainer(tmp_path, Corrupt(), every_step(tmp_path)).fit(Regression())
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 1


def test_recording_makes_no_host_read(tmp_path: Path) -> None:
    """Between reads the record stays on the device: on the meta device any host read would raise."""
    guard = DivergenceGuard(check_every_n_steps=1000)
    guard._reset(torch.device("meta"))
    fake_trainer = SimpleNamespace(global_step=0, world_size=1, log_every_n_steps=50)
    module = SimpleNamespace()  # no `timesteps`: the guard takes t from the outputs
    for step in range(1, 20):
        fake_trainer.global_step = step
        loss = torch.empty((), device="meta")
        guard._grad_ok = torch.empty((), dtype=torch.bool, device="meta")
        guard.on_train_batch_end(fake_trainer, module, {"loss": loss, "t": torch.empty(8, dtype=torch.long, device="meta")}, None, step)
    assert guard._state["t"].shape == (8,) and guard._state["bad"].device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError)):  # a read at step 1000 would reach the host
        fake_trainer.global_step = 1000
        guard.on_train_batch_end(fake_trainer, module, {"loss": loss}, None, 1000)


def test_invalid_period_is_refused() -> None:
    with pytest.raises(ValueError, match="check_every_n_steps must be a positive int or None, got 0"):
        DivergenceGuard(check_every_n_steps=0)


# ------------------------------------------------------------------------------- through the CLI
class SnapshotCheckpoints(Callback):
    """Copy ``src`` to ``dst`` when step ``at`` starts: the checkpoints as they were before that step."""

    def __init__(self, src: str, dst: str, at: int = 2) -> None:
        self.src, self.dst, self.at = src, dst, at

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step + 1 == self.at:
            shutil.copytree(self.src, self.dst)


def test_lr_1e9_through_the_cli_exits_1_naming_step_timesteps_and_checkpoint(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The ``lightning-speed`` entry point in this process (no second torch start-up); capfd reads file descriptor 2,
    all that a terminal would show."""
    tmp_path = cli_env
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    ckpt_dir, snapshot = run_dir / "checkpoints", tmp_path / "before_step_2"
    monkeypatch.setattr(sys, "argv", [
        "lightning-speed", "fit", "--config", str(QUICKSTART),
        "--model.optimizer.init_args.lr", "1e9", "--trainer.max_steps", "6",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
        "--fid", "null", "--samples", "null", "--checkpoint.init_args.every_n_train_steps", "1",
        "--trainer.callbacks+=test_guard.SnapshotCheckpoints",
        "--trainer.callbacks.src", str(ckpt_dir), "--trainer.callbacks.dst", str(snapshot),
    ])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        console()
    stderr = capfd.readouterr().err
    assert exit_info.value.code == 1, stderr[-3000:]
    error = stderr[stderr.index("error: Training diverged"):]
    assert "non-finite at step 2" in error or "the loss became nan at step 2" in error
    assert "Time steps of that batch (32): [" in error
    assert str(ckpt_dir) in error and "(step 1)" in error  # the last good checkpoint
    assert "lower the learning rate (now 1e+09;" in error
    assert "Traceback" not in error  # the message alone
    # The step-1 checkpoints are exactly as they were before step 2; nothing of step 2 was written.
    assert digests(ckpt_dir) == digests(snapshot)
    assert sorted(digests(ckpt_dir)) == ["epoch=0-step=1.ckpt", "last.ckpt"]


# ------------------------------------------------------------------------------- NaN in the input data
class NaNData(Regression):
    """A healthy regression whose data loader yields a batch holding NaN (its batch ``bad_batch``)."""

    def __init__(self, bad_batch: int = 2) -> None:
        super().__init__()
        self.bad_batch = bad_batch

    def train_dataloader(self) -> Any:
        x = torch.randn(64, 4)
        x[self.bad_batch * 4 + 1, 2] = float("nan")
        x[self.bad_batch * 4 + 3, 0] = float("inf")
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)


@pytest.mark.parametrize("period", [None, 1000], ids=["read-every-step", "read-at-train-end"])
def test_nan_in_the_input_data_is_named_as_a_data_problem_not_a_divergence(tmp_path: Path, period: int | None) -> None:
    """The loss is NaN because a batch holds NaN/inf: the message names that batch and says the fix is in the data."""
    guard = DivergenceGuard(check_every_n_steps=period)
    run = pl.Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=str(tmp_path), callbacks=[guard],
    )  # fmt: skip
    with pytest.raises(DivergenceError) as err:
        run.fit(NaNData(bad_batch=2))
    message = str(err.value)
    assert "the training data holds non-finite values: 2 NaN/inf values in the input batch of step 3 " in message
    assert "(epoch 0, batch_idx 2)" in message and "the loss became nan at step 3" in message
    assert "repair or drop the non-finite samples in the training data" in message
    assert "will not help" in message
    assert "lower the learning rate" not in message and "gradient_clip_val" not in message


def test_a_divergence_with_finite_data_still_advises_the_optimizer(tmp_path: Path) -> None:
    """Finite data: the input check stays silent and the optimizer advice is unchanged."""
    with pytest.raises(DivergenceError) as err:
        trainer(tmp_path).fit(Regression(nan_at=2))
    message = str(err.value)
    assert message.startswith("Training diverged: the loss became nan at step 2")
    assert "training data" not in message and "lower the learning rate" in message


def test_input_check_makes_no_host_read(tmp_path: Path) -> None:
    """Counting the batch's non-finite values stays on the device: on the meta device a host read would raise."""
    guard = DivergenceGuard(check_every_n_steps=1000)
    guard._reset(torch.device("meta"))
    fake_trainer = SimpleNamespace(global_step=0, world_size=1, log_every_n_steps=50, current_epoch=0)
    batch = [torch.empty(8, 4, device="meta"), {"labels": torch.empty(8, dtype=torch.long, device="meta")}]
    for step in range(1, 5):
        fake_trainer.global_step = step
        guard._grad_ok = torch.empty((), dtype=torch.bool, device="meta")
        guard.on_train_batch_end(fake_trainer, SimpleNamespace(), {"loss": torch.empty((), device="meta")}, batch, step)
    assert guard._state["data_nonfinite"].device.type == "meta"


def test_nonfinite_weights_on_another_process_stop_this_one_too(tmp_path: Path) -> None:
    """Under FSDP only rank 0 holds the gathered weights: the ranks decide together, so that none waits alone at the
    checkpoint's barrier. Here the other process's verdict is simulated by the strategy's reduction."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class OtherRankDiverged(SingleDeviceStrategy):
        def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
            return False

    fit = pl.Trainer(max_steps=2, accelerator="cpu", strategy=OtherRankDiverged(device=torch.device("cpu")),
                     logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                     callbacks=[DivergenceGuard(), every_step(tmp_path)])
    with pytest.raises(DivergenceError, match=r"non-finite values at step 1 \(on another process\); the checkpoint was "
                                              "not written"):
        fit.fit(Regression())
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())
