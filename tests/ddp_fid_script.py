"""FIDCallback under a real 2-process DDP fit on CPU (gloo), for tests/test_fid_callback.py.

    python tests/ddp_fid_script.py OUT_DIR CACHE_DIR

Lightning's DDP launcher starts this script again for rank 1. Each rank saves the images it generated
and the FID history it recorded to ``OUT_DIR/rank<r>.pt``. Then, in the same two processes, one fit per case
of ``STOPS``: one rank's stop flag is set during the evaluation, and each rank saves how it ended to
``OUT_DIR/stop/<case>/rank<r>.pt``. The test suite runs ``main`` from tests/ddp_script.py, in the same two
processes as ddp_callbacks_script.py's fit.
"""

from __future__ import annotations

import faulthandler
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from lightning_speed.callbacks.fid import FIDCallback
from lightning_speed.data.embedded import EmbeddedFashionMNISTDataModule


class RecordingGenerator(pl.LightningModule):
    """Stands in for DiffusionModule: seeded noise through one learnable scale; keeps what it generated."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.generated: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        return (self.scale - 3.0) ** 2 + 0.0 * batch[0].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)

    @torch.no_grad()
    def sample(self, num_samples, *, solver_steps=50, solver="ddim", generator=None, **kwargs):
        noise = torch.randn((num_samples, 1, 32, 32), generator=generator, device=self.device)
        images = torch.tanh(noise * self.scale)
        self.generated.append(images.cpu())
        return images


class SignalledGenerator(RecordingGenerator):
    """Sets the stop flag of rank ``rank`` alone after its ``at``-th sampling batch, as Lightning's SIGTERM handler
    sets the flag of the process that got the signal (a real signal would also run the handler's own collective)."""

    def __init__(self, rank: int | None, at: int | None) -> None:
        super().__init__()
        self.rank, self.at = rank, at

    def sample(self, num_samples, **kwargs):
        images = super().sample(num_samples, **kwargs)
        if self.trainer.global_rank == self.rank and len(self.generated) == self.at:
            self.trainer._signal_connector.received_sigterm = True
        return images


# case: (num_samples, batch_size, the rank whose flag is set, after which of its sampling batches). 8 in batches
# of 2: two batches on each rank. 9 in batches of 4: rank 0 generates 5 (two batches), rank 1 4 (one batch), so
# rank 0's flag after its second batch comes when rank 1 has none left.
STOPS = {"even": (8, 2, 1, 1), "uneven": (9, 4, 0, 2), "uneven_no_signal": (9, 4, None, None)}
STOP_TIMEOUT = 60  # seconds a case may take before its ranks are ended with a traceback: a hang, not slowness


def fid_callback(cache_dir: str) -> FIDCallback:
    return FIDCallback(num_samples=32, batch_size=16, solver_steps=3, feature_extractor="fashion_mnist",
                       num_reference=200, cache_dir=cache_dir, every_n_steps=2, on_train_end=False)


def main(out_dir: str, cache_dir: str) -> None:
    torch.set_num_threads(1)
    model, fid = RecordingGenerator(), fid_callback(cache_dir)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=2, callbacks=[fid], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(model, datamodule=EmbeddedFashionMNISTDataModule(batch_size=8, val_images=16))
    torch.save({"rank": trainer.global_rank, "world_size": trainer.world_size, "history": fid.history,
                "images": torch.cat(model.generated)}, Path(out_dir) / f"rank{trainer.global_rank}.pt")
    for case, (num_samples, batch_size, rank, at) in STOPS.items():
        stop_during_evaluation(Path(out_dir) / "stop" / case, cache_dir, num_samples, batch_size, rank, at)


def stop_during_evaluation(
    out: Path, cache_dir: str, num_samples: int, batch_size: int, rank: int | None, at: int | None
) -> None:
    """One step, then an evaluation in which rank ``rank``'s stop flag is set after its ``at``-th batch."""
    model = SignalledGenerator(rank, at)
    fid = FIDCallback(num_samples=num_samples, batch_size=batch_size, solver_steps=3, feature_extractor="fashion_mnist",
                      num_reference=200, cache_dir=cache_dir, every_n_steps=1, on_train_end=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=1, callbacks=[fid], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    stopped, start = False, time.perf_counter()
    faulthandler.dump_traceback_later(STOP_TIMEOUT, exit=True)
    try:
        trainer.fit(model, datamodule=EmbeddedFashionMNISTDataModule(batch_size=8, val_images=16))
    except SIGTERMException:  # Lightning's stop, which CheckpointOnSignal turns into a checkpoint and an exit status
        stopped = True
    finally:
        faulthandler.cancel_dump_traceback_later()
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"stopped": stopped, "seconds": time.perf_counter() - start, "batches": len(model.generated),
                "history": fid.history}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:3])
