"""Where one training step's time goes, and whether cuDNN autotuning or channels_last speed it up.

Row a of throughput.py (the plain loop with our fast settings) is timed under each setting below, and one
step is traced with the profiler: GPU time per kernel family (convolution, matmul, attention, fused
Triton kernels, optimizer, layout conversion, other) against the step's wall time.

    base             the fast settings of throughput.py row a
    cudnn_benchmark  + torch.backends.cudnn.benchmark (cuDNN times its algorithms per shape; Trainer(benchmark=True))
    channels_last    + backbone and input in channels_last (NHWC) memory format
    both             both of the above

    python -m benchmarks.step_profile --batch-sizes 128 512 --root .data
    python -m benchmarks.step_profile --smoke     # a few CPU steps of a tiny model (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from benchmarks.common import RESULTS, device_name, today, write_json
from benchmarks.profiling import trace_closure
from benchmarks.throughput import plain_loop, plain_step, seeded_backbone, synthetic_images

VARIANTS = {  # name: (cudnn.benchmark, channels_last)
    "base": (False, False),
    "cudnn_benchmark": (True, False),
    "channels_last": (False, True),
    "both": (True, True),
}

# Kernel (GPU) or operator (CPU) name -> family; the first matching pattern wins. Triton first: inductor names
# its kernels after the ops they fuse ("triton_poi_fused_add_convolution_3" is a bias add, not a convolution).
FAMILIES = [
    ("fused_triton", r"triton"),
    ("layout_conversion", r"nchwToNhwc|nhwcToNchw|convertTensor"),
    ("convolution", r"conv|dgrad|wgrad|fprop|implicit_gemm|cudnn"),
    ("attention", r"flash|fmha|attention|sdp|efficient"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("matmul", r"gemm|nvjet|cutlass|cublas|aten::mm|aten::addmm|aten::bmm|aten::linear"),
]


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    """torch.backends.cudnn.benchmark set to ``on`` inside the block, and off again after it."""
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = False


def family(name: str) -> str:
    """The kernel family of a CUDA kernel or aten operator name."""
    for fam, pattern in FAMILIES:
        if re.search(pattern, name, re.IGNORECASE):
            return fam
    return "other"


def breakdown(step: Callable[[], None], device: torch.device, steps: int) -> dict[str, Any]:
    """Per-step time of each kernel family, traced over ``steps`` steps (GPU kernels on CUDA, operators on CPU)."""
    cuda = device.type == "cuda"
    prof, wall = trace_closure(step, device, steps)
    per_family: dict[str, float] = {}
    for event in prof.events():
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.device_time_total
        else:
            if not event.name.startswith("aten::"):
                continue
            us = event.self_cpu_time_total
        fam = family(event.name)
        per_family[fam] = per_family.get(fam, 0.0) + us / 1e3 / steps
    busy = sum(per_family.values())
    return {
        "busy_ms_per_step": busy,
        "wall_ms_per_step": wall * 1e3 / steps,
        "ms_per_step": dict(sorted(per_family.items(), key=lambda kv: -kv[1])),
        "fraction": {k: v / busy for k, v in per_family.items()} if busy else {},
        "measured_on": "GPU kernels" if cuda else "CPU operators (self time)",
    }


def main() -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--profile-variant", choices=VARIANTS, default="base", help="the settings of the traced step")
    p.add_argument("--profile-mode", default="default", choices=["default", "reduce-overhead"],
                   help="compile mode of the traced step (default: no CUDA graphs, so every kernel is traced "
                        "the same way; the kernels are those of reduce-overhead)")
    p.add_argument("--root", default=None, help="unused; data are synthetic (kept for a uniform command line)")
    p.add_argument("--out", default=str(RESULTS / "step_profile.json"))
    p.add_argument("--smoke", action="store_true", help="tiny model, CPU, a few steps (for the test suite)")
    args = p.parse_args()
    if min(args.batch_sizes) < 1 or args.steps < 1 or args.warmup < 1 or args.profile_steps < 1:
        p.error("--batch-sizes, --steps, --warmup and --profile-steps must be at least 1")

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        torch.set_num_threads(1)  # one thread: the tiny smoke steps are fastest so, and do not thrash a busy two-core CI machine
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    data = synthetic_images(60_000 if cuda else 256, device)
    result: dict[str, Any] = {"card": device_name() if cuda else "cpu", "date": today(), "torch": torch.__version__,
                              "command": " ".join(["python -m benchmarks.step_profile", *sys.argv[1:]]),
                              "images_per_s": {}, "breakdown": {}}
    for batch in args.batch_sizes:
        speeds: dict[str, float] = {}
        for name in args.variants:
            autotune, channels_last = VARIANTS[name]
            try:
                with cudnn_benchmark(autotune):
                    speeds[name] = plain_loop(seeded_backbone(args.smoke, device), data, batch, args.warmup,
                                              args.steps, fast=cuda, channels_last=channels_last)
            except Exception as err:  # keep the other variants; report what failed
                speeds[name] = float("nan")
                result.setdefault("errors", {})[f"{batch}/{name}"] = repr(err)[:500]
            print(f"batch {batch} {name}: {speeds[name]:.0f} images/s", flush=True)
        result["images_per_s"][str(batch)] = speeds
        write_json(Path(args.out), result)
    # The trace, at the largest batch (the bf16-rate goal is measured there).
    batch = max(args.batch_sizes)
    autotune, channels_last = VARIANTS[args.profile_variant]
    with cudnn_benchmark(autotune):
        step = plain_step(seeded_backbone(args.smoke, device), data, batch, fast=cuda, compile_mode=args.profile_mode,
                          channels_last=channels_last)
        for _ in range(args.warmup):
            step()
        result["breakdown"] = {"batch": batch, "compile_mode": args.profile_mode, "variant": args.profile_variant,
                               **breakdown(step, device, args.profile_steps)}
    print(result["breakdown"], flush=True)
    write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
