"""How fast can the recipe's FID sampling be? DiT-S/2's forward at the FID batch, against its matmul floor.

An IDDPM-250 FID-10k calls the backbone 250 times on each of ceil(10,000 / batch) batches. This script times, in
bf16 on the GPU at that batch, (1) each matrix product of one transformer block (qkv, attention output, the two MLP
layers, each ``F.linear`` with its bias) and the attention itself (``F.scaled_dot_product_attention``), and, when
``fp8-tensor`` is asked for, the same products in e4m3 with per-tensor scales; and (2) the whole backbone forward,
eager and compiled as ``DiffusionModule(compile_sampling=MODE)`` compiles it, in each of ``--precisions``:
``autocast`` (fp32 weights under bf16 autocast, as sampling runs: LayerNorm and the residual stream in fp32),
``bf16`` (weights and activations in bf16 end to end), each also ``-unfused`` (each MLP's GELU as a kernel of its own
instead of in its first product's epilogue, ``FeedForward.gelu_epilogue = False``: sampling before the epilogue),
``fp8`` (``bf16`` with the blocks' four linear layers as e4m3 products, weights scaled per output row and activations
per token, ``torch._scaled_mm``; Hopper and later) and ``fp8-tensor`` (the same products with one scale per weight
and one per layer input, the latter calibrated once on a separate batch, so quantising an input is a multiply and a
cast that the compiler fuses into the LayerNorm or GELU kernel before it; inputs beyond the calibrated range are
clamped). Each precision's output is compared with the fp32 forward of the same weights (``rel_error``: RMS of the
difference over RMS of the fp32 output; the weights are re-drawn so the adaLN-Zero start is not all zeros). The sum of (1) over the blocks is the forward's floor with
today's kernels, whatever the fusion of the elementwise work between them (LayerNorm, adaLN shift/scale, GELU, gates,
residuals); seconds per FID = forward time x calls. Each time is the median of --repeats timings of --iters calls,
the GPU synchronised at both ends; the min and max are kept. ``--profile`` adds, per timed forward, its GPU kernel
time and the kernels that take it (``profile``: the profiler's table, by self CUDA time).

    python -m benchmarks.dit_roofline --batch-size 2500 --out benchmarks/results/dit_roofline.json
    python -m benchmarks.dit_roofline --smoke --out /tmp/roofline.json   # CPU, tiny sizes (tests)

summary.json: ``fid_roofline_dit`` (seconds per IDDPM-250 FID-10k: matmul floor, forward eager and compiled); a run on
another card than the committed one goes in by hand under a key naming the card (``fid_roofline_dit_h100``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, get_args

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, device_name, measured_bf16_matmul_tflops, today, update_summary, write_json
from benchmarks.profiling import profile_closure
from benchmarks.windows import sync
from lightning_speed.backbones import DiT
from lightning_speed.backbones.dit import DIT_PRESETS, dit_size
from lightning_speed.module import CompileMode

SMOKE = {"depth": 1, "hidden_size": 32, "num_heads": 2}
PRECISIONS = ("autocast", "autocast-unfused", "bf16", "bf16-unfused", "fp8", "fp8-tensor")
E4M3_MAX = 448.0  # largest finite float8_e4m3fn


class Fp8Linear(torch.nn.Module):
    """``nn.Linear`` for inference as an e4m3 product, ``torch._scaled_mm`` accumulating in fp32 and writing bf16
    (Hopper and later GPUs). ``input_amax=None``: weights scaled per output row, the input per row (token) at each
    call. ``input_amax`` given: one scale for the weight and one for the input, ``448 / input_amax`` (inputs beyond it
    are clamped), so the call quantises with elementwise work only."""

    def __init__(self, linear: torch.nn.Linear, input_amax: float | None = None) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        rowwise = input_amax is None
        amax = weight.abs().amax(dim=1, keepdim=True) if rowwise else weight.abs().amax()
        scale = E4M3_MAX / amax.clamp(min=1e-12)
        # _scaled_mm wants its second operand column-major: the (out, in) row-major weight, transposed.
        self.register_buffer("weight", (weight * scale).to(torch.float8_e4m3fn).t())
        self.register_buffer("weight_scale", scale.reciprocal().reshape(1, -1) if rowwise else scale.reciprocal())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))
        input_scale = None if rowwise else torch.tensor(E4M3_MAX / max(input_amax, 1e-12), device=weight.device)
        self.register_buffer("input_scale", input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.input_scale is None:
            scale = E4M3_MAX / rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
        else:
            scale = self.input_scale
        q = (rows.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(q, self.weight, scale_a=scale.reciprocal(), scale_b=self.weight_scale, bias=self.bias,
                               out_dtype=torch.bfloat16)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def block_linears(net: DiT) -> list[tuple[Any, str]]:
    """(parent, attribute) of each transformer block's four linear layers: qkv, attention output, MLP in and out."""
    return [pair for b in net.blocks for pair in ((b.attn, "qkv"), (b.attn, "proj"), (b.mlp, "0"), (b.mlp, "2"))]


def input_amax(net: DiT, x: torch.Tensor, t: torch.Tensor) -> list[float]:
    """The largest input magnitude each of ``block_linears(net)`` sees in one forward of ``(x, t)``."""
    seen: list[float] = []
    hooks = [getattr(parent, name).register_forward_pre_hook(lambda _, args: seen.append(float(args[0].abs().amax())))
             for parent, name in block_linears(net)]
    try:
        with torch.no_grad():
            net(x, t)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def low_precision_forward(dit: DiT, precision: str, calibration: tuple[torch.Tensor, torch.Tensor] | None = None
                          ) -> Callable[..., torch.Tensor]:
    """The forward of a bf16 copy of ``dit`` without autocast (``fp8`` / ``fp8-tensor``: its blocks' linear layers as
    ``Fp8Linear``, per-tensor input scales from one forward of ``calibration``): images and time steps in, fp32 out."""
    net = copy.deepcopy(dit).to(torch.bfloat16)
    if precision.startswith("fp8"):
        if precision == "fp8-tensor":
            if calibration is None:
                raise ValueError("fp8-tensor needs a calibration batch (images, time steps) for its input scales.")
            amax = input_amax(net, calibration[0].to(torch.bfloat16), calibration[1])
        else:
            amax = [None] * len(block_linears(net))
        for (parent, name), a in zip(block_linears(net), amax):
            setattr(parent, name, Fp8Linear(getattr(parent, name), input_amax=a))
    return lambda x, t: net(x, t).float()


def without_gelu_epilogue(dit: DiT) -> DiT:
    """A copy of ``dit`` whose MLPs run the GELU as a kernel of its own (``FeedForward.gelu_epilogue = False``)."""
    net = copy.deepcopy(dit)
    for block in net.blocks:
        block.mlp.gelu_epilogue = False
    return net


def redraw_weights(dit: DiT, seed: int = 0) -> None:
    """Non-zero weights everywhere (the adaLN-Zero start predicts exactly zero, which no precision can get wrong)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in dit.parameters():
            fan_in = param.shape[-1] if param.dim() > 1 else 1
            param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))


def timed(fn: Callable[[], Any], device: torch.device, iters: int, repeats: int) -> dict[str, float]:
    """Milliseconds per call of ``fn``: median, min and max of ``repeats`` timings of ``iters`` calls."""
    fn()  # warm-up: kernels chosen, memory allocated
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3 / iters)
    return {"ms": statistics.median(times), "min": min(times), "max": max(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="DiT-S/2", choices=list(DIT_PRESETS))
    p.add_argument("--batch-size", type=int, default=2500, help="images per backbone call (the FID batch)")
    p.add_argument("--samples", type=int, default=10_000, help="images per FID")
    p.add_argument("--solver-steps", type=int, default=250, help="backbone calls per image")
    p.add_argument("--compile-modes", nargs="*", default=["default", "max-autotune-no-cudagraphs"],
                   choices=get_args(CompileMode), help="torch.compile modes of the forward, besides eager")
    p.add_argument("--precisions", nargs="*", default=list(PRECISIONS), choices=PRECISIONS,
                   help="forward precisions (module docstring); autocast is also timed eager")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true",
                   help="also trace two calls of each timed forward: GPU time per forward by kernel (``profile``)")
    p.add_argument("--out", default=str(RESULTS / "dit_roofline.json"))
    p.add_argument("--smoke", action="store_true", help="CPU, a tiny DiT, fp32, eager (tests)")
    args = p.parse_args()
    if min(args.batch_size, args.samples, args.solver_steps, args.iters, args.repeats) < 1:
        raise SystemExit("--batch-size, --samples, --solver-steps, --iters and --repeats must be at least 1.")
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    size = dit_size(args.preset)
    dim, heads, depth = (SMOKE["hidden_size"], SMOKE["num_heads"], SMOKE["depth"]) if args.smoke else \
        (size.hidden_size, size.num_heads, size.depth)
    image, channels = 32, 1  # the recipe's Fashion-MNIST pixels: (32 / patch)^2 tokens
    tokens = (image // size.patch_size) ** 2
    rows = args.batch_size * tokens
    timing = {"device": device, "iters": args.iters, "repeats": args.repeats}

    calls = args.solver_steps * math.ceil(args.samples / args.batch_size)
    result: dict[str, Any] = {
        "card": device_name() if cuda else "cpu", "date": today(), "command": " ".join(["python -m benchmarks.dit_roofline", *sys.argv[1:]]),
        "preset": args.preset, "batch_size": args.batch_size, "tokens": tokens, "samples": args.samples,
        "solver_steps": args.solver_steps, "backbone_calls_per_fid": calls,
        "measured_bf16_matmul_tflops": measured_bf16_matmul_tflops() if cuda else None,
        "block": {}, "forward_ms": {}, "fid_seconds": {}, "complete": False,
    }

    # (1) one block's matrix products, at the forward's shapes; with fp8-tensor also in e4m3 with per-tensor scales
    # (bf16 out), the floor that fp8-tensor's forward can reach
    fp8_ok = not cuda or torch.cuda.get_device_capability(device) >= (8, 9)
    fp8_floor = "fp8-tensor" in args.precisions and cuda and fp8_ok
    x = torch.randn(rows, dim, device=device, dtype=dtype)
    hidden = torch.randn(rows, 4 * dim, device=device, dtype=dtype)
    one = torch.ones((), device=device)
    if fp8_floor:
        result["block_fp8"] = {}
    for name, (inp, out_features) in {"qkv": (x, 3 * dim), "attention_out": (x, dim), "mlp_in": (x, 4 * dim),
                                      "mlp_out": (hidden, dim)}.items():
        weight = torch.randn(out_features, inp.shape[1], device=device, dtype=dtype)
        bias = torch.randn(out_features, device=device, dtype=dtype)
        calls_of = {"block": lambda inp=inp, weight=weight, bias=bias: F.linear(inp, weight, bias)}
        if fp8_floor:
            a, b = inp.to(torch.float8_e4m3fn), weight.to(torch.float8_e4m3fn).t()
            calls_of["block_fp8"] = lambda a=a, b=b, bias=bias: torch._scaled_mm(
                a, b, scale_a=one, scale_b=one, bias=bias, out_dtype=dtype)
        flops = 2 * rows * inp.shape[1] * out_features
        for key, fn in calls_of.items():
            t = timed(fn, **timing)
            record(result, name, {**t, "shape": [rows, inp.shape[1], out_features], "tflops": flops / t["ms"] / 1e9},
                   key)
    q = torch.randn(args.batch_size, heads, tokens, dim // heads, device=device, dtype=dtype)
    t = timed(lambda q=q: F.scaled_dot_product_attention(q, q, q), **timing)
    flops = 4 * args.batch_size * heads * tokens**2 * (dim // heads)
    record(result, "attention", {**t, "shape": list(q.shape), "tflops": flops / t["ms"] / 1e9})
    del x, hidden, q
    result["matmul_floor_ms_per_forward"] = depth * sum(v["ms"] for v in result["block"].values())
    result["fid_seconds"]["matmul_floor"] = result["matmul_floor_ms_per_forward"] * calls / 1e3
    if fp8_floor:  # the attention stays in bf16
        result["matmul_floor_fp8_ms_per_forward"] = depth * (sum(v["ms"] for v in result["block_fp8"].values())
                                                             + result["block"]["attention"]["ms"])
        result["fid_seconds"]["matmul_floor_fp8"] = result["matmul_floor_fp8_ms_per_forward"] * calls / 1e3
    write_json(Path(args.out), result)  # after each stage: a run cut short keeps what it measured

    # (2) the backbone forward, as the sampler calls it, in each precision
    torch.manual_seed(0)
    dit = DiT(preset=args.preset, in_channels=channels, image_size=image, learn_sigma=True,
              **({"depth": depth, "hidden_size": dim, "num_heads": heads} if args.smoke else {}))
    redraw_weights(dit)
    dit = dit.to(device).eval()
    xt = torch.randn(args.batch_size, channels, image, image, device=device)
    steps = torch.randint(0, 1000, (args.batch_size,), device=device)
    # fp8-tensor's input scales come from another batch (other noise, other time steps) than the one it is judged on
    gen = torch.Generator(device).manual_seed(1)
    calibration = (torch.randn(xt.shape, device=device, generator=gen),
                   torch.randint(0, 1000, steps.shape, device=device, generator=gen))
    with torch.no_grad():
        reference = torch.cat([dit(xt[i:i + 250].float(), steps[i:i + 250]) for i in range(0, args.batch_size, 250)])
    result["rel_error"] = {}
    modes = [] if args.smoke else args.compile_modes
    for precision in args.precisions:
        if precision.startswith("fp8") and not fp8_ok:
            print(f"{precision}: skipped (needs a GPU of compute capability 8.9 or later)", flush=True)
            continue
        kind = precision.removesuffix("-unfused")
        model = dit if kind == precision else without_gelu_epilogue(dit)
        if kind == "autocast":
            base = model.forward
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
        else:
            base = low_precision_forward(model, kind, calibration)
            autocast = contextlib.nullcontext()
        with torch.no_grad(), autocast:
            out = base(xt, steps).float()
        result["rel_error"][precision] = float((out - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())
        del out
        for mode in (["eager"] if precision == "autocast" else []) + modes:
            name = mode if precision == "autocast" else f"{precision}-{mode}"
            net = base if mode == "eager" else torch.compile(base, dynamic=False, mode=mode)

            def call(net: Callable[..., Any] = net, autocast: Any = autocast) -> None:
                with torch.no_grad(), autocast:
                    net(xt, steps)

            result["forward_ms"][name] = timed(call, **timing)
            if args.profile:  # where the time above the floor goes: the kernels between the products
                summary = profile_closure(call, device, steps=2)
                result.setdefault("profile", {})[name] = {k: summary[k] for k in (
                    "compute_kernels_ms_per_step", "gpu_idle_ms_per_step", "kernels_per_step", "table")}
            result["fid_seconds"][name] = result["forward_ms"][name]["ms"] * calls / 1e3
            print(f"forward {name}: {result['forward_ms'][name]['ms']:.2f} ms, {result['fid_seconds'][name]:.1f} s per "
                  f"FID; rel. error vs fp32 {result['rel_error'][precision]:.2e}", flush=True)
            write_json(Path(args.out), result)
            torch._dynamo.reset()
    result["complete"] = True
    write_json(Path(args.out), result)
    if cuda:
        update_summary(RESULTS / "summary.json", {"fid_roofline_dit": {
            k: result[k] for k in ("card", "date", "command", "preset", "batch_size", "fid_seconds", "rel_error",
                                   "matmul_floor_ms_per_forward", "matmul_floor_fp8_ms_per_forward",
                                   "measured_bf16_matmul_tflops") if k in result}})
    print({k: round(v, 1) for k, v in result["fid_seconds"].items()}, "seconds per FID", flush=True)


def record(result: dict[str, Any], name: str, timing: dict[str, Any], key: str = "block") -> None:
    result[key][name] = timing
    print(f"{key} {name:>14} {timing['shape']}: {timing['ms']:.3f} ms, {timing['tflops']:.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
