"""Stop signals: a checkpoint, a non-zero exit status, and a resume that draws the same time steps.

The CLI test sends a real SIGTERM to a real ``lightning-speed`` process, resumes from the
checkpoint it saved and compares the time steps drawn after the resume with an uninterrupted
run's. In-process tests send real signals to this process: SIGINT during training, SIGTERM
during an FID evaluation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_speed.callbacks import CheckpointOnSignal, FIDCallback

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")


class RecordTimesteps(Callback):
    """Append ``{"step", "t"}`` of every training batch to a JSON-lines file (``delay`` s per step)."""

    def __init__(self, path: str, delay: float = 0.0) -> None:
        self.path, self.delay = path, delay

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        record = getattr(getattr(pl_module, "timesteps", None), "last", None)
        t = record.t if record is not None else outputs["t"]
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "t": t.tolist()}) + "\n")
        time.sleep(self.delay)


def read_records(path: Path) -> dict[int, list[int]]:
    if not path.exists():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["t"] for r in lines}


def cli_command(tmp_path: Path, record: Path, max_steps: int, delay: float = 0.0, *extra: str) -> list[str]:
    """The quickstart, minus FID and sample grids, logging to tmp_path and recording its time steps."""
    return [
        sys.executable, "-m", "lightning_speed", "fit", "--config", str(QUICKSTART),
        "--trainer.max_steps", str(max_steps), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0", "--fid", "null", "--samples", "null",
        "--trainer.callbacks+=test_signals.RecordTimesteps",
        "--trainer.callbacks.path", str(record), "--trainer.callbacks.delay", str(delay), *extra,
    ]  # fmt: skip


def run_env() -> dict[str, str]:
    paths = [str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def test_sigterm_saves_checkpoint_exits_143_and_resume_draws_the_same_timesteps(tmp_path: Path) -> None:
    interrupted = tmp_path / "interrupted.jsonl"
    proc = subprocess.Popen(
        cli_command(tmp_path, interrupted, max_steps=10_000, delay=0.3),
        cwd=tmp_path, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(read_records(interrupted)) < 3:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run did not reach step 3 in 300 s"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    checkpoint = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "interrupted.ckpt"
    assert checkpoint.is_file(), stderr[-3000:]
    stopped_at = torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
    assert stopped_at == max(read_records(interrupted))  # the step in flight was finished, none after it
    assert f"Stopped by SIGTERM at step {stopped_at}; saved a resumable checkpoint: {checkpoint}" in stderr
    assert f"--ckpt_path {checkpoint}" in stderr  # how to resume
    assert "Exit status 143" in stderr

    # Resume for three more steps; an uninterrupted run of the same length draws the same time steps. The two runs
    # are independent processes (one thread each, their own run folders), so they run side by side.
    total = stopped_at + 3
    resumed, straight = tmp_path / "resumed.jsonl", tmp_path / "straight.jsonl"
    runs = [(resumed, ["--ckpt_path", str(checkpoint)]), (straight, ["--trainer.logger.init_args.name", "straight"])]
    procs = [
        subprocess.Popen(cli_command(tmp_path, record, total, 0.0, *extra), cwd=tmp_path, env=run_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for record, extra in runs
    ]  # fmt: skip
    try:
        for done in procs:
            _, stderr = done.communicate(timeout=300)
            assert done.returncode == 0, stderr[-3000:]
    finally:
        for done in procs:
            if done.poll() is None:
                done.kill()
    after, reference = read_records(resumed), read_records(straight)
    assert sorted(after) == list(range(stopped_at + 1, total + 1))
    assert {s: after[s] for s in after} == {s: reference[s] for s in after}
    assert {s: t for s, t in read_records(interrupted).items()} == {s: reference[s] for s in range(1, stopped_at + 1)}


# ---------------------------------------------------------------------------------- in-process
class TinyModule(pl.LightningModule):
    """A linear model on random data; can send a signal to this process at a given step."""

    def __init__(self, signal_at: int | None = None, signum: int = signal.SIGINT) -> None:
        super().__init__()
        self.net = nn.Linear(4, 4)
        self.signal_at, self.signum = signal_at, signum

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        if self.signal_at is not None and self.global_step + 1 == self.signal_at:
            os.kill(os.getpid(), self.signum)  # delivered now, in the middle of the step
        (x,) = batch
        return {"loss": (self.net(x) - x).pow(2).mean(), "t": torch.zeros(len(x), dtype=torch.long)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> Any:
        data = torch.utils.data.TensorDataset(torch.randn(64, 4))
        return torch.utils.data.DataLoader(data, batch_size=4)


def tiny_trainer(tmp_path: Path, *callbacks: Callback, max_steps: int = 50) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), callbacks=list(callbacks), enable_checkpointing=False,
    )  # fmt: skip


def test_sigint_in_a_plain_trainer_finishes_the_step_saves_and_exits_130(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    previous = signal.getsignal(signal.SIGINT)
    guard = CheckpointOnSignal(dirpath=str(tmp_path / "ckpt"))
    trainer = tiny_trainer(tmp_path, guard)
    with pytest.raises(SystemExit) as stop:
        trainer.fit(TinyModule(signal_at=3, signum=signal.SIGINT))
    assert stop.value.code == 128 + signal.SIGINT
    assert trainer.global_step == 3  # the interrupted step completed, no further one started
    saved = torch.load(tmp_path / "ckpt" / "interrupted.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3
    err = capsys.readouterr().err
    assert "Received SIGINT" in err and "press Ctrl+C again to stop at once" in err
    assert f"Stopped by SIGINT at step 3; saved a resumable checkpoint: {tmp_path / 'ckpt' / 'interrupted.ckpt'}" in err
    assert "ckpt_path" in err  # how to resume
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored after fit


class FakeSampler(pl.LightningModule):
    """TinyModule that generates images for FID; sends SIGTERM to this process in the first sampling batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 4)
        self.image_shape = (1, 28, 28)
        self.batches = 0

    training_step = TinyModule.training_step
    configure_optimizers = TinyModule.configure_optimizers
    train_dataloader = TinyModule.train_dataloader
    signal_at = None

    def sample(self, n: int, *, solver: str, solver_steps: int, generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
        self.batches += 1
        if self.batches == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.rand((n, *self.image_shape), generator=generator) * 2 - 1


def test_sigterm_during_fid_stops_after_one_sampling_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    fid = FIDCallback(
        num_samples=40, batch_size=4, solver_steps=2, feature_extractor="fashion_mnist", reference_images=reference,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    model = FakeSampler()
    trainer = tiny_trainer(tmp_path, CheckpointOnSignal(dirpath=str(tmp_path / "ckpt")), fid, max_steps=2)
    with pytest.raises(SystemExit) as stop:
        trainer.fit(model)
    assert stop.value.code == 128 + signal.SIGTERM
    assert model.batches == 1  # not the 10 batches of the whole evaluation
    assert fid.history == []  # no FID from a partial evaluation
    assert torch.load(tmp_path / "ckpt" / "interrupted.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2
    assert "Stopped by SIGTERM at step 2" in capsys.readouterr().err


@pytest.mark.parametrize("dirpath", [None, "given"])
def test_every_rank_reads_the_log_dir_as_often_as_rank_0(tmp_path: Path, dirpath: str | None) -> None:
    """Under DDP ``trainer.log_dir`` is a broadcast: a rank that skipped a read rank 0 makes would leave rank 0
    waiting at the end of a stopped run."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    reads = {}
    for rank in (0, 1):
        class Trainer(SimpleNamespace):
            @property
            def log_dir(self) -> str:
                reads[self.global_rank] = reads.get(self.global_rank, 0) + 1
                return str(tmp_path)

        trainer = Trainer(global_rank=rank, is_global_zero=rank == 0, default_root_dir=str(tmp_path), global_step=3,
                          callbacks=[], checkpoint_callback=None, state=SimpleNamespace(stage=RunningStage.TRAINING),
                          save_checkpoint=lambda path: None)
        guard = CheckpointOnSignal(dirpath=str(tmp_path / dirpath) if dirpath else None)
        guard.on_exception(trainer, None, SIGTERMException())
        assert guard.checkpoint_path is not None
    assert reads[0] == reads[1] >= 1


class ValidatedSampler(FakeSampler):
    """FakeSampler with a validation epoch; remembers the training weights and the weights it samples with."""

    def train_dataloader(self) -> Any:  # two steps an epoch, then a validation epoch
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)

    val_dataloader = train_dataloader

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)  # large steps: the average and the weights differ

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.trained = self.net.weight.detach().clone()

    def sample(self, n: int, **kwargs: Any) -> torch.Tensor:
        if self.batches == 0:
            self.sampled_with = self.net.weight.detach().clone()
        return super().sample(n, **kwargs)


@pytest.mark.parametrize("ema_first", [True, False], ids=["ema-before-fid", "ema-after-fid"])
@pytest.mark.parametrize("lightning_ema", [False, True], ids=["ours", "lightning"])
def test_sigterm_during_validation_fid_saves_the_training_weights_as_such(
    tmp_path: Path, ema_first: bool, lightning_ema: bool
) -> None:
    """A stop in the FID of a validation epoch: the checkpoint holds the average in ``state_dict`` and the training
    weights in ``current_model_state``, whether the EMA callback swapped its average out before the FID ran or not."""
    from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMA

    from lightning_speed.callbacks import EMAWeightAveraging

    ema = (LightningEMA if lightning_ema else EMAWeightAveraging)(decay=0.5)
    fid = FIDCallback(
        on_validation=True, on_train_end=False, num_samples=8, batch_size=4, solver_steps=2,
        feature_extractor="fashion_mnist", reference_images=torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8),
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    model = ValidatedSampler()
    evaluation = [ema, fid] if ema_first else [fid, ema]
    trainer = tiny_trainer(tmp_path, CheckpointOnSignal(dirpath=str(tmp_path / "ckpt")), *evaluation, max_steps=10)
    with pytest.raises(SystemExit):
        trainer.fit(model)
    saved = torch.load(tmp_path / "ckpt" / "interrupted.ckpt", map_location="cpu", weights_only=False)
    assert not torch.equal(model.trained, model.sampled_with)  # the FID sampled with the average
    torch.testing.assert_close(saved["current_model_state"]["net.weight"], model.trained, rtol=0, atol=0)
    torch.testing.assert_close(saved["state_dict"]["net.weight"], model.sampled_with, rtol=0, atol=0)
