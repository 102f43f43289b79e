"""A 2-process DDP fit on CPU (gloo) of DiffusionModule with loss-aware sampling, SpeeD's change-aware
weights, our EMA, the time-step monitor and FID, for tests/test_ddp_callbacks.py.

    python tests/ddp_callbacks_script.py OUT_DIR

Lightning's DDP launcher starts this script again for rank 1. Each rank saves what the test compares
across ranks to ``OUT_DIR/rank<r>.pt``; rank 0's CSV logger writes ``OUT_DIR/logs``. The test suite runs
``main`` from tests/ddp_script.py, in the same two processes as ddp_fid_script.py's fit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from benchmarks.common import SMOKE_BACKBONES
from lightning_speed import DiffusionModule
from lightning_speed.backbones import UNet
from lightning_speed.callbacks import EMAWeightAveraging, FIDCallback, TimestepCallback, TimestepMonitor
from lightning_speed.data.embedded import EmbeddedFashionMNISTDataModule
from lightning_speed.distributed import SyncFreeDDPStrategy
from lightning_speed.timesteps import LossAwareSampling, SpeeD

STEPS, BATCH, T, HISTORY = 4, 8, 16, 2


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    out = Path(out_dir)
    backbone = UNet(in_channels=1, image_size=32, num_timesteps=T, **SMOKE_BACKBONES["UNet"])
    model = DiffusionModule(backbone, schedule="cosine", num_timesteps=T, solver_steps=2)  # linear needs T >= 50
    sampler, ema = LossAwareSampling(history=HISTORY), EMAWeightAveraging(decay=0.5)
    change_aware = SpeeD(tau="auto", k=1.0, dual=False)  # SpeeD's weights alone
    fid = FIDCallback(num_samples=8, batch_size=4, solver_steps=2, feature_extractor="fashion_mnist", num_reference=64,
                      cache_dir=str(out / "cache"), every_n_steps=STEPS, on_train_end=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=SyncFreeDDPStrategy(),  # what configs/multi_gpu/ddp.yaml ships
        max_steps=STEPS, logger=CSVLogger(out, name="logs"),
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[TimestepCallback([sampler, change_aware]), ema,
                                        TimestepMonitor(log_every_n_steps=2), fid],
    )
    drawn: list[torch.Tensor] = []
    draw = model.timesteps.sample
    model.timesteps.sample = lambda n, device=None: drawn.append(draw(n, device)) or drawn[-1]  # type: ignore[method-assign]
    noise: list[torch.Tensor] = []  # the training steps' noise (torch.randn_like of each batch)
    randn_like = torch.randn_like
    torch.randn_like = lambda x, *a, **k: noise.append(randn_like(x, *a, **k)) or noise[-1]  # type: ignore[assignment]
    try:
        trainer.fit(model, datamodule=EmbeddedFashionMNISTDataModule(batch_size=BATCH, val_images=16))
    finally:
        torch.randn_like = randn_like
    torch.save({
        "rank": trainer.global_rank, "world_size": trainer.world_size,
        "ema": [p.detach().clone() for p in ema._average_model.module.parameters()],
        "history": sampler.loss_history.clone(), "counts": sampler.counts.clone(), "probs": sampler.probs.clone(),
        "drawn": torch.cat(drawn), "fid": fid.history, "noise": [n for n in noise if n.shape == (BATCH, 1, 32, 32)],
    }, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
