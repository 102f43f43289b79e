"""A fit resumed on another number of processes than its checkpoint's: one warning, on rank 0, with the images per
optimizer step before and after (the batch size is per process) and whether the epoch in progress continues.

A 2-process checkpoint is made here from a 1-process one by editing the recorded run shape, as a real 2-process run
writes it (rank 0's loader state, the datamodule's ``world_size``)."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_speed.data.base import DeviceBatchLoader, world_size_change

from _fixtures import cpu_trainer  # pytest puts tests/ on sys.path
from test_data import BatchRecorder, ToyDataModule

TOY = "ToyDataModule"  # the checkpoint key of the datamodule's state: its class name


def _fit(folder: Path, ckpt_path: Path | None = None, max_steps: int = 4) -> list[str]:
    """A fit of ``ToyDataModule(n=60)`` on the device in batches of 8 (7 an epoch), its checkpoint at the end in
    ``folder/end.ckpt``; returns the messages of the warnings it gave."""
    trainer = cpu_trainer(max_steps=max_steps, max_epochs=-1, default_root_dir=folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(BatchRecorder(), ToyDataModule(n=60, on_device=True, batch_size=8), ckpt_path=ckpt_path)
    trainer.save_checkpoint(folder / "end.ckpt")  # what save_last writes at the end of training
    return [str(w.message) for w in caught]


def _as_two_processes(path: Path, batches: int | None = None) -> Path:
    """The checkpoint at ``path`` as a 2-process run writes it (``batches``: also its loader's progress)."""
    checkpoint = torch.load(path, weights_only=False)
    checkpoint[TOY]["world_size"] = 2
    loader = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    loader["world_size"] = checkpoint[TOY]["loader"]["world_size"] = 2
    if batches is not None:
        loader["batches"] = checkpoint[TOY]["loader"]["batches"] = batches
    edited = path.with_name("two_processes.ckpt")
    torch.save(checkpoint, edited)
    return edited


def _about_processes(messages: list[str]) -> list[str]:
    return [m for m in messages if "process" in m or "device(s)" in m]


def test_a_checkpoint_records_the_run_shape(tmp_path: Path) -> None:
    _fit(tmp_path)
    state = torch.load(tmp_path / "end.ckpt", weights_only=False)[TOY]
    assert state == {"batch_size": 8, "world_size": 1, "accumulate_grad_batches": 1,
                     "loader": {"epoch": 0, "batches": 4, "batch_size": 8, "world_size": 1}}


def test_a_fit_resumed_mid_epoch_on_one_process_says_once_what_changes(tmp_path: Path) -> None:
    """2 x 8 = 16 images a step before, 1 x 8 now; epoch 0 (Lightning keeps it open: 3 of 7 batches trained when the
    loader state says so and the loops' own progress is mid-epoch) continues at batch 3, not exactly."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=3)
    trainer = cpu_trainer(max_steps=3, max_epochs=-1, default_root_dir=tmp_path, callbacks=[checkpoint],
                          enable_checkpointing=True)
    trainer.fit(BatchRecorder(), ToyDataModule(n=60, on_device=True, batch_size=8))
    said = _about_processes(_fit(tmp_path / "resumed", _as_two_processes(tmp_path / "step=3.ckpt"), max_steps=5))
    assert len(said) == 1, said
    assert said[0].startswith("Resuming a fit trained on 2 processes on 1 process: 16 images per optimizer step "
                              "before (8 per process), 8 now (8 per process)")
    assert "set batch_size=16." in said[0]
    assert "Epoch 0 continues at batch 3" in said[0] and "resume on 2 processes with batch_size=8" in said[0]


def test_a_fit_resumed_from_the_end_of_training_on_one_process_says_the_epoch_restarts(tmp_path: Path) -> None:
    """``save_last`` at ``max_steps`` writes a checkpoint Lightning counts as an epoch's end: the loader's state of
    epoch 0 is not used (said, not silent), and epoch 1 starts at its first batch."""
    _fit(tmp_path)
    # 2 processes take 30 images each, 3 batches of 8: the run stopped 2 batches into epoch 0
    said = _about_processes(_fit(tmp_path / "resumed", _as_two_processes(tmp_path / "end.ckpt", 2), max_steps=6))
    assert len(said) == 1, said
    assert "16 images per optimizer step before (8 per process), 8 now" in said[0]
    assert "Epoch 1 starts at its first batch, shared out over 1 process." in said[0]
    assert "written 2 batches into epoch 0, which Lightning counts as ended" in said[0]


def test_a_fit_resumed_on_as_many_processes_says_nothing(tmp_path: Path) -> None:
    _fit(tmp_path)
    assert _about_processes(_fit(tmp_path / "resumed", tmp_path / "end.ckpt", max_steps=6)) == []


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_warns_and_the_loader_adds_nothing(rank: int, recwarn: pytest.WarningsRecorder) -> None:
    """A 1-process checkpoint 3 batches into epoch 0, resumed on 2: each rank's loader continues there, and of the
    two processes rank 0 alone says so, once; 8 images a step before, 16 now, 4 per process keep 8."""
    data = ToyDataModule(n=60, on_device=True, batch_size=8)
    data.trainer = SimpleNamespace(world_size=2, global_rank=rank, accumulate_grad_batches=1, current_epoch=0,
                                   state=SimpleNamespace(fn="fit"), fit_loop=SimpleNamespace(restarting=True),
                                   strategy=SimpleNamespace(root_device=torch.device("cpu")), lightning_module=None)
    progress = {"epoch": 0, "batches": 3, "batch_size": 8, "world_size": 1}
    data.load_state_dict({"batch_size": 8, "world_size": 1, "accumulate_grad_batches": 1, "loader": progress})
    loader = data.train_dataloader()
    loader.load_state_dict(progress)  # what Lightning does next
    assert isinstance(loader, DeviceBatchLoader) and len(list(loader)) == 0  # 30 images a rank: 3 batches, all done
    said = _about_processes([str(w.message) for w in recwarn])
    if rank:
        assert said == []
    else:
        assert said == [world_size_change({"batch_size": 8, "world_size": 1}, {"batch_size": 8, "world_size": 2,
                                                                               "accumulate_grad_batches": 1}, 0, 3)]
        assert "8 images per optimizer step before (8 per process), 16 now" in said[0] and "batch_size=4" in said[0]
