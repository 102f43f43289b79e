"""Multi-GPU scaling: training images/s on N GPUs (DDP) over 1 GPU.

Row d of throughput.py (DiffusionModule + the SpeeD callback + our EMA, compiled, bf16, data on the
GPU) with a fixed batch per GPU. Each device count runs in its own process; Lightning's DDP
launcher starts the other ranks by running this module again.

    python -m benchmarks.ddp_scaling --devices 1 2 --batch-size 128 --root .data
    python -m benchmarks.ddp_scaling --smoke --out /tmp/ddp.json   # CPU, 1 and 2 processes, tiny model (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULTS, device_name, today, update_summary, write_json

def measure(args: argparse.Namespace) -> None:
    """One device count (this process is rank 0, or a rank started by Lightning): rank 0 writes the part file."""
    import torch

    from benchmarks.throughput import lightning_loop, seeded_backbone

    if args.smoke:
        torch.set_num_threads(1)
    backbone = seeded_backbone(args.smoke, torch.device("cpu"))  # Lightning moves it to each rank's device
    images_per_s = lightning_loop(backbone, args.root, args.batch_size, args.warmup, args.steps, speed=True,
                                  smoke=args.smoke, ema="ours", devices=args.run_devices,
                                  channels_last=not args.smoke)  # as the GPU configs train
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        write_json(Path(args.part), {"devices": args.run_devices, "images_per_s": images_per_s})


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    parts = Path(tempfile.mkdtemp(prefix="ddp_scaling_"))
    images_per_s: dict[str, float] = {}
    for n in args.devices:
        part = parts / f"devices{n}.json"
        cmd = [sys.executable, "-m", "benchmarks.ddp_scaling", "--run-devices", str(n), "--part", str(part),
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += (["--root", args.root] if args.root else []) + (["--smoke"] if args.smoke else [])
        subprocess.run(cmd, check=True, cwd=REPO)
        images_per_s[str(n)] = json.loads(part.read_text())["images_per_s"]
        print(f"{n} device(s): {images_per_s[str(n)]:.0f} images/s", flush=True)
    one = images_per_s.get("1")
    result = {
        "card": "cpu" if args.smoke else device_name(),
        "date": today(),
        "batch_per_device": args.batch_size,
        "images_per_s": images_per_s,
        # speed-up over 1 device, and that speed-up per device (1.0 = perfect scaling)
        "scaling": {n: v / one for n, v in images_per_s.items()} if one else {},
        "efficiency": {n: v / one / int(n) for n, v in images_per_s.items()} if one else {},
    }
    write_json(Path(args.out), result)
    if not args.smoke and one and len(images_per_s) > 1:
        update_summary(RESULTS / "summary.json", {"ddp_scaling": {k: result[k] for k in ("card", "date", "batch_per_device", "scaling", "images_per_s")}})
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="device counts to compare (1 first)")
    p.add_argument("--batch-size", type=int, default=128, help="per device")
    p.add_argument("--steps", type=int, default=300, help="timed steps")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--out", default=str(RESULTS / "ddp_scaling.json"))
    p.add_argument("--smoke", action="store_true", help="CPU processes, tiny model, a few steps")
    p.add_argument("--run-devices", type=int, default=None, help=argparse.SUPPRESS)  # internal: one measurement
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_devices:
        measure(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
