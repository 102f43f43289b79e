"""Run by tests/test_fsdp.py on 2 GPUs: the shipped FSDP config (DiT, SpeeD, EMA) through the CLI, checked
against an EMA recomputed from the full training weights.

    python tests/fsdp_script.py OUT_DIR DATA_ROOT STEPS [CKPT]

Builds the CLI from configs/fashion_mnist_dit.yaml + strategies/speed.yaml + multi_gpu/fsdp_dit_xl.yaml with
DiT-S/2, a small batch and EMA decay 0.8 (so the average moves visibly in a few steps), adds a callback that
gathers the full training weights after every step and recomputes the average on rank 0 in float64, and
fits to STEPS (from CKPT when given). Lightning's launcher starts this script again for rank 1. Rank 0
writes what the test compares to OUT_DIR/result_<STEPS>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_speed.callbacks import EMAWeightAveraging, TimestepCallback
from lightning_speed.timesteps import SpeeD
from lightning_speed.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
DECAY = 0.8


class ReferenceAverage(pl.Callback):
    """Rank 0's float64 EMA of the full weights, from the strategy's gathered state dict after every step."""

    def __init__(self, start: dict[str, torch.Tensor] | None, n_averaged: int) -> None:
        self.average = None if start is None else {k: v.double() for k, v in start.items() if v.is_floating_point()}
        self.n_averaged = n_averaged
        self.start_weights: dict[str, torch.Tensor] | None = None
        self.last_weights: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer, pl_module):
        weights = trainer.strategy.lightning_module_state_dict()  # collective; full on rank 0
        self.start_weights = {k: v.clone() for k, v in weights.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        weights = trainer.strategy.lightning_module_state_dict()
        if not trainer.is_global_zero:
            return
        self.last_weights = {k: v.clone() for k, v in weights.items()}
        floating = {k: v.double() for k, v in weights.items() if v.is_floating_point()}
        if self.n_averaged == 0:
            self.average = floating
        else:
            self.average = {k: DECAY * self.average[k] + (1 - DECAY) * w for k, w in floating.items()}
        self.n_averaged += 1


def main(out_dir: str, data_root: str, steps: int, ckpt: str | None) -> None:
    out = Path(out_dir)
    configs = ["fashion_mnist_dit.yaml", "strategies/speed.yaml", "multi_gpu/fsdp_dit_xl.yaml"]
    args = [a for c in configs for a in ("--config", str(REPO / "configs" / c))] + [
        "--trainer.devices", "2", "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
        "--trainer.limit_val_batches", "0", "--trainer.logger.init_args.save_dir", str(out / "runs"),
        "--model.backbone.init_args.preset", "DiT-S/2", "--ema.init_args.decay", str(DECAY),
        "--data.init_args.root", data_root, "--data.init_args.batch_size", "32", "--data.init_args.val_images", "0",
        "--checkpoint.init_args.every_n_train_steps", str(steps), "--checkpoint.init_args.dirpath", str(out / "ckpt"),
        "--checkpoint.init_args.filename", f"step{steps}",
    ]
    cli = cli_main(args, run=False)
    start, n = None, 0
    if ckpt is not None:
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        start, n = saved["state_dict"], int(saved["averaging_state"]["n_averaged"])
    reference = ReferenceAverage(start, n)
    cli.trainer.callbacks.insert(len(cli.trainer.callbacks) - 1, reference)  # before ModelCheckpoint (last)
    ema = next(c for c in cli.trainer.callbacks if isinstance(c, EMAWeightAveraging))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    shard_numel = sum(t.numel() for t in ema._shards.tensors)
    total = sum(t.numel() for t in reference.start_weights.values()) if reference.start_weights else None
    gathered = [None] * 2
    torch.distributed.all_gather_object(gathered, shard_numel)
    if not cli.trainer.is_global_zero:
        return
    torch.save({
        "world_size": cli.trainer.world_size,
        "strategy": type(cli.trainer.strategy).__name__,
        "speed": any(isinstance(c, TimestepCallback) and isinstance(c.sampling, SpeeD) for c in cli.trainer.callbacks),
        "ema_is_shards": ema._shards is not None and ema._average_model is None,
        "shard_numel": gathered, "total_numel": total,
        "reference": reference.average, "n_averaged": reference.n_averaged,
        "start_weights": reference.start_weights, "last_weights": reference.last_weights,
        "checkpoint": str(out / "ckpt" / f"step{steps}.ckpt"),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }, out / f"result_{steps}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
