"""FIDCallback under a real 2-process DDP fit on CPU (gloo), for tests/test_fid_callback.py.

    python tests/ddp_fid_script.py OUT_DIR CACHE_DIR

Lightning's DDP launcher starts this script again for rank 1. Each rank saves the images it generated
and the FID history it recorded to ``OUT_DIR/rank<r>.pt``. The test suite runs ``main`` from
tests/ddp_script.py, in the same two processes as ddp_callbacks_script.py's fit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
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


if __name__ == "__main__":
    main(*sys.argv[1:3])
