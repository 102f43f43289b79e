"""Training throughput of DiT at realistic size: the Trainer with SpeeD and EMA against a plain loop and
against the official DiT training step (BENCHMARKS.md, section 5).

Per DiT preset, on one GPU, random 4x32x32 latents held on the GPU (gathered by random indices from a
device-resident pool, as from a latent cache), batch 256, bf16, learned sigma (hybrid loss):
  plain     hand-written loop: GaussianDiffusion(learn_sigma=True).training_losses compiled together with
            the backbone (as DiffusionModule compiles them), bf16 autocast, fused AdamW lr 1e-4, no EMA
  trainer   DiffusionModule(learn_sigma=True, compile_mode) under pl.Trainer(bf16-mixed) with SpeeD() and
            our EMAWeightAveraging(decay=0.9999)
  official  facebookresearch/DiT's step: its models.py and diffusion/ from --official-dir (not part of this
            repository; they need timm), class labels in [0, 1000) as its train.py draws them,
            create_diffusion(timestep_respacing=""), bf16 autocast, AdamW lr 1e-4 wd 0, its per-parameter
            EMA update, eager as its train.py runs; skipped with a note when the folder or timm is missing
Also: FLOPs per training image (forward + backward of the backbone), the achieved fraction of the card's
measured bf16 matmul rate, the ratios trainer/plain and trainer/official, peak memory per row.

How the rows are interleaved. All three rows live in one process. The plain and official rows are step
closures, built and warmed up (compiled) first. The Trainer row is one ``trainer.fit`` with a callback
(TrainerWindows, benchmarks/windows.py, shared with throughput.py and latent_throughput.py) that drives the whole measurement from inside the fit: after the Trainer's own warm-up it
runs the schedule plain, trainer, official, plain, trainer, ... (``--repeats`` times), timing the plain
and official windows as plain loops called from the hook, and the Trainer's windows as its own consecutive
training iterations (hook to hook, so each counts whole loop iterations: data, step, callbacks). Every
window synchronises the GPU at both ends and lasts at least ``--window`` seconds. Nothing is rebuilt or
refit between windows, so every row keeps its compiled code, optimizer state and EMA throughout.
Peak memory of a row = its resident state (weights, optimizer, EMA, measured once warm) + the most its
steps allocated on top during its windows; the process holds all three rows' resident state at once.
The official eager step needs far more activation memory than the compiled rows; if it runs out of memory
next to them, it is measured alone after them (--repeats windows, back to back) and the notes say so.

On an H200 (about 7 to 9 minutes for both presets, mostly compilation; or one preset per run, the second
with --merge, about 3 and 4.5 minutes):
    PYTHONPATH=.ext/timmlib python -m benchmarks.dit_throughput --preset DiT-B/2 DiT-XL/2 --batch 256 \\
        --window 10 --repeats 3 --compile-mode default --official-dir .ext
(.ext holds DiT's models.py and diffusion/; timm installed there by pip install --no-deps --target .ext/timmlib timm)
    python -m benchmarks.dit_throughput --smoke --out /tmp/dit.json   # a tiny DiT on the CPU (tests)
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.common import RESULTS, device_name, measured_bf16_matmul_tflops, today, update_summary, write_json
from benchmarks.throughput import flops_per_image
from benchmarks.windows import Row, Step, TrainerWindows, settled, timed_window, warm, windowed_trainer
from lightning_speed import DiffusionModule
from lightning_speed.backbones import DIT_PRESETS, DiT
from lightning_speed.callbacks import EMAWeightAveraging, SpeeD
from lightning_speed.module import uses_cuda_graphs
from lightning_speed.process import GaussianDiffusion
from lightning_speed.schedules import NoiseSchedule

ROWS = ("plain", "trainer", "official")
SMOKE_DIT = {"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2}  # on 4x8x8 latents


def plain_step(backbone: torch.nn.Module, draw: Callable[[], torch.Tensor], compile_mode: str | None, bf16: bool) -> Step:
    device = next(backbone.parameters()).device
    diffusion = GaussianDiffusion(NoiseSchedule.from_name("linear", 1000), learn_sigma=True).to(device)

    def losses(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> Any:
        return diffusion.training_losses(lambda x, tt: backbone(x, tt), x0, t, noise)

    compiled = torch.compile(losses, mode=compile_mode) if compile_mode else losses
    graphs = uses_cuda_graphs(compile_mode)
    opt = torch.optim.AdamW(backbone.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        x0 = draw()
        t = torch.randint(0, 1000, (x0.shape[0],), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            mse, vlb = compiled(x0, t, torch.randn_like(x0))
        (mse + vlb).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def load_official(folder: Path) -> tuple[Any, Any] | str:
    """DiT's ``models`` module and ``create_diffusion``, imported by path, or why they cannot be."""
    if not (folder / "models.py").is_file() or not (folder / "diffusion" / "__init__.py").is_file():
        return f"skipped: {folder} does not hold DiT's models.py and diffusion/ (facebookresearch/DiT)"
    if importlib.util.find_spec("timm") is None:
        return "skipped: the official DiT code needs timm (pip install timm)"
    modules = []
    for name, path in (("dit_official_models", folder / "models.py"),
                       ("dit_official_diffusion", folder / "diffusion" / "__init__.py")):
        package = [str(path.parent)] if path.name == "__init__.py" else None
        spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=package)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1].create_diffusion


def official_step(official: tuple[Any, Any], preset: str, size: int, smoke: bool, draw: Callable[[], torch.Tensor],
                  device: torch.device, bf16: bool, decay: float = 0.9999) -> Step:
    models, create_diffusion = official
    torch.manual_seed(0)
    model = models.DiT(input_size=size, **SMOKE_DIT) if smoke else models.DiT_models[preset](input_size=size)
    model = model.to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    diffusion = create_diffusion(timestep_respacing="")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)

    def step() -> None:
        x = draw()
        y = torch.randint(0, 1000, (x.shape[0],), device=device)
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for ema_p, p in zip(ema.parameters(), model.parameters()):
                ema_p.mul_(decay).add_(p, alpha=1 - decay)

    return step


class EndlessLatents:
    """Device-resident batches for the Trainer, with no host-to-device copy per step."""

    def __init__(self, draw: Callable[[], torch.Tensor]) -> None:
        self.draw = draw

    def __iter__(self) -> Any:
        while True:
            yield self.draw()


def measure_preset(preset: str, args: argparse.Namespace, device: torch.device, official: Any) -> dict[str, Any]:
    smoke, cuda = args.smoke, device.type == "cuda"
    size, mode = (8, None) if smoke else (32, args.compile_mode)
    mode = None if mode == "none" else mode
    warmup, min_steps = (1, 2) if smoke else (args.warmup, 3)

    def dit() -> torch.nn.Module:
        torch.manual_seed(0)
        return DiT(preset=preset, in_channels=4, image_size=size, learn_sigma=True, **(SMOKE_DIT if smoke else {}))

    out: dict[str, Any] = {"flops_per_image": flops_per_image(dit().to(device), device, 16, (4, size, size)), "notes": []}
    pool = torch.randn(4 * args.batch if smoke else 10_000, 4, size, size, device=device)
    draw = lambda: pool[torch.randint(0, pool.shape[0], (args.batch,), device=device)]  # noqa: E731
    rows: dict[str, Row] = {}
    out["rows"] = {}

    def free() -> None:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    def add_official(alone: bool) -> None:  # build and warm it; a note instead when it does not fit
        try:
            before = settled(device)
            rows["official"] = warm(official_step(official, preset, size, smoke, draw, device, cuda), warmup, device, before)
        except torch.cuda.OutOfMemoryError as err:
            out["notes"].append(f"official: out of memory {'alone' if alone else 'next to the other rows'}: {str(err)[:200]}")
        if "official" not in rows:
            free()  # after the except clause, which holds the failed step's frames and tensors

    def report(name: str) -> None:  # a row's windows -> out["rows"][name]
        row = rows.pop(name)
        out["rows"][name] = row.spread()
        if cuda:
            out["rows"][name]["peak_memory_gib"] = row.peak_memory_gib()
            out["rows"][name]["fraction_of_bf16_rate"] = out["flops_per_image"] * out["rows"][name]["images_per_s"] / 1e12 / args.tflops

    rows["plain"] = warm(plain_step(dit().to(device), draw, mode, cuda), warmup, device, settled(device))
    if isinstance(official, str):
        out["notes"].append(f"official: {official}")
    else:
        add_official(alone=False)
    rows["trainer"] = Row()
    schedule = [r for _ in range(args.repeats) for r in ROWS if r in rows]

    def between() -> Row | None:  # run the schedule up to the Trainer's next window; None when it is done
        while schedule:
            name = schedule.pop(0)
            if name == "trainer":
                return rows["trainer"]
            try:
                timed_window(rows[name], args.batch, args.window, min_steps, device)
            except torch.cuda.OutOfMemoryError as err:  # the official eager step may not fit next to the others
                schedule[:] = [r for r in schedule if r != name]
                del rows[name]
                out["notes"].append(f"{name}: out of memory next to the other rows: {str(err)[:200]}")
            if name not in rows:
                free()  # only then: emptying the cache would make the next window allocate afresh
        return None

    module = DiffusionModule(dit(), learn_sigma=True, compile_mode=mode, image_shape=(4, size, size))
    windows = TrainerWindows(between, args.batch, warmup, args.window, min_steps, settled(device))
    trainer = windowed_trainer(cuda, [SpeeD(), EMAWeightAveraging(decay=0.9999), windows])
    trainer.fit(module, train_dataloaders=EndlessLatents(draw))
    if schedule or len(rows["trainer"].images_per_s) != args.repeats:
        raise RuntimeError(f"{preset}: the Trainer stopped before the measurement schedule ended ({schedule} left).")
    for name in list(rows):
        report(name)
    del trainer, module, windows
    torch._dynamo.reset()  # compiled code of this preset; frees what it held
    free()
    if not isinstance(official, str) and "official" not in out["rows"]:  # measured alone, not interleaved
        out["notes"].append("official: measured alone after the other rows, not interleaved")
        add_official(alone=True)
        for _ in range(args.repeats if "official" in rows else 0):
            timed_window(rows["official"], args.batch, args.window, min_steps, device)
        if "official" in rows:
            report("official")
    for other in ("plain", "official"):
        if other in out["rows"]:
            out[f"trainer_over_{other}"] = out["rows"]["trainer"]["images_per_s"] / out["rows"][other]["images_per_s"]
    return out


def main() -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", dest="presets", nargs="+", default=None, choices=list(DIT_PRESETS),
                   help="DiT presets (default: DiT-B/2 DiT-XL/2)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 256; 4 with --smoke)")
    p.add_argument("--window", type=float, default=10.0, help="seconds per timed window (at least)")
    p.add_argument("--repeats", type=int, default=None, help="windows per row, rows interleaved (default 3; 1 with --smoke)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per row (compilation)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "none"])
    p.add_argument("--official-dir", type=Path, default=Path(".ext"), help="folder with DiT's models.py and diffusion/")
    p.add_argument("--out", type=Path, default=RESULTS / "dit_throughput.json")
    p.add_argument("--merge", action="store_true", help="keep the presets already in --out (same card, batch, mode)")
    p.add_argument("--smoke", action="store_true", help="tiny DiT on 4x8x8, CPU, 1 repeat, short windows (tests)")
    args = p.parse_args()
    if min(n for n in (args.batch, args.repeats, args.warmup) if n is not None) < 1 or args.window < 0:
        p.error("--batch, --repeats and --warmup must be at least 1, --window at least 0")
    # before the first CUDA allocation: the three rows share the memory (other scripts importing this keep theirs)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.smoke:
        args.presets, args.window, args.repeats = args.presets or ["DiT-S/2"], min(args.window, 0.05), args.repeats or 1
    args.presets, args.batch = args.presets or ["DiT-B/2", "DiT-XL/2"], args.batch or (4 if args.smoke else 256)
    args.repeats = args.repeats or 3
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32, as the paper's runs
    args.tflops = measured_bf16_matmul_tflops() if cuda else None
    setup = {"card": device_name(), "batch": args.batch, "compile_mode": args.compile_mode, "smoke": args.smoke}
    result: dict[str, Any] = {**setup, "date": today(), "torch": torch.__version__, "window_s": args.window,
                              "repeats": args.repeats, "bf16_matmul_tflops": args.tflops, "presets": {},
                              "command": " ".join(["python -m benchmarks.dit_throughput", *sys.argv[1:]])}
    if args.merge and args.out.exists():
        earlier = json.loads(args.out.read_text())
        if any(earlier.get(k) != v for k, v in setup.items()):
            raise SystemExit(f"--merge: {args.out} was measured with another card, batch or compile mode; choose another --out")
        result["presets"] = {k: v for k, v in earlier["presets"].items() if k not in args.presets}
    official = load_official(args.official_dir)
    for preset in args.presets:
        result["presets"][preset] = {**measure_preset(preset, args, device, official), "command": result["command"]}
        print(preset, json.dumps(result["presets"][preset], indent=1), flush=True)
        write_json(args.out, result)  # after every preset, so a cut-off run keeps what it measured
    complete = all(set(r["rows"]) == set(ROWS) for r in result["presets"].values())
    if cuda and complete:
        update_summary(RESULTS / "summary.json", {"throughput_dit": {
            "card": result["card"], "date": result["date"], "command": result["command"], "batch": args.batch,
            "presets": {name: {
                "images_per_s": {k: v["images_per_s"] for k, v in r["rows"].items()},
                "spread": {k: [v["min"], v["max"]] for k, v in r["rows"].items()},
                "fraction_of_bf16_rate": {k: v["fraction_of_bf16_rate"] for k, v in r["rows"].items()},
                "trainer_over_plain": r["trainer_over_plain"], "trainer_over_official": r["trainer_over_official"],
            } for name, r in result["presets"].items()},
        }})
    return result


if __name__ == "__main__":
    main()
