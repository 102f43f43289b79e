"""Seconds for one FID point: generate N samples (DDIM-50, bf16) with the default Fashion-MNIST
UNet and compare them with the cached real statistics, as FIDCallback does during training.

    python -m benchmarks.fid_speed --counts 5000 10000 --out benchmarks/results/fid_speed.json

Two variants of the network call: "eager" (what the shipped configs use) and "compiled"
(``DiffusionModule(compile_sampling=True)``). ``fid_seconds`` in summary.json is the eager one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from benchmarks.common import RESULTS, SMOKE_BACKBONES, default_backbone, device_name, today, update_summary, write_json
from lightning_speed import DiffusionModule
from lightning_speed.callbacks import FIDCallback
from lightning_speed.data import FashionMNISTDataModule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--counts", type=int, nargs="+", default=[5000, 10000])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--root", default=None)
    p.add_argument("--out", default=str(RESULTS / "fid_speed.json"))
    p.add_argument("--variants", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        torch.set_num_threads(1)  # one thread: the tiny smoke steps are fastest so, and do not thrash a busy two-core CI machine
    results = {variant: time_variant(args, variant) for variant in args.variants}
    write_json(Path(args.out), results)
    if torch.cuda.is_available() and not args.smoke and "eager" in results:
        eager = results["eager"]
        updates = {"fid_seconds": {
            **_by_thousands(eager["seconds"]), "card": eager["card"],
            "sampling": f"eager bf16, {eager['solver'].upper()}, batch {eager['batch_size']}",
        }}
        if "compiled" in results:
            updates["fid_seconds_compiled"] = {**_by_thousands(results["compiled"]["seconds"]), "card": eager["card"]}
        update_summary(RESULTS / "summary.json", updates)


def _by_thousands(seconds: dict[str, float]) -> dict[str, float]:
    """{"5000": s, "10000": s} -> {"5k": s, "10k": s}, the keys of summary.json."""
    return {f"{int(n) // 1000}k": s for n, s in seconds.items()}


def time_variant(args: argparse.Namespace, variant: str) -> dict:
    """Seconds for one FID evaluation per sample count, after a warm-up evaluation."""
    cuda = torch.cuda.is_available() and not args.smoke
    overrides = SMOKE_BACKBONES["UNet"] if args.smoke else {}
    module = DiffusionModule(default_backbone(**overrides), compile_sampling=variant == "compiled")
    fid = FIDCallback(num_samples=args.counts[0], batch_size=args.batch_size, solver_steps=args.steps,
                      feature_extractor="fashion_mnist", on_train_end=False)
    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
                         max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[fid])
    trainer.fit(module, datamodule=FashionMNISTDataModule(root=args.root, batch_size=64, val_images=0))
    module.to(trainer.strategy.root_device)  # fit's teardown moved the module back to the CPU
    fid.num_samples = min(args.counts[0], 1000)
    fid.evaluate(trainer, module)  # warm-up: kernels, allocator, feature network
    result = {"card": device_name(), "date": today(), "solver": f"ddim-{args.steps}", "batch_size": args.batch_size,
              "variant": variant,
              "note": "untrained default UNet: timing only, the FID value is meaningless", "seconds": {}}
    for n in args.counts:
        fid.num_samples = n
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fid.evaluate(trainer, module)
        if cuda:
            torch.cuda.synchronize()
        result["seconds"][str(n)] = time.perf_counter() - start
        result.setdefault("samples_per_s", {})[str(n)] = n / result["seconds"][str(n)]
        print(f"{variant}: FID with {n} samples: {result['seconds'][str(n)]:.1f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
