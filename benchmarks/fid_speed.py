"""Seconds for one FID point: generate N samples (bf16) and compare them with the cached real statistics,
as FIDCallback does during training.

    python -m benchmarks.fid_speed --counts 5000 10000 --out benchmarks/results/fid_speed.json
    python -m benchmarks.fid_speed --model dit --solver ddpm --steps 250 --counts 10000 --batch-size 2500 \
        --variants compiled --out benchmarks/results/fid_speed_dit.json   # the paper recipe's IDDPM-250 FID-10k

Models: ``unet``, the default Fashion-MNIST UNet with DDIM (what the UNet configs sample), and ``dit``, the
recipe's DiT-S/2 with learned sigma (configs/fashion_mnist_dit.yaml), whose ``ddpm`` solver is IDDPM's
ancestral sampling with the learned variance. Variants of the network call: "eager", "compiled"
(``DiffusionModule(compile_sampling=True)``, torch.compile's default mode) and "compiled-MODE" (``compile_sampling=MODE``:
reduce-overhead, max-autotune, max-autotune-no-cudagraphs). summary.json: ``fid_seconds`` (UNet, eager),
``fid_seconds_compiled`` (UNet, compiled), ``fid_seconds_dit`` (DiT, every variant measured).
The networks are untrained: the timings are what they measure, not the FID values.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from benchmarks.common import RESULTS, SMOKE_BACKBONES, default_backbone, device_name, today, update_summary, write_json
from benchmarks.windows import sync
from lightning_speed import DiffusionModule
from lightning_speed.backbones import DiT
from lightning_speed.callbacks import FIDCallback
from lightning_speed.data import FashionMNISTDataModule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--counts", type=int, nargs="+", default=[5000, 10000])
    p.add_argument("--model", choices=["unet", "dit"], default="unet")
    p.add_argument("--solver", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--steps", type=int, default=50, help="solver steps")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--root", default=None)
    p.add_argument("--out", default=str(RESULTS / "fid_speed.json"))
    p.add_argument("--variants", nargs="+", default=["eager", "compiled"], choices=list(VARIANTS),
                   help="compiled-MODE: compile_sampling in that torch.compile mode")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if min(args.counts) < 1 or args.batch_size < 1 or args.steps < 1:
        p.error("--counts, --batch-size and --steps must be at least 1")
    if args.smoke:
        torch.set_num_threads(1)  # one thread: the tiny smoke steps are fastest so, and do not thrash a busy two-core CI machine
    command = " ".join(["python -m benchmarks.fid_speed", *sys.argv[1:]])
    results = {variant: {**time_variant(args, variant), "command": command} for variant in args.variants}
    write_json(Path(args.out), results)
    if torch.cuda.is_available() and not args.smoke and args.model == "dit":
        first = next(iter(results.values()))
        update_summary(RESULTS / "summary.json", {"fid_seconds_dit": {
            "card": first["card"], "date": first["date"], "command": command, "sampling": f"DiT-S/2 bf16, {first['solver'].upper()}, "
            f"batch {first['batch_size']}", **{v: _by_thousands(r["seconds"]) for v, r in results.items()}}})
    elif torch.cuda.is_available() and not args.smoke and "eager" in results:
        eager = results["eager"]
        updates = {"fid_seconds": {
            **_by_thousands(eager["seconds"]), "card": eager["card"], "date": eager["date"], "command": command,
            "sampling": f"eager bf16, {eager['solver'].upper()}, batch {eager['batch_size']}",
        }}
        if "compiled" in results:
            updates["fid_seconds_compiled"] = {**_by_thousands(results["compiled"]["seconds"]), "card": eager["card"],
                                               "date": eager["date"], "command": command}
        update_summary(RESULTS / "summary.json", updates)


# variant -> DiffusionModule(compile_sampling=...)
VARIANTS = {"eager": False, "compiled": True, "compiled-reduce-overhead": "reduce-overhead",
            "compiled-max-autotune": "max-autotune", "compiled-max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs"}


def _by_thousands(seconds: dict[str, float]) -> dict[str, float]:
    """{"5000": s, "10000": s} -> {"5k": s, "10k": s}, the keys of summary.json."""
    return {f"{int(n) // 1000}k": s for n, s in seconds.items()}


def warmup_sizes(counts: list[int], batch_size: int) -> list[int]:
    """The batch sizes an evaluation of each of ``counts`` samples uses, ``batch_size`` at a time: the full batch
    and each count's last, smaller batch."""
    return sorted({min(n, batch_size) for n in counts} | {n % batch_size for n in counts if n % batch_size})


def time_variant(args: argparse.Namespace, variant: str) -> dict:
    """Seconds for one FID evaluation per sample count, after a warm-up evaluation."""
    cuda = torch.cuda.is_available() and not args.smoke
    compiled = VARIANTS[variant]
    if args.model == "dit":  # the recipe's backbone (configs/fashion_mnist_dit.yaml)
        torch.manual_seed(0)
        dit = DiT(preset="DiT-S/2", in_channels=1, image_size=32, learn_sigma=True,
                  **(SMOKE_BACKBONES["DiT"] if args.smoke else {}))
        module = DiffusionModule(dit, learn_sigma=True, compile_sampling=compiled)
    else:
        module = DiffusionModule(default_backbone(**(SMOKE_BACKBONES["UNet"] if args.smoke else {})),
                                 compile_sampling=compiled)
    fid = FIDCallback(num_samples=args.counts[0], batch_size=args.batch_size, solver=args.solver,
                      solver_steps=args.steps, feature_extractor="fashion_mnist", on_train_end=False)
    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
                         max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[fid])
    trainer.fit(module, datamodule=FashionMNISTDataModule(root=args.root, batch_size=64, val_images=0))
    module.to(trainer.strategy.root_device)  # fit's teardown moved the module back to the CPU
    # Warm-up (kernels, allocator, feature network, real statistics) on every batch size the timed evaluations
    # sample: compiled sampling is compiled per batch shape, so a size left out would put a compilation in the timing.
    for size in warmup_sizes(args.counts, args.batch_size):
        fid.num_samples = size
        fid.evaluate(trainer, module)
    result = {"card": device_name(), "date": today(), "model": args.model, "solver": f"{args.solver}-{args.steps}",
              "batch_size": args.batch_size, "variant": variant,
              "note": f"untrained {args.model}: timing only, the FID value is meaningless", "seconds": {}}
    for n in args.counts:
        fid.num_samples = n
        sync(module.device)
        start = time.perf_counter()
        fid.evaluate(trainer, module)
        sync(module.device)
        result["seconds"][str(n)] = time.perf_counter() - start
        result.setdefault("samples_per_s", {})[str(n)] = n / result["seconds"][str(n)]
        print(f"{variant}: FID with {n} samples: {result['seconds'][str(n)]:.1f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
