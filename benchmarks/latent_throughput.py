"""The latent pipeline at the paper's size on one GPU: encoding throughput of the real-size
sd-vae-ft-ema ``AutoencoderKL`` architecture, and DiT training on latents read from the cache by the real
``LatentDataModule``.

1. ``encode``: the autoencoder built from sd-vae-ft-ema's config (``SD_VAE_FT_EMA_CONFIG``: block_out_channels
   [128, 256, 512, 512], 2 layers per block, 4 latent channels, 32 groups, scaling factor 0.18215) with
   random weights (the speed does not depend on their values), encoding ``--encode-images`` random 256 px
   images in batches of ``--encode-batch``: images/s in fp32 (TF32 convolutions and matmuls, as the
   official code's ``torch.backends.*.allow_tf32``) and under bf16 autocast, each after a warm-up batch,
   with the encoder's FLOPs per image and the fraction of the measured bf16 matmul rate.
2. ``cache``: ``LatentDataModule`` over ``--images`` random uint8 256 px images (a stand-in for an image
   folder) encodes them and their mirror images once (fp32, its default) into a memory-mapped cache in a
   temporary folder: wall time and images/s of the whole build (encoding, host copies, disk writes).
3. ``presets``: per DiT preset, ``DiffusionModule(DiT(preset, in_channels 4, 32x32, learn_sigma), compile_mode)``
   under ``pl.Trainer(bf16-mixed)`` with ``SpeeD()`` and ``EMAWeightAveraging(decay=0.9999)``, batch 256,
   latents drawn from the cache on the GPU by the data module (``LatentBatchLoader``: posterior mean + std x
   noise, random mirror). ``--repeats`` windows of at least ``--window`` seconds each, timed hook to hook
   inside one ``fit`` after ``--warmup`` steps (``benchmarks.windows.TrainerWindows``); images/s
   (median, min, max), the fraction of the measured bf16 matmul rate (FLOPs of the backbone's forward and
   backward per image, ``benchmarks.throughput.flops_per_image``) and peak memory.

The result goes to ``--out`` (JSON, also printed) and, on a GPU, under "throughput_latent" in
``--summary`` (presets merged with those already there, so one preset per GPU can run concurrently).

On an H200 (about 1.5 minutes for DiT-B/2 and 2.5 for DiT-XL/2, mostly compilation; one process per GPU):
    python -m benchmarks.latent_throughput --presets DiT-B/2 --out benchmarks/results/latent_throughput_b2.json
    python -m benchmarks.latent_throughput --presets DiT-XL/2 --skip-encode-bench --out benchmarks/results/latent_throughput_xl2.json
    python -m benchmarks.latent_throughput --smoke --out /tmp/latent.json   # tiny, on the CPU (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import RESULTS, device_name, measured_bf16_matmul_tflops, today, update_summary, write_json
from benchmarks.dit_throughput import SMOKE_DIT
from benchmarks.throughput import flops_per_image
from benchmarks.windows import Row, TrainerWindows, allocated, sync, windowed_trainer
from lightning_speed import DiffusionModule
from lightning_speed.autoencoders import Autoencoder, import_diffusers
from lightning_speed.backbones import DIT_PRESETS, DiT
from lightning_speed.callbacks import EMAWeightAveraging, SpeeD
from lightning_speed.data import LatentDataModule, UInt8ImageDataModule

SD_VAE_FT_EMA_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 256, "scaling_factor": 0.18215,
}  # fmt: skip
"""stabilityai/sd-vae-ft-ema's config.json (the architecture; this benchmark's weights are random)."""
SMOKE_VAE_CONFIG: dict[str, Any] = {
    **SD_VAE_FT_EMA_CONFIG, "block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32,
}  # fmt: skip


class RandomImages(UInt8ImageDataModule):
    """``n`` random uint8 RGB images of ``size`` px: what an image folder hands the latent data module."""

    name = "random_images"
    num_classes = 1

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        super().__init__(batch_size=1, num_workers=0, random_flip=False, pad_to=None, val_images=0, on_device=False,
                         seed=seed)
        self.n, self.image_shape = n, (3, size, size)

    def _load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.n if split == "train" else 1
        device = "cuda" if torch.cuda.is_available() else "cpu"  # drawn on the GPU: seconds fewer for GBs of pixels
        g = torch.Generator(device=device).manual_seed(self.seed + (split != "train"))
        images = torch.randint(0, 256, (n, *self.image_shape), dtype=torch.uint8, device=device, generator=g)
        return images.cpu(), torch.zeros(n, dtype=torch.long)


def build_autoencoder(smoke: bool, device: torch.device) -> Autoencoder:
    diffusers = import_diffusers()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**(SMOKE_VAE_CONFIG if smoke else SD_VAE_FT_EMA_CONFIG))
    return Autoencoder(vae.to(device), name="sd-vae-ft-ema architecture, random weights")


def encoder_flops(autoencoder: Autoencoder, size: int) -> float:
    x = torch.randn(1, 3, size, size, device=autoencoder.device)
    counter = FlopCounterMode(display=False)
    with counter:
        autoencoder.encode(x)
    return float(counter.get_total_flops())


def encode_bench(autoencoder: Autoencoder, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    size = args.size
    flops = encoder_flops(autoencoder, size)
    images = torch.rand(args.encode_batch, 3, size, size, device=device) * 2 - 1
    out: dict[str, Any] = {"images": args.encode_images, "batch": args.encode_batch, "image_size": size,
                           "flops_per_image": flops}
    for precision in ("fp32", "bf16"):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with autocast:
            autoencoder.encode(images)  # warm-up (cuDNN algorithm choice)
        sync(device)
        start, done = time.perf_counter(), 0
        while done < args.encode_images:
            with autocast:
                autoencoder.encode(images)
            done += images.shape[0]
        sync(device)
        ips = done / (time.perf_counter() - start)
        out[precision] = {"images_per_s": ips}
        if args.tflops:
            out[precision]["fraction_of_bf16_rate"] = flops * ips / 1e12 / args.tflops
    return out


def build_cache(autoencoder: Autoencoder, args: argparse.Namespace, folder: Path, device: torch.device) -> tuple[LatentDataModule, dict]:
    data = LatentDataModule(RandomImages(args.images, args.size), autoencoder, cache_dir=str(folder),
                            batch_size=args.batch, on_device=True, encode_batch_size=args.encode_batch)
    sync(device)
    start = time.perf_counter()
    data.prepare_data()
    sync(device)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in folder.iterdir())
    autoencoder.to("cpu")  # training needs no encoder; sampling (not measured here) would bring it back
    if device.type == "cuda":
        torch.cuda.empty_cache()
    encodes = (2 if data.random_flip else 1) * args.images  # each image and, with the flip, its mirror image
    return data, {"images": args.images, "encodes": encodes, "seconds": seconds,
                  "images_per_s": encodes / seconds, "bytes": size, "latent_shape": list(data.image_shape),
                  "encode_precision": data.encode_precision, "dtype": data.cache_dtype}


def measure_preset(preset: str, data: LatentDataModule, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    c, h, w = data.image_shape
    mode = None if args.smoke or args.compile_mode == "none" else args.compile_mode

    def dit() -> torch.nn.Module:
        torch.manual_seed(0)
        return DiT(preset=preset, in_channels=c, image_size=h, learn_sigma=True, **(SMOKE_DIT if args.smoke else {}))

    out: dict[str, Any] = {"flops_per_image": flops_per_image(dit().to(device), device, 16, (c, h, w))}
    row, repeats = Row(), [args.repeats]

    def between() -> Row | None:  # one Trainer row: its windows follow each other
        repeats[0] -= 1
        return row if repeats[0] >= 0 else None

    windows = TrainerWindows(between, args.batch, args.warmup, args.window, 1 if args.smoke else 3, allocated(device))
    module = DiffusionModule(dit(), learn_sigma=True, compile_mode=mode, image_shape=data.image_shape)
    trainer = windowed_trainer(cuda, [SpeeD(), EMAWeightAveraging(decay=0.9999), windows])
    trainer.fit(module, datamodule=data)
    if len(row.images_per_s) != args.repeats:
        raise RuntimeError(f"{preset}: the Trainer stopped after {len(row.images_per_s)} of {args.repeats} windows.")
    out.update({**row.spread(), "loader": type(trainer.train_dataloader).__name__, "encoder_calls": data.encoder_calls})
    if cuda:
        out["peak_memory_gib"] = row.peak_memory_gib()
        out["fraction_of_bf16_rate"] = out["flops_per_image"] * out["images_per_s"] / 1e12 / args.tflops
    del trainer, module
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return out


def main() -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=None, choices=list(DIT_PRESETS),
                   help="DiT presets (default: DiT-B/2 DiT-XL/2)")
    p.add_argument("--batch", type=int, default=None, help="latents per training step (default 256; 4 with --smoke)")
    p.add_argument("--images", type=int, default=None, help="random images encoded into the cache (default 8192)")
    p.add_argument("--encode-images", type=int, default=None, help="images per encoding measurement (default 2048)")
    p.add_argument("--encode-batch", type=int, default=64, help="images per encoder call")
    p.add_argument("--skip-encode-bench", action="store_true", help="no separate encoding measurement (the cache is still built)")
    p.add_argument("--window", type=float, default=10.0, help="seconds per timed window (at least)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per preset")
    p.add_argument("--warmup", type=int, default=15, help="untimed steps (compilation)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "none"])
    p.add_argument("--out", type=Path, default=RESULTS / "latent_throughput.json")
    p.add_argument("--summary", type=Path, default=RESULTS / "summary.json", help="summary.json to update (GPU runs)")
    p.add_argument("--smoke", action="store_true", help="tiny autoencoder and DiT, 32 px, on the CPU (tests)")
    args = p.parse_args()
    counts = (args.batch, args.images, args.encode_images, args.encode_batch, args.repeats, args.warmup)
    if min(n for n in counts if n is not None) < 1 or args.window < 0:
        p.error("--batch, --images, --encode-images, --encode-batch, --repeats and --warmup must be at least 1, "
                "--window at least 0")
    if args.smoke:
        args.presets, args.window, args.warmup = args.presets or ["DiT-S/2"], min(args.window, 0.05), min(args.warmup, 1)
        args.size, args.encode_batch = 32, min(args.encode_batch, 8)
    else:
        args.size = 256
    args.presets = args.presets or ["DiT-B/2", "DiT-XL/2"]
    args.batch = args.batch or (4 if args.smoke else 256)
    args.images = args.images or (16 if args.smoke else 8192)
    args.encode_images = args.encode_images or (16 if args.smoke else 2048)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 where fp32 remains, as the official code allows
        torch.backends.cudnn.allow_tf32 = True
    args.tflops = measured_bf16_matmul_tflops() if cuda else None
    command = " ".join(["python -m benchmarks.latent_throughput", *sys.argv[1:]])
    result: dict[str, Any] = {"card": device_name() if cuda else "cpu", "date": today(), "torch": torch.__version__,
                              "smoke": args.smoke, "batch": args.batch, "compile_mode": args.compile_mode,
                              "window_s": args.window, "repeats": args.repeats, "bf16_matmul_tflops": args.tflops,
                              "command": command, "presets": {}}
    autoencoder = build_autoencoder(args.smoke, device)
    result["autoencoder"] = {"config": "smoke" if args.smoke else "sd-vae-ft-ema", "parameters":
                             sum(p.numel() for p in autoencoder.vae.parameters())}
    if not args.skip_encode_bench:
        result["encode"] = encode_bench(autoencoder, args, device)
        print("encode", json.dumps(result["encode"]), flush=True)
    with tempfile.TemporaryDirectory(prefix="latent_cache_") as folder:
        data, result["cache"] = build_cache(autoencoder, args, Path(folder), device)
        print("cache", json.dumps(result["cache"]), flush=True)
        for preset in args.presets:
            result["presets"][preset] = measure_preset(preset, data, args, device)
            print(preset, json.dumps(result["presets"][preset]), flush=True)
            write_json(args.out, result)  # after every preset, so a cut-off run keeps what it measured
    write_json(args.out, result)
    if cuda:
        earlier = json.loads(args.summary.read_text()).get("throughput_latent", {}) if args.summary.exists() else {}
        presets = {**earlier.get("presets", {}), **{name: {
            "images_per_s": r["images_per_s"], "spread": [r["min"], r["max"]],
            "fraction_of_bf16_rate": r["fraction_of_bf16_rate"], "card": result["card"], "date": result["date"],
            "command": command} for name, r in result["presets"].items()}}
        entry = {**earlier, "card": result["card"], "date": result["date"], "command": command, "batch": args.batch,
                 "presets": presets, "cache": result["cache"]}
        if "encode" in result:
            entry["encode_images_per_s"] = {k: result["encode"][k]["images_per_s"] for k in ("fp32", "bf16")}
        update_summary(args.summary, {"throughput_latent": entry})
    print(json.dumps(result, indent=1), flush=True)
    return result


if __name__ == "__main__":
    main()
