"""CPU smoke tests of the benchmarks, the speed-up arithmetic on hand-made curves, and the committed
reports regenerated from their raw results.

The benchmarks run as a user runs them (``python -m benchmarks.x`` from the repository root), in
``--smoke`` mode, writing only under temporary folders: never into benchmarks/results/. Each script's
smoke run happens once per test module (a module-scoped fixture) and several tests check its output:
every process imports torch and Lightning, seconds each on the two-core CI machine. A script whose
entry point already runs as a process elsewhere (in another test here, or as the processes the command
itself starts) is called through its main() in this process (``run_main``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import math
import os
import re
import statistics
import subprocess
import sys
import time
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.convergence import launch, report, stats
from benchmarks.convergence.runs import RUNS
from benchmarks.convergence.run import PartTimer
from benchmarks.step_profile import family

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not all(
        (FASHION_ROOT / f"{stem}.gz").is_file() or (FASHION_ROOT / stem).is_file()
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    ),
    reason=f"Fashion-MNIST is not installed in {FASHION_ROOT} (apt-get install -y dataset-fashion-mnist)",
)


def results_fingerprint() -> dict[str, str]:
    """Hash of every file under benchmarks/results/, to prove the smoke runs leave it alone."""
    return {
        str(p.relative_to(RESULTS)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(RESULTS.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HOME of every benchmark process here: FID reference statistics are cached under it, so they are
    computed once for the module, and the user's own cache is left alone."""
    return tmp_path_factory.mktemp("home")


def bench(module: str, args: list[str], home: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks.<module> ...`` from the repository root, as BENCHMARKS.md runs it."""
    env = {**os.environ, "HOME": str(home), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_script(module: str, args: list[str], home: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run a benchmark (smoke settings, output under a temporary folder) and check that it succeeded
    and left every committed file under benchmarks/results/ (summary.json included) as it was."""
    before = results_fingerprint()
    proc = bench(module, args, home, timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert results_fingerprint() == before, f"{args} changed files under {RESULTS}"
    return proc


def run_main(module: str, args: list[str], home: Path) -> None:
    """``python -m benchmarks.<module> ...`` through the script's main() in this process, with no torch start-up of
    its own. HOME (the FID statistics cache) and MPLBACKEND are set as bench sets them; the environment, the working
    directory, sys.argv, torch's random state and thread count are restored afterwards. Like run_script, it checks
    that every committed file under benchmarks/results/ was left as it was."""
    import importlib

    import torch

    script = importlib.import_module(f"benchmarks.{module}" + (".__main__" if module == "convergence" else ""))
    before, threads, environ = results_fingerprint(), torch.get_num_threads(), dict(os.environ)
    with pytest.MonkeyPatch.context() as patch, torch.random.fork_rng():
        patch.chdir(REPO)
        patch.setattr(sys, "argv", [f"python -m benchmarks.{module}", *args])
        os.environ.update(HOME=str(home), MPLBACKEND="Agg")
        try:
            script.main()
        finally:
            torch.set_num_threads(threads)
            os.environ.clear()
            os.environ.update(environ)
    assert results_fingerprint() == before, f"{args} changed files under {RESULTS}"


# ------------------------------------------------------------------------------ throughput.py
@pytest.fixture(scope="module")
def throughput(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Namespace:
    """Every row at batch 8 (the script as a user runs it), rows a, b, c in 2 interleaved repeats; then a
    copy of that file given rows a0 and a at batch 4 with --merge, by the same main() in this process (no
    second torch start-up)."""
    import torch

    from benchmarks import throughput as script

    folder = tmp_path_factory.mktemp("throughput")
    full, merged = folder / "t.json", folder / "merged.json"
    timing = ["--steps", "2", "--warmup", "1", "--repeats", "2"]
    run_script("throughput", ["--smoke", "--batch-sizes", "8", *timing, "--profile-steps", "2", "--out", str(full)], home)
    shutil.copyfile(full, merged)
    before, threads = results_fingerprint(), torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch, torch.random.fork_rng():
        patch.setattr(sys, "argv", ["throughput", "--smoke", "--rows", "a0", "a", "--batch-sizes", "4", "--merge",
                                    *timing, "--out", str(merged)])
        try:
            script.main()
        finally:
            torch.set_num_threads(threads)  # --smoke runs on one thread
    assert results_fingerprint() == before, f"the --merge run changed files under {RESULTS}"
    return Namespace(full=json.loads(full.read_text()), merged=json.loads(merged.read_text()), merged_file=merged)


@needs_fashion_mnist
def test_throughput_smoke_writes_rows_and_ratios(throughput: Namespace) -> None:
    result = throughput.full
    assert result["card"] == "cpu" and result["flops_per_image"] > 0
    row = result["rows"]["8"]
    for name in ("a0_naive_fp32", "a_plain_fast", "b_lightning", "c_lightning_speed", "d_speed_ema", "d_speed_ema_lightning"):
        assert "error" not in row[name], row[name]
        assert math.isfinite(row[name]["images_per_s"]) and row[name]["images_per_s"] > 0
    ratios = row["ratios"]
    assert set(ratios) == {"a_over_a0", "b_over_a", "c_over_b", "b_over_a0", "d_over_c", "d_over_d_lightning"}
    ips = {k: row[k]["images_per_s"] for k in ("a0_naive_fp32", "a_plain_fast", "b_lightning", "c_lightning_speed")}
    assert ratios["c_over_b"] == pytest.approx(ips["c_lightning_speed"] / ips["b_lightning"])
    assert ratios["b_over_a0"] == pytest.approx(ips["b_lightning"] / ips["a0_naive_fp32"])
    # a, b, c: 2 windows each, interleaved (b and c in one fit, the strategy swapped); the others alone
    for name in ("a0_naive_fp32", "a_plain_fast", "b_lightning", "c_lightning_speed", "d_speed_ema"):
        windows = row[name]["windows"]
        assert len(windows) == (2 if row[name]["interleaved"] else 1), name
        assert row[name]["min"] <= row[name]["images_per_s"] <= row[name]["max"], name
        assert row[name]["images_per_s"] == pytest.approx(statistics.median(windows)), name
    assert [n for n in row if isinstance(row[n], dict) and row[n].get("interleaved")] == [
        "a_plain_fast", "b_lightning", "c_lightning_speed"]
    assert row["b_lightning"]["strategy"] == "UniformSampling + ConstantWeighting"
    assert row["c_lightning_speed"]["strategy"] == "SpeeD"
    per_repeat = row["ratios_per_repeat"]
    assert set(per_repeat) == set(row["ratio_spread"]) == {"b_over_a", "c_over_b"}
    b, c = row["b_lightning"]["windows"], row["c_lightning_speed"]["windows"]
    assert per_repeat["c_over_b"] == pytest.approx([c[0] / b[0], c[1] / b[1]])
    assert row["ratio_spread"]["c_over_b"] == [min(per_repeat["c_over_b"]), max(per_repeat["c_over_b"])]
    # --profile-steps 2: rows a and b traced (on the CPU there are no kernels: all of the wall time is idle GPU time)
    profile = row["profile"]
    assert set(profile) == {"a_plain_fast", "b_lightning"}
    for summary in profile.values():
        assert summary["steps"] == 2 and summary["wall_ms_per_step"] > 0 and "table" not in summary
        assert summary["gpu_idle_ms_per_step"] == pytest.approx(summary["wall_ms_per_step"] - summary["gpu_busy_ms_per_step"])
        # the host probe: five untraced bursts of ten steps each, host time never above the wall time it is part of
        probes = summary["host_probe"]
        assert len(probes) == 5 and all(p["steps"] == 10 for p in probes)
        assert all(0 < p["host_ms_per_step"] <= p["wall_ms_per_step"] for p in probes)
        assert summary["host_ms_per_step"] == statistics.median(p["host_ms_per_step"] for p in probes)
        assert summary["aten_elementwise_launchers"] == []  # no kernels on the CPU (kernel_launchers: its own test)
        # cProfile of as many steps: own time per step, largest first, each function within its callees' total
        functions = summary["python_functions"]
        assert functions and [f["self_us"] for f in functions] == sorted((f["self_us"] for f in functions), reverse=True)
        assert all(0 <= f["self_us"] <= f["total_us"] + 1e-6 and f["calls"] > 0 for f in functions)
    # only row b runs Lightning's loop, so only its ranking can name Lightning's code
    assert not any("lightning" in f["function"] for f in profile["a_plain_fast"]["python_functions"])


@needs_fashion_mnist
def test_throughput_rows_option_measures_only_those_rows(throughput: Namespace) -> None:
    row = throughput.merged["rows"]["4"]
    assert set(row) == {"a0_naive_fp32", "a_plain_fast", "ratios", "ratios_per_repeat", "ratio_spread"}
    assert set(row["ratios"]) == {"a_over_a0"} and row["ratios_per_repeat"] == {}
    assert len(row["a_plain_fast"]["windows"]) == 2  # row a alone: its windows back to back
    assert row["ratios"]["a_over_a0"] == pytest.approx(row["a_plain_fast"]["images_per_s"] / row["a0_naive_fp32"]["images_per_s"])


@needs_fashion_mnist
def test_throughput_merge_keeps_other_batch_sizes_and_refuses_a_different_setup(
    throughput: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    merged = throughput.merged
    assert set(merged["rows"]) == {"8", "4"} and merged["rows"]["8"] == throughput.full["rows"]["8"]
    assert merged["channels_last"] is True and merged["merged_from"] == {"8": throughput.full["date"]}
    # The refusal comes before any measurement: in this process, not another torch start-up.
    from benchmarks import throughput as script

    before = throughput.merged_file.read_bytes()
    monkeypatch.setattr(sys, "argv", ["throughput", "--smoke", "--rows", "a0", "--batch-sizes", "4", "--merge",
                                      "--no-channels-last", "--out", str(throughput.merged_file)])
    with pytest.raises(SystemExit, match=r"channels_last=True.*--out"):
        script.main()
    monkeypatch.setattr(sys, "argv", ["throughput", "--smoke", "--rows", "a0", "--batch-sizes", "4", "--merge",
                                      "--repeats", "3", "--out", str(throughput.merged_file)])
    with pytest.raises(SystemExit, match=r"repeats=2.*--out"):
        script.main()
    assert throughput.merged_file.read_bytes() == before


# ------------------------------------------------------------------------------ step_profile.py
def test_step_profile_smoke_times_every_variant_and_breaks_the_step_down(tmp_path: Path, home: Path) -> None:
    out = tmp_path / "sp.json"
    run_script("step_profile", ["--smoke", "--batch-sizes", "8", "--steps", "2", "--warmup", "1",
                "--profile-steps", "2", "--profile-variant", "channels_last", "--out", str(out)], home)
    result = json.loads(out.read_text())
    assert result["breakdown"]["variant"] == "channels_last"
    speeds = result["images_per_s"]["8"]
    assert set(speeds) == {"base", "cudnn_benchmark", "channels_last", "both"} and "errors" not in result
    assert all(math.isfinite(v) and v > 0 for v in speeds.values())
    trace = result["breakdown"]
    # The tiny UNet is mostly convolutions, and has attention in its middle block.
    assert trace["ms_per_step"]["convolution"] > 0 and trace["ms_per_step"]["attention"] > 0
    assert sum(trace["fraction"].values()) == pytest.approx(1.0)
    assert trace["busy_ms_per_step"] == pytest.approx(sum(trace["ms_per_step"].values()))


def test_step_profile_families_of_real_kernel_names() -> None:
    assert family("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw") == "convolution"
    assert family("cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>") == "layout_conversion"
    assert family("nvjet_tst_64x8_64x16_2x1_v_bz_TNT") == "matmul"
    assert family("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == "attention"
    assert family("triton_red_fused_native_group_norm_silu_12") == "fused_triton"
    assert family("triton_poi_fused_add_convolution_3") == "fused_triton"
    assert family("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    assert family("aten::convolution_backward") == "convolution" and family("aten::addmm") == "matmul"
    assert family("Memset (Device)") == "other"


# ------------------------------------------------------------------------------ fid_speed.py
@needs_fashion_mnist
def test_fid_speed_smoke_times_each_count(tmp_path: Path, home: Path) -> None:
    out = tmp_path / "fid.json"
    run_script("fid_speed", ["--smoke", "--variants", "eager", "--counts", "8", "16", "--steps", "2",
                "--batch-size", "8", "--out", str(out)], home)
    result = json.loads(out.read_text())["eager"]
    assert set(result["seconds"]) == {"8", "16"} and all(s > 0 for s in result["seconds"].values())
    assert result["samples_per_s"]["16"] == pytest.approx(16 / result["seconds"]["16"])
    assert (result["model"], result["solver"]) == ("unet", "ddim-2")


@needs_fashion_mnist
def test_fid_speed_smoke_times_the_dit_recipes_iddpm_sampling(tmp_path: Path, home: Path) -> None:
    """In this process: the test above runs the script as a process."""
    out = tmp_path / "fid_dit.json"
    run_main("fid_speed", ["--smoke", "--model", "dit", "--solver", "ddpm", "--variants", "eager", "--counts", "8",
                           "--steps", "3", "--batch-size", "8", "--out", str(out)], home)
    result = json.loads(out.read_text())["eager"]
    assert (result["model"], result["solver"]) == ("dit", "ddpm-3") and result["seconds"]["8"] > 0


def cpu_rowwise_fp8() -> bool:
    """Whether this torch's CPU ``torch._scaled_mm`` takes rowwise scales (torch 2.11's takes only per-tensor ones)."""
    import torch

    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


needs_cpu_rowwise_fp8 = pytest.mark.skipif("not cpu_rowwise_fp8()", reason="this torch's CPU _scaled_mm has no rowwise scales")


@needs_cpu_rowwise_fp8
def test_dit_roofline_smoke_sums_the_blocks_matmuls_into_seconds_per_fid(tmp_path: Path, home: Path) -> None:
    out = tmp_path / "roofline.json"
    run_script("dit_roofline", ["--smoke", "--batch-size", "4", "--samples", "10", "--solver-steps", "3", "--iters", "2",
                                "--repeats", "2", "--profile", "--out", str(out)], home)
    result = json.loads(out.read_text())
    block = result["block"]
    assert set(block) == {"qkv", "attention_out", "mlp_in", "mlp_out", "attention"} and result["complete"]
    assert block["qkv"]["shape"] == [4 * 256, 32, 96] and block["mlp_out"]["shape"] == [4 * 256, 128, 32]
    assert all(v["min"] <= v["ms"] <= v["max"] for v in block.values())
    calls = 3 * 3  # ceil(10 / 4) batches of 3 solver steps
    assert result["backbone_calls_per_fid"] == calls
    # the smoke DiT has one block: the floor is the sum of its timings, and seconds per FID scale it by the calls
    assert result["matmul_floor_ms_per_forward"] == pytest.approx(sum(v["ms"] for v in block.values()))
    assert result["fid_seconds"]["matmul_floor"] == pytest.approx(result["matmul_floor_ms_per_forward"] * calls / 1e3)
    assert result["fid_seconds"]["eager"] == pytest.approx(result["forward_ms"]["eager"]["ms"] * calls / 1e3)
    # --profile traces each timed forward: on the CPU no kernels, and the table ranks the forward's operators
    assert set(result["profile"]) == {"eager"} and result["profile"]["eager"]["kernels_per_step"] == 0
    assert "aten::linear" in result["profile"]["eager"]["table"]
    # every precision is compared with the fp32 forward: autocast on the CPU is fp32 itself, bf16 and fp8 are not
    errors = result["rel_error"]
    assert set(errors) == {"autocast", "autocast-unfused", "bf16", "bf16-unfused", "fp8", "fp8-tensor"}
    assert errors["autocast"] == errors["autocast-unfused"] == 0.0
    assert 2.0**-12 < errors["bf16"] < 2.0**-4 and errors["bf16"] < min(errors["fp8"], errors["fp8-tensor"])
    assert errors["bf16-unfused"] == errors["bf16"]  # the GELU epilogue is for CUDA: on the CPU both run the same ops
    assert max(errors["fp8"], errors["fp8-tensor"]) < 0.5
    # The refusal comes before any work: in this process, not another torch start-up.
    with pytest.raises(SystemExit, match="--batch-size, --samples, --solver-steps, --iters and --repeats must be at least 1"):
        run_main("dit_roofline", ["--smoke", "--batch-size", "0", "--out", str(tmp_path / "bad.json")], home)
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize("scales", [pytest.param("row", marks=needs_cpu_rowwise_fp8), "tensor"])
def test_fp8_linear_stays_within_the_rounding_bound_of_e4m3_operands_and_a_bf16_result(scales: str) -> None:
    """Fp8Linear against the exact product: each operand is rounded to e4m3 after scaling the largest magnitude of its
    row (``row``) or of the whole operand (``tensor``, the input's from calibration) to 448, so |x_hat - x| <=
    2^-4 |x| (3 mantissa bits, round to nearest) + 2^-10 / scale (e4m3's subnormal spacing 2^-9, halved); the bias is
    rounded to bf16 (2^-8 |b|), the fp32 accumulation adds at most K 2^-24 sum|x_hat||w_hat| and the bf16 result 2^-8
    of itself. The error must stay within the sum of those terms, and use a fair part of it (a bound never approached
    would not catch a wrong scale)."""
    import torch

    from benchmarks.dit_roofline import Fp8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = (torch.randn(200, 64) * torch.logspace(-3, 1, 200)[:, None]).to(torch.bfloat16)  # rows from 1e-3 to 10
    got = Fp8Linear(linear, input_amax=None if scales == "row" else float(x.abs().max()))(x).double()
    xd, w, b = x.double(), linear.weight.detach().double(), linear.bias.detach().double()
    exact = xd @ w.T + b

    def operand_error(v: torch.Tensor) -> torch.Tensor:
        scale = 448.0 / (v.abs().amax(dim=1, keepdim=True) if scales == "row" else v.abs().amax())
        return 2.0**-4 * v.abs() + 2.0**-10 / scale

    ex, ew = operand_error(xd), operand_error(w)
    bound = (ex @ w.abs().T + xd.abs() @ ew.T + ex @ ew.T + 2.0**-8 * b.abs() + 2.0**-8 * got.abs()
             + 64 * 2.0**-24 * (xd.abs() + ex) @ (w.abs() + ew).T)
    error = (got - exact).abs()
    assert bool((error <= bound).all()), f"worst error / bound {float((error / bound).max()):.3f}"
    assert float((error / bound).max()) > 0.05
    # relative to the output, the error is e4m3's: a few percent, not bf16's fraction of a percent
    rel = float((got - exact).norm() / exact.norm())
    assert 2.0**-8 < rel < 2.0**-3
    # and unbiased: rounding to nearest errs both ways, so got ~ slope * exact with slope 1. The worst-case bound
    # above would still hold for a scale off by a few percent; the slope would not. Its standard error is at most
    # rel / sqrt(200 rows) ~ 0.0025 (errors shared within a row), so 0.01 is 4 of them, and a 5 % scale error fails.
    slope = float((got * exact).sum() / (exact * exact).sum())
    assert abs(slope - 1) < 0.01


def test_fp8_tensor_clamps_inputs_beyond_the_calibrated_range_and_its_forward_needs_a_calibration() -> None:
    """With per-tensor scales an input above the calibrated maximum is clamped to it, so the product is that of the
    clamped input (to e4m3's rounding, which is exact for the clamped value 448 itself); the calibration records each
    block linear's largest input, and fp8-tensor without a calibration batch is refused."""
    import torch

    from benchmarks.dit_roofline import Fp8Linear, block_linears, input_amax, low_precision_forward
    from lightning_speed.backbones import DiT

    linear = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(3, 4))  # picks the first three inputs, exactly representable in e4m3
    x = torch.tensor([[1.0, -2.0, 8.0, 0.0]], dtype=torch.bfloat16)
    out = Fp8Linear(linear, input_amax=2.0)(x).float()
    assert out.tolist() == [[1.0, -2.0, 2.0]]  # 8 clamped to the calibrated 2
    assert Fp8Linear(linear, input_amax=8.0)(x).float().tolist() == [[1.0, -2.0, 8.0]]

    torch.manual_seed(0)
    dit = DiT(in_channels=1, image_size=8, patch_size=2, depth=2, hidden_size=16, num_heads=2, learn_sigma=True)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])
    seen = input_amax(dit, x, t)
    assert len(seen) == len(block_linears(dit)) == 2 * 4
    first_qkv_input = []
    hook = dit.blocks[0].attn.qkv.register_forward_hook(lambda m, args, out: first_qkv_input.append(args[0]))
    with torch.no_grad():
        dit(x, t)
    hook.remove()
    assert seen[0] == pytest.approx(float(first_qkv_input[0].abs().max()))
    with pytest.raises(ValueError, match="fp8-tensor needs a calibration batch"):
        low_precision_forward(dit, "fp8-tensor")


def test_kernel_time_is_the_union_of_the_kernels_intervals() -> None:
    from benchmarks.profiling import _union_ms

    # microseconds in, milliseconds out: overlaps count once, gaps not at all, order does not matter
    assert _union_ms([(20, 30), (0, 10), (5, 15)]) == pytest.approx(0.025)
    assert _union_ms([(0, 100), (10, 20), (30, 40)]) == pytest.approx(0.1)  # nested intervals
    assert _union_ms([]) == 0.0


def test_kernel_launchers_name_the_host_operator_and_its_enclosing_events() -> None:
    from benchmarks.profiling import ATEN_ELEMENTWISE, kernel_launchers

    copy = "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl<...>>(int, T)"

    def op(name: str, ts: float, dur: float, ext: int, tid: int = 1, dims: list | None = None) -> dict:
        args = {"External id": ext, "Input Dims": dims or [], "Input Strides": [], "Input type": []}
        return {"ph": "X", "cat": "cpu_op", "name": name, "pid": 0, "tid": tid, "ts": ts, "dur": dur, "args": args}

    def kernel(name: str, ext: int, dur: float) -> dict:
        return {"ph": "X", "cat": "kernel", "name": name, "pid": 1, "tid": 7, "ts": 0, "dur": dur,
                "args": {"External id": ext}}

    events = [
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#3", "pid": 0, "tid": 2, "ts": 0, "dur": 1000,
         "args": {}},
        # the backward thread: an AccumulateGrad copy, twice (two steps), each launching two copy kernels of 10 us
        op("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", 100, 50, 1, tid=2),
        op("aten::copy_", 110, 20, 2, tid=2, dims=[[64, 3, 3, 3], [64, 3, 3, 3]]),
        op("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", 300, 50, 3, tid=2),
        op("aten::copy_", 310, 20, 4, tid=2, dims=[[64, 3, 3, 3], [64, 3, 3, 3]]),
        # the main thread: a graph call whose replay runs a copy kernel of 100 us and a Triton kernel (not matched),
        # and a sibling operator that ends before it (so it is no context of the graph call's kernels)
        op("aten::randn", 0, 5, 5), op("## Call CompiledFxGraph abc", 10, 500, 6),
        kernel(copy, 2, 10), kernel(copy, 2, 10), kernel(copy, 4, 10), kernel(copy, 4, 10),
        kernel(copy, 6, 100), kernel("triton_poi_fused_add_0", 6, 300), kernel("triton_poi_fused_add_0", 5, 300),
    ]
    rows = kernel_launchers(events, ATEN_ELEMENTWISE, steps=2)
    assert [(r["op"], r["context"], r["kernels"], r["ms"]) for r in rows] == [
        ("## Call CompiledFxGraph abc", "", 0.5, pytest.approx(0.05)),
        ("aten::copy_", "autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", 2.0, pytest.approx(0.02)),
    ]
    assert rows[1]["input_dims"] == [[64, 3, 3, 3], [64, 3, 3, 3]] and rows[1]["input_types"] == []
    assert kernel_launchers(events, "no such kernel", steps=2) == []
    assert len(kernel_launchers(events, ATEN_ELEMENTWISE, steps=2, top=1)) == 1


def test_peak_memory_is_none_when_the_accounting_is_inconsistent() -> None:
    from benchmarks.windows import Row

    assert Row(resident=2**30, transient=[0, 2**29]).peak_memory_gib() == 1.5
    assert Row(resident=-50 * 2**20, transient=[0]).peak_memory_gib() is None  # freed more than it held: no size
    assert Row(resident=2**20, transient=[-2**21]).peak_memory_gib() is None


# ----------------------------------------------------------------------------- convergence
@pytest.fixture(scope="module")
def convergence(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Namespace:
    """Two launches into one folder. The first trains uniform and SpeeD (seed 0) to 4 steps within a time
    limit. The second, without one, asks for uniform at 4 (finished: not started again), SpeeD at 6 (resumed
    from its checkpoint), and two ablations with their own step count, each a composition of config files:
    SpeeD's sampling without its loss weighting, and uniform t on the cosine schedule. FID every 2 steps,
    16 samples, the base config's solver (DDIM) at 4 steps instead of 50 to keep the CPU time small."""
    out = tmp_path_factory.mktemp("conv")
    common = ["--smoke", "--seeds", "0", "--eval-every", "2", "--fid-samples", "16", "--fid-steps", "4",
              "--per-gpu", "3", "--out", str(out)]  # fmt: skip

    def results() -> dict[str, dict]:
        return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/result.json")}

    first_launch = run_script("convergence", ["launch", "--strategies", "uniform", "speed", "--steps", "4",
                                              "--time-limit", "400", *common], home, 400)
    first, first_speedups = results(), json.loads((out / "speedups.json").read_text())
    second_launch = run_script("convergence", ["launch", "--jobs", "uniform:0:4", "speed:0:6", "speed_sampling_only:0:2",
                                               "uniform_cosine:0:2", "--steps", "4", "--final-samples", "8",
                                               "--final-solvers", "ddpm-250", "--final-strategies", "speed", *common],
                             home, 400)
    return Namespace(out=out, first=first, first_speedups=first_speedups, first_stdout=first_launch.stdout,
                     second=results(), second_stdout=second_launch.stdout,
                     speedups=json.loads((out / "speedups.json").read_text()),
                     logs={p.stem: p.read_text() for p in (out / "logs").glob("*.log")})


@needs_fashion_mnist
def test_convergence_smoke_launch(convergence: Namespace) -> None:
    assert set(convergence.first) == {"uniform_s0", "speed_s0"} and convergence.first_stdout.count("started ") == 2
    # With --time-limit each run gets what is left of it; without, none (the second launch): runs train to N.
    assert convergence.first_stdout.count(" s left)") == 2 and "no time limit" not in convergence.first_stdout
    assert convergence.second_stdout.count("(no time limit)") == 3 and " s left)" not in convergence.second_stdout
    for strategy in ("uniform", "speed"):
        result = convergence.first[f"{strategy}_s0"]
        assert result["strategy"] == strategy and result["steps_done"] == 4 and result["fid_samples"] == 16
        assert [step for step, _ in result["fid_history"]] == [2, 4]
        assert all(math.isfinite(fid) and fid > 0 for _, fid in result["fid_history"])
        assert result["fid_solver"] == "ddim-4"  # the base config's solver, at --fid-steps
        assert (convergence.out / f"{strategy}_s0" / "last.ckpt").is_file()
    speedups = convergence.first_speedups
    assert speedups["budgets"]["speed"] == {"N": 4, "N_half": 2}
    assert speedups["N"]["speed"]["steps"] == 4 and speedups["N_half"]["speed"]["steps"] == 2
    assert set(speedups["tables"]) == {"2", "4"}



@needs_fashion_mnist
def test_a_screen_runs_on_a_base_of_ones_own_outside_configs(tmp_path: Path, home: Path) -> None:
    """docs/benchmarking.md's recipe for screening strategies on one's own model: --base takes a config's path; its
    runs, report and summary keys (named after the file) follow."""
    base = tmp_path / "my_base.yaml"
    shutil.copyfile(REPO / "configs" / "fashion_mnist.yaml", base)
    out, summary = tmp_path / "mine", tmp_path / "summary.json"
    common = ["--smoke", "--base", str(base), "--eval-every", "2", "--fid-samples", "16", "--fid-steps", "4",
              "--per-gpu", "2", "--out", str(out)]
    run_script("convergence", ["launch", "--jobs", "uniform:0:4", *common], home, 400)
    run_script("convergence", ["launch", "--jobs", "speed:0:4", "--stop-at", "2", *common], home, 400)
    result = json.loads((out / "speed_s0" / "result.json").read_text())
    assert result["configs"] == [str(base), "strategies/speed.yaml"] and result["steps_done"] == 2
    screened = json.loads((out / "speedups.json").read_text())["screen"]["speed"]
    assert screened["step"] == 2 and len(screened["equivalent_per_seed"]) == 1
    run_script("convergence", ["report", "--no-plots", "--out", str(out), "--summary-file", str(summary)], home)
    # keys named after the file (and the smoke's DDIM-4 curve, not the protocol's DDIM-50)
    assert set(json.loads(summary.read_text())) == {"speedup_my_base_ddim4", "speedup_my_base_half_ddim4"}
    # its budget form: a run trained to the end of a schedule of half uniform's steps, in a folder of its own (the
    # screened run's record, read as the whole of a 2-step schedule: launching one is tested above)
    budget = ["--out", str(tmp_path / "mine_budget"), "--no-summary", "--no-plots"]
    (tmp_path / "mine_budget" / "speed_onecycle_s0").mkdir(parents=True)
    record = {**result, "strategy": "speed_onecycle", "stop_at": None, "steps_target": 2,
              "configs": [*result["configs"], "study/onecycle_lr.yaml"]}
    (tmp_path / "mine_budget" / "speed_onecycle_s0" / "result.json").write_text(json.dumps(record))
    run_script("convergence", ["report", "--base", str(base), "--include", str(out), "--budget", *budget], home)
    screened = json.loads((tmp_path / "mine_budget" / "speedups.json").read_text())["screen"]["speed_onecycle"]
    assert screened["budget"] is True and screened["step"] == 2 and screened["baseline"] == "uniform"

@needs_fashion_mnist
def test_convergence_launch_skips_finished_runs_and_resumes_the_others(convergence: Namespace) -> None:
    # uniform already reached its 4 steps: not started again, its result untouched.
    assert "started uniform seed" not in convergence.second_stdout and "not started" not in convergence.second_stdout
    assert "Restoring states" not in convergence.logs["uniform_s0"]
    assert convergence.second["uniform_s0"] == convergence.first["uniform_s0"]
    # A larger N resumes the run from its checkpoint: the first 4 steps are not retrained or re-evaluated.
    result = convergence.second["speed_s0"]
    assert result["steps_done"] == 6
    assert result["fid_history"][:2] == convergence.first["speed_s0"]["fid_history"]  # restored, not duplicated
    assert [step for step, _ in result["fid_history"]] == [2, 4, 6]
    assert [(part["from_step"], part["to_step"]) for part in result["parts"]] == [(0, 4), (4, 6)]
    assert [part["fid_evaluations"] for part in result["parts"]] == [2, 1]  # each part's own
    assert convergence.logs["speed_s0"].count("Restoring states from the checkpoint") == 1  # the second launch only
    # The per-area summaries of both parts are kept (TimestepMonitor, every eval step here).
    assert [row["step"] for row in result["timestep_areas"]] == [2, 4, 6]
    assert convergence.second_stdout.count("started ") == 3  # speed and the two ablations
    # The launch's own throughput line: steps trained by this launch only (speed 4 -> 6, two ablations to 2)
    assert convergence.first_stdout.count("trained 8 steps in ") == 1
    assert convergence.second_stdout.count("trained 6 steps in ") == 1
    # The FID at N with more samples, by the chosen solver only, for the chosen strategies only.
    assert set(result["final"]) == {"ddpm-250", "ddpm-250_seconds"} and math.isfinite(result["final"]["ddpm-250"])
    assert "final" not in convergence.second["speed_sampling_only_s0"]
    assert result["fid_history"][-1][0] == 6  # the curve keeps its own sample count: the final FID is not on it


@needs_fashion_mnist
def test_convergence_ablations_and_report(convergence: Namespace) -> None:
    cosine = convergence.second["uniform_cosine_s0"]
    assert cosine["schedule"] == "cosine" and cosine["steps_done"] == 2
    assert cosine["configs"] == ["fashion_mnist.yaml", "strategies/uniform.yaml", "schedules/cosine.yaml"]
    ablation = convergence.second["speed_sampling_only_s0"]
    assert ablation["steps_done"] == 2 and ablation["configs"] == ["fashion_mnist.yaml", "ablations/speed_sampling_only.yaml"]
    assert ablation["fid_solver"] == "ddim-4"  # the base config's FID callback (solver), at --fid-steps
    weights = {k: v for k, v in ablation["timestep_areas"][0].items() if k.startswith("timesteps/weight/")}
    assert weights and all(v == pytest.approx(1.0) for v in weights.values())  # no change-aware weights
    speed_rows = convergence.second["speed_s0"]["timestep_areas"]
    assert speed_rows[0]["timesteps/weight/acceleration"] < 0.7  # SpeeD's weights: in [0.4, 0.6] below tau
    speedups = convergence.speedups
    assert speedups["budgets"]["speed_sampling_only"] == {"N": 2, "N_half": None}
    assert speedups["budgets"]["uniform_cosine"] == {"N": 2, "N_half": None}
    assert speedups["N"]["speed_sampling_only"]["steps"] == 2
    # SpeeD trained to 6, but its budget is the last step a uniform run also reached (4).
    assert speedups["budgets"]["speed"] == {"N": 4, "N_half": 2} and speedups["N"]["speed"]["steps"] == 4
    steps_done = {(r["strategy"], r["steps_done"]) for r in speedups["runs"]}
    assert steps_done == {("uniform", 4), ("speed", 6), ("speed_sampling_only", 2), ("uniform_cosine", 2)}
    out = convergence.out
    assert all((out / name).stat().st_size > 0 for name in ("fid_vs_step.png", "fid_vs_step_headline.png", "area_loss.png"))


def test_convergence_jobs_parse_and_reject_bad_ones() -> None:
    args = Namespace(jobs=["uniform:0", "speed_k2:1:5000"], steps=20000, seeds=[0], strategies=["uniform"])
    assert launch.jobs_of(args) == [("uniform", 0, 20000), ("speed_k2", 1, 5000)]
    # Without --jobs: every strategy of each seed in turn, at --steps (seed-major: the pairs finish first).
    args = Namespace(jobs=None, steps=4, seeds=[0, 1], strategies=["uniform", "speed"])
    assert launch.jobs_of(args) == [("uniform", 0, 4), ("speed", 0, 4), ("uniform", 1, 4), ("speed", 1, 4)]
    for bad in ("speed:x", "nope:0", "speed:0:1k", "speed:0:1:2"):
        with pytest.raises(SystemExit, match="strategy:seed"):
            launch.jobs_of(Namespace(jobs=[bad], steps=10, seeds=[0], strategies=["uniform"]))
    # one run listed twice would train as two processes in its one folder
    with pytest.raises(SystemExit, match=r"runs \['speed:0'\] are listed more than once"):
        launch.jobs_of(Namespace(jobs=["speed:0:4", "uniform:0", "speed:0:6"], steps=10, seeds=[0], strategies=[]))
    with pytest.raises(SystemExit, match=r"runs \['uniform:1'\] are listed more than once"):
        launch.jobs_of(Namespace(jobs=None, steps=10, seeds=[1, 1], strategies=["uniform"]))


def test_launch_runs_train_eager_when_it_is_asked_to(tmp_path: Path) -> None:
    """launch --eager reaches each run process: its config then compiles nothing."""
    from benchmarks.convergence.__main__ import parser
    from benchmarks.convergence.run import overrides

    forwarded = launch._forward(parser().parse_args(["launch", "--eager", "--jobs", "uniform:0:4"]))
    protocol = overrides(parser().parse_args(["run", "--strategy", "uniform", *forwarded]), tmp_path)
    assert protocol[protocol.index("--model.compile_mode") + 1] == "null"


def test_convergence_set_overrides_reach_the_composed_config(tmp_path: Path) -> None:
    """--set KEY=VALUE (an ablation) is forwarded by the launcher and lands in the run's composed config."""
    from benchmarks.convergence.__main__ import parser
    from benchmarks.common import smoke_args
    from benchmarks.convergence.run import overrides
    from benchmarks.convergence.runs import config_args
    from lightning_speed.cli import main as cli_main

    argv = ["launch", "--base", "fashion_mnist_dit.yaml", "--set", "ema.init_args.decay=0.999", "model.learn_sigma=false",
            "model.backbone.init_args.learn_sigma=false", "--out", str(tmp_path)]
    args = parser().parse_args(argv)
    forwarded = launch._forward(args)
    assert forwarded[forwarded.index("--set") + 1:][:3] == ["ema.init_args.decay=0.999", "model.learn_sigma=false",
                                                             "model.backbone.init_args.learn_sigma=false"]
    run_args = parser().parse_args(["run", "--strategy", "speed", *forwarded])
    protocol = overrides(run_args, tmp_path)
    cli = cli_main([*config_args("fashion_mnist_dit.yaml", "speed"), *protocol,
                    *smoke_args("lightning_speed.backbones.DiT")], run=False)
    (ema,) = (cb for cb in cli.trainer.callbacks if type(cb).__name__ == "EMAWeightAveraging")
    assert ema.decay == pytest.approx(0.999)
    assert cli.model.hparams.learn_sigma is False
    run_args.set = ["ema.init_args.decay"]
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        overrides(run_args, tmp_path)


# ------------------------------------------------------------------- the speed-up arithmetic
def test_first_step_reaching_interpolates() -> None:
    reach = stats.first_step_reaching
    curve = [(0, 40.0), (100, 20.0), (200, 0.0)]
    assert reach(curve, 30.0) == pytest.approx(50.0)  # halfway between 40 at 0 and 20 at 100
    assert reach(curve, 20.0) == pytest.approx(100.0)  # exactly on a point
    assert reach(curve, 5.0) == pytest.approx(175.0)
    assert reach(curve, 50.0) == pytest.approx(0.0)  # already below at the first evaluation
    assert reach(curve, -1.0) is None  # never reached
    assert reach([(10, 5.0), (20, 5.0)], 5.0) == pytest.approx(10.0)
    assert reach([], 1.0) is None


def test_seed_band_is_mean_min_max_at_common_steps() -> None:
    results = [
        {"strategy": "speed", "seed": 0, "fid_history": [[50, 10.0], [100, 6.0]]},
        {"strategy": "speed", "seed": 1, "fid_history": [[50, 14.0], [100, 4.0], [150, 3.0]]},  # 150: one seed only
        {"strategy": "uniform", "seed": 0, "fid_history": [[50, 99.0], [100, 99.0]]},
    ]
    assert stats.seed_band(results, "speed") == [(50, 12.0, 10.0, 14.0), (100, 5.0, 4.0, 6.0)]
    assert stats.seed_band(results, "p2") == []


def _run(strategy: str, seed: int, curve: list[tuple[int, float]]) -> dict:
    return {"strategy": strategy, "seed": seed, "fid_history": [list(p) for p in curve]}


def test_speedups_on_hand_made_curves() -> None:
    baseline = [(50, 20.0), (100, 10.0)]  # uniform reaches FID 10 at its budget, step 100
    results = [
        _run("uniform", 0, baseline),
        _run("speed", 0, [(50, 10.0), (100, 6.0)]),  # hits 10 at 50 -> 2x
        _run("speed", 1, [(50, 15.0), (100, 5.0)]),  # 15 -> 5 crosses 10 at 75 -> 4/3x
        _run("p2", 0, [(50, 30.0), (100, 12.0)]),  # never reaches 10
    ]
    table = stats.speedups(results, 100)
    assert table["_baseline_fid"] == pytest.approx(10.0) and table["_baseline_seeds"] == 1
    speed = table["speed"]
    assert speed["per_seed"] == pytest.approx([2.0, 100 / 75])
    assert speed["mean"] == pytest.approx((2.0 + 100 / 75) / 2)
    assert speed["min"] == pytest.approx(100 / 75) and speed["max"] == pytest.approx(2.0)
    assert speed["fid_at_steps"] == [6.0, 5.0] and speed["seeds"] == 2 and speed["note"] is None
    assert table["p2"]["per_seed"] == [None] and table["p2"]["mean"] is None and table["p2"]["note"]
    # Reverse view: the baseline reaches p2's 12 at 90 (between 20 at 50 and 10 at 100) -> 0.9;
    # it never gets to speed's 6 or 5 -> None.
    assert table["p2"]["equivalent_per_seed"] == pytest.approx([0.9])
    assert speed["equivalent_per_seed"] == [None, None]
    # One seed reached the target and one did not: the max is known, the mean and min are not (< 1).
    mixed = stats.speedups([*results, _run("p2", 1, [(50, 10.0), (100, 8.0)])], 100)["p2"]
    assert mixed["per_seed"] == [None, 2.0] and mixed["max"] == pytest.approx(2.0)
    assert mixed["min"] is None and mixed["mean"] is None and mixed["seeds"] == 2

    assert speed["at_least"] is False and speed["at_least_per_seed"] == [False, False]  # seed 0 is exactly at 10

    # At half the budget the target is the baseline's FID at step 50 (20): speed was below it (10, 15) at its first
    # evaluation, so it crossed at some unmeasured step before 50: the speed-up is at least 50 / 50 = 1, not 1.
    half = stats.speedups(results, 50)
    assert half["_baseline_fid"] == pytest.approx(20.0)
    assert half["speed"]["per_seed"] == pytest.approx([1.0, 1.0])
    assert half["speed"]["at_least"] is True and half["speed"]["at_least_per_seed"] == [True, True]
    # The reverse view reads the baseline's curve past the budget: it reaches 10 at 100 and 15 at 75 (20 at 50,
    # 10 at 100): 100 / 50 = 2 and 75 / 50 = 1.5, exact (the baseline was above both at its first evaluation).
    assert half["speed"]["equivalent_per_seed"] == pytest.approx([2.0, 1.5])
    assert half["speed"]["equivalent_at_most_per_seed"] == [False, False]
    # p2 (30 at 50) is behind: the baseline was below 30 already at its first evaluation (20 at 50), so the steps
    # it needs are at most 50: the reverse view 1.0 is an upper bound.
    assert half["p2"]["per_seed"] == [None] and half["p2"]["equivalent_per_seed"] == pytest.approx([1.0])
    assert half["p2"]["equivalent_at_most_per_seed"] == [True] and half["p2"]["at_least"] is False

    # The baseline target is the mean over its seeds.
    two_seeds = [*results, _run("uniform", 1, [(50, 18.0), (100, 14.0)])]
    assert stats.speedups(two_seeds, 100)["_baseline_fid"] == pytest.approx(12.0)
    assert stats.speedups([_run("speed", 0, baseline)], 100) == {}  # no baseline, no speed-up


def test_speed_cosine_is_compared_with_uniform_on_the_cosine_schedule() -> None:
    linear = _run("uniform", 0, [(50, 20.0), (100, 10.0)])
    speed_cosine = _run("speed_cosine", 0, [(50, 16.0), (100, 12.0)])
    # Without cosine-uniform runs the linear baseline is used (FID 10: never reached), and the entry says so.
    alone = stats.speedups([linear, speed_cosine], 100)["speed_cosine"]
    assert alone["baseline"] == "uniform" and alone["baseline_fid"] == pytest.approx(10.0) and alone["per_seed"] == [None]
    # With them, the target is their FID at the budget (16, reached at step 50: 2x), and only theirs.
    cosine = _run("uniform_cosine", 0, [(50, 24.0), (100, 16.0)])
    table = stats.speedups([linear, speed_cosine, cosine], 100)
    assert table["speed_cosine"]["baseline"] == "uniform_cosine" and table["speed_cosine"]["baseline_seeds"] == 1
    assert table["speed_cosine"]["per_seed"] == pytest.approx([2.0])
    assert table["_baseline_fid"] == pytest.approx(10.0)  # the linear baseline of every other strategy is unchanged
    assert table["uniform_cosine"]["baseline"] == "uniform" and table["uniform_cosine"]["per_seed"] == [None]
    # Cosine-uniform runs that stopped short of the budget: no entry, rather than the linear baseline's 2x (10 at 100)
    short = _run("uniform_cosine", 0, [(50, 24.0)])
    assert "speed_cosine" not in stats.speedups([linear, _run("speed_cosine", 0, [(50, 10.0), (100, 8.0)]), short], 100)


# --------------------------------------------------------------- time-limited parts resume
def test_part_timer_ignores_the_time_spent_before() -> None:
    from datetime import timedelta

    from lightning.pytorch.callbacks import Timer

    spent = {"time_elapsed": {"train": 500.0, "validate": 0.0, "test": 0.0}}
    lightning_timer, part_timer = Timer(duration=timedelta(seconds=60)), PartTimer(duration=timedelta(seconds=60))
    lightning_timer.load_state_dict(spent)
    part_timer.load_state_dict(spent)
    assert lightning_timer.time_remaining() == pytest.approx(60 - 500)  # why Lightning's would stop at once
    assert part_timer.time_remaining() == pytest.approx(60)


def test_part_timer_stops_one_step_before_an_fid_evaluation_the_time_left_cannot_hold(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Judged by the longest evaluation seen (earlier parts' or this process's): the step before an FID step stops
    when less time is left than that; other steps, more time left, or no evaluation seen yet never stop."""
    from datetime import timedelta
    from types import SimpleNamespace

    fid = SimpleNamespace(every_n_steps=10, seconds=[(10, 30.0)])
    timer = PartTimer(duration=timedelta(seconds=600), fid=fid, fid_seconds=[45.0])
    left = {"s": 40.0}
    monkeypatch.setattr(timer, "time_remaining", lambda *a, **k: left["s"])
    assert timer.stops_before_fid(19)  # step 20 evaluates; 40 s left < the earlier part's 45 s
    assert not timer.stops_before_fid(18) and not timer.stops_before_fid(20)
    left["s"] = 50.0
    assert not timer.stops_before_fid(19)
    fid.seconds.append((20, 55.0))  # a longer evaluation in this process raises the bar
    assert timer.stops_before_fid(29)
    fresh = PartTimer(duration=timedelta(seconds=600), fid=SimpleNamespace(every_n_steps=10, seconds=[]))
    monkeypatch.setattr(fresh, "time_remaining", lambda *a, **k: 1.0)
    assert not fresh.stops_before_fid(9)  # nothing seen yet: nothing to judge by
    assert not PartTimer(duration=timedelta(seconds=600)).stops_before_fid(9)  # no FID callback


def test_part_timer_stop_ends_trainer_fit_before_the_fid_step() -> None:
    """In a real Trainer.fit: with every evaluation known to take longer than the whole time limit, training ends at step
    4, one before the first FID step 5, instead of running to max_steps."""
    from datetime import timedelta
    from types import SimpleNamespace

    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    timer = PartTimer(duration=timedelta(hours=1), fid=SimpleNamespace(every_n_steps=5, seconds=[]),
                      fid_seconds=[1e9])
    trainer = pl.Trainer(max_steps=50, callbacks=[timer], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(BoringModel())
    assert trainer.global_step == 4


@needs_fashion_mnist
def test_convergence_run_resumes_after_its_time_limit(tmp_path: Path, home: Path) -> None:
    """A part stopped by its time limit resumes and trains in the next part (not one step and stop). Both parts run
    in this process: the launches of the convergence fixture start the run command as processes. The limit counts
    each part's start-up (about a second in this process, several on a loaded machine) too."""
    out = tmp_path / "conv"
    part = ["run", "--smoke", "--strategy", "uniform", "--seed", "0", "--steps", "100000",
            "--eval-every", "100000", "--fid-samples", "16", "--time-limit", "5", "--out", str(out)]  # fmt: skip
    run_main("convergence", part, home)
    first = json.loads((out / "uniform_s0" / "result.json").read_text())["steps_done"]
    run_main("convergence", part, home)
    result = json.loads((out / "uniform_s0" / "result.json").read_text())
    assert 0 < first < 100000
    assert result["steps_done"] > first + 1  # Lightning's restored Timer would allow exactly one step
    assert [p["from_step"] for p in result["parts"]] == [0, first]


@needs_fashion_mnist
def test_a_part_killed_between_its_checkpoint_and_its_record_is_stated_by_the_next(tmp_path: Path, home: Path) -> None:
    """A part killed after renaming its checkpoint into place, while writing result.json (simulated: the write stops
    half-way), leaves the previous record whole and behind the checkpoint. The next part starts at the checkpoint's
    step, states the steps in between as a part not recorded, and reads their FID timings and per-area rows from
    the killed part's logs; each part counts its own FID evaluations. Parts run in this process."""
    import torch

    from benchmarks.convergence import run

    def command(steps: int) -> list[str]:
        return ["run", "--smoke", "--strategy", "uniform", "--seed", "0", "--steps", str(steps), "--eval-every", "2",
                "--fid-samples", "16", "--fid-steps", "2", "--out", str(tmp_path)]

    lost: list[dict] = []  # what the killed part would have recorded

    def killed(path: Path, result: dict) -> None:
        lost.append(result)
        path.write_text(json.dumps(result)[:100])
        raise KeyboardInterrupt

    record = tmp_path / "uniform_s0" / "result.json"
    run_main("convergence", command(2), home)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(run, "write_json", killed)
        run_main("convergence", command(6), home)
    assert json.loads(record.read_text())["steps_done"] == 2  # the first part's record, whole
    assert torch.load(tmp_path / "uniform_s0" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 6
    run_main("convergence", command(6), home)
    result = json.loads(record.read_text())
    assert [(p["from_step"], p["to_step"], p.get("recorded", True)) for p in result["parts"]] == [
        (0, 2, True), (2, 6, False), (6, 6, True)]
    assert [p["fid_evaluations"] for p in result["parts"]] == [1, 2, 0]  # each part's own
    assert [step for step, _ in result["fid_history"]] == [2, 4, 6]
    # Steps 4 and 6 from the killed part's logs: its own values, to float32's precision.
    (killed_record,) = lost
    assert [step for step, _ in result["fid_seconds"]] == [2, 4, 6]
    assert dict(result["fid_seconds"]) == pytest.approx(dict(killed_record["fid_seconds"]), rel=1e-6)
    assert [row["step"] for row in result["timestep_areas"]] == [2, 4, 6]
    assert result["timestep_areas"] == [pytest.approx(row, rel=1e-6) for row in killed_record["timestep_areas"]]
    # A checkpoint behind its record: refused before training.
    record.write_text(json.dumps({**result, "steps_done": 8}))
    with pytest.raises(SystemExit, match=r"holds step 6 but .*records 8 steps"):
        run_main("convergence", command(10), home)


def test_a_run_resumes_only_with_the_settings_of_its_earlier_parts(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of one run with other overrides would mix two settings in one curve: refused before the CLI is built.
    A larger N, a time limit, the folder's spelling and launch's --eager retry of a compiled run are parts of one
    run."""
    import lightning_speed.cli
    from benchmarks.convergence.__main__ import parser
    from benchmarks.convergence.run import check_resumable, overrides, run_one

    def settings(*argv: str, out: Path = tmp_path) -> tuple[list[str], list[str]]:
        args = parser().parse_args(["run", "--strategy", "uniform", "--out", str(out), "--eval-every", "2", *argv])
        return [args.base, *RUNS["uniform"]], overrides(args, out / "uniform_s0")

    configs, protocol = settings("--set", "ema.init_args.decay=0.999")
    previous = {"configs": configs, "overrides": protocol}
    run_dir = tmp_path / "uniform_s0"
    relative = Path(os.path.relpath(tmp_path))
    for same in (["--steps", "9"], ["--time-limit", "60"], ["--eager"], ["--no-compile-sampling"]):
        check_resumable(previous, *settings("--set", "ema.init_args.decay=0.999", *same), run_dir)
    check_resumable(previous, *settings("--set", "ema.init_args.decay=0.999", out=relative), run_dir)
    check_resumable({}, *settings(), run_dir)  # no earlier part
    for other, named in ((["--set", "ema.init_args.decay=0.99"], "--ema.init_args.decay 0.99"),
                         (["--batch-size", "64"], "--data.init_args.batch_size 64"),
                         (["--fid-samples", "8"], "--fid.init_args.num_samples 8"),
                         (["--base", "fashion_mnist_dit.yaml"], "configs fashion_mnist_dit.yaml")):
        with pytest.raises(SystemExit, match=rf"trained with .*this part asks for \[.*'{re.escape(named)}.*another --out"):
            check_resumable(previous, *settings(*other), run_dir)

    run_dir.mkdir()
    (run_dir / "last.ckpt").write_bytes(b"")
    (run_dir / "result.json").write_text(json.dumps(previous))
    monkeypatch.setattr(lightning_speed.cli, "main", lambda *a, **k: pytest.fail("the CLI was built"))
    with pytest.raises(SystemExit, match=r"--fid.init_args.every_n_steps 2.*--fid.init_args.every_n_steps 4"):
        run_one(parser().parse_args(["run", "--strategy", "uniform", "--out", str(tmp_path), "--eval-every", "4",
                                     "--set", "ema.init_args.decay=0.999"]))


def test_part_timer_counts_from_the_parts_start() -> None:
    """A launcher's deadline counts the run's start-up: the part's clock starts at ``start``, not at the first step."""
    from datetime import timedelta
    from types import SimpleNamespace

    timer = PartTimer(duration=timedelta(seconds=60), start=time.monotonic() - 50)
    timer.on_train_start(SimpleNamespace(), None)
    try:
        assert timer.time_remaining() == pytest.approx(10, abs=1)
    finally:
        timer.on_exception(SimpleNamespace(), None, RuntimeError())  # disarm its stop signal


@needs_fashion_mnist
def test_time_limit_inside_an_fid_evaluation_saves_and_the_next_part_makes_it(tmp_path: Path, home: Path) -> None:
    """The part's time limit falls inside the FID evaluation at step 2 (a second per sampling batch here, 16 batches):
    the evaluation stops after its current batch, and the part writes last.ckpt and result.json without that point.
    The same command then makes it first thing: at step 2, from the checkpoint's weights, so exactly the value of
    an uninterrupted run. Stopped at N (2), the run is not finished for the launcher, and its next part, with no
    step left to train, makes the evaluation after the fit. All parts run in this process (no torch start-up)."""
    import torch

    from lightning_speed.callbacks import FIDCallback

    def command(out: Path, steps: int, *limit: str) -> list[str]:
        return ["run", "--smoke", "--strategy", "uniform", "--seed", "0", "--steps", str(steps), "--eval-every", "2",
                "--fid-samples", "64", "--fid-steps", "2", "--set", "fid.init_args.batch_size=4", "--out", str(out),
                *limit]  # fmt: skip

    def result(out: Path) -> dict:
        return json.loads((out / "uniform_s0" / "result.json").read_text())

    run_main("convergence", command(tmp_path / "whole", 2), home)
    (reference,) = result(tmp_path / "whole")["fid_history"]
    generate, batches = FIDCallback._generate, []

    def slow(self: FIDCallback, *args: Any, **kwargs: Any) -> Iterator[torch.Tensor]:
        for images in generate(self, *args, **kwargs):
            time.sleep(1.0)
            batches.append(len(images))
            yield images

    out, out_at_n = tmp_path / "parts", tmp_path / "parts_at_n"
    part = command(out, 3, "--time-limit", "8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FIDCallback, "_generate", slow)
        run_main("convergence", part, home)
    first = result(out)
    assert 0 < len(batches) < 16  # stopped inside the evaluation
    assert first["steps_done"] == 2 and first["fid_history"] == [] and first["fid_pending"] == 2
    saved = torch.load(out / "uniform_s0" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2 and not (out / "uniform_s0" / "saving.ckpt").exists()
    shutil.copytree(out, out_at_n)

    run_main("convergence", part, home)  # the next launch of the same command
    second = result(out)
    assert second["fid_history"] == [reference]  # step 2, the uninterrupted run's value
    assert second["steps_done"] == 3 and second["fid_pending"] is None
    assert [(p["from_step"], p["to_step"]) for p in second["parts"]] == [(0, 2), (2, 3)]

    finished = Namespace(out=str(out_at_n), final_samples=0, final_strategies=[], stop_at=None)
    assert not launch._finished(finished, "uniform", 0, 2)  # N reached, its FID point not: the launcher resumes it
    run_main("convergence", command(out_at_n, 2, "--time-limit", "8"), home)
    assert result(out_at_n)["fid_history"] == [reference] and launch._finished(finished, "uniform", 0, 2)
    assert not launch._finished(Namespace(out=str(out_at_n), final_samples=8, final_strategies=["uniform"], stop_at=None),
                                "uniform", 0, 2)  # the final FIDs asked for are missing


@needs_fashion_mnist
def test_a_screen_stops_at_its_step_on_the_schedule_of_n_and_resumes_to_n(tmp_path: Path, home: Path) -> None:
    """--stop-at trains N's schedule (a curriculum reads N) but ends at the screen's step; the launcher counts
    the run as done for that launch, and a launch without it trains the same run on to N."""
    common = ["launch", "--smoke", "--jobs", "curriculum_speed:0:8", "--eval-every", "2", "--fid-samples", "16",
              "--fid-steps", "2", "--out", str(tmp_path), "--no-plots"]
    run_script("convergence", [*common, "--stop-at", "4"], home, 400)
    path = tmp_path / "curriculum_speed_s0" / "result.json"
    screen = json.loads(path.read_text())
    assert screen["steps_done"] == 4 and screen["steps_target"] == 8 and screen["stop_at"] == 4
    assert [step for step, _ in screen["fid_history"]] == [2, 4]  # the evaluation at the screen's step is made
    args = Namespace(out=str(tmp_path), final_samples=0, final_strategies=[], stop_at=4)
    assert launch._finished(args, "curriculum_speed", 0, 8)
    assert not launch._finished(Namespace(**{**vars(args), "stop_at": None}), "curriculum_speed", 0, 8)
    overrides = screen["overrides"]
    assert overrides[overrides.index("--trainer.max_steps") + 1] == "8"  # N's schedule, not the screen's
    run_script("convergence", common, home, 400)
    resumed = json.loads(path.read_text())
    assert resumed["steps_done"] == 8 and [(p["from_step"], p["to_step"]) for p in resumed["parts"]] == [(0, 4), (4, 8)]
    assert [step for step, _ in resumed["fid_history"]] == [2, 4, 6, 8]


def test_a_screen_with_final_fids_asked_for_is_finished_at_its_stop_step(tmp_path: Path) -> None:
    """The final FIDs are made at N only: a screen stopped at its step is done for a launch with --stop-at (not trained
    again at every launch), and not for one to N."""
    (tmp_path / "speed_s0").mkdir()
    (tmp_path / "speed_s0" / "result.json").write_text(json.dumps({"steps_done": 4, "stop_at": 4, "fid_pending": None}))
    args = Namespace(out=str(tmp_path), final_samples=8, final_strategies=["speed"], stop_at=4)
    assert launch._finished(args, "speed", 0, 8)
    assert not launch._finished(Namespace(**{**vars(args), "stop_at": None}), "speed", 0, 8)
    assert not launch._finished(args, "speed", 0, 4)  # N is the stop step: its final FIDs are due


def test_a_screen_resumed_at_its_stop_step_trains_no_step_more(tmp_path: Path) -> None:
    """A screen stopped at its step with an evaluation pending resumes (for that evaluation) and ends there."""
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from benchmarks.convergence.run import StopAt

    def fit(ckpt: Path | None = None) -> pl.Trainer:
        trainer = pl.Trainer(max_steps=8, callbacks=[StopAt(3)], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        trainer.fit(BoringModel(), ckpt_path=ckpt)
        return trainer

    fit().save_checkpoint(tmp_path / "last.ckpt")
    assert fit(tmp_path / "last.ckpt").global_step == 3


def test_launch_kills_a_run_still_going_at_its_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A run that outlasts its stop margin (a process that ignores its time limit here) is killed at the launch's
    deadline, so the launch ends by then; a stop margin that leaves started runs no time is refused up front."""
    from benchmarks.convergence.__main__ import parser

    started, popen = [], subprocess.Popen

    def sleeper(cmd: list[str], **kwargs: object) -> subprocess.Popen:
        started.append(cmd)
        return popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=kwargs["stdout"])

    monkeypatch.setattr(launch.subprocess, "Popen", sleeper)
    monkeypatch.setattr(launch, "report", lambda args: None)
    common = ["launch", "--smoke", "--jobs", "uniform:0:4", "--out", str(tmp_path)]
    begin = time.monotonic()
    with pytest.raises(SystemExit, match=r"^runs killed at the deadline, before their own stop had saved them: "
                                         r"\[\('uniform', 0, 4\)\]; the same command resumes") as stop:
        launch.launch(parser().parse_args([*common, "--time-limit", "3", "--min-run-seconds", "2",
                                           "--stop-margin", "1"]))
    assert "runs failed" not in str(stop.value)  # a kill at the deadline is no failure of the run
    assert time.monotonic() - begin < 5
    assert started[0][started[0].index("--time-limit") + 1] in {"1", "2"}  # the launch's 3 s less the margin
    assert "uniform seed 0: still running at the launch's deadline, killing it" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--stop-margin 120"):
        launch.launch(parser().parse_args([*common, "--time-limit", "600", "--stop-margin", "120"]))


def test_stalled_run_detection(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "speed_s0", tmp_path / "speed_s0.log"
    (run_dir / "tb").mkdir(parents=True)
    log.write_text("started\n")
    events = run_dir / "tb" / "events"
    events.write_text("x")
    long_ago = time.time() - 3600
    assert not launch.stalled(run_dir, log, 60, long_ago)
    old = time.time() - 600
    os.utime(log, (old, old))
    assert not launch.stalled(run_dir, log, 60, long_ago)  # the TensorBoard file still moves
    os.utime(events, (old, old))
    assert launch.stalled(run_dir, log, 60, long_ago)
    assert launch.stalled(tmp_path / "missing", log, 60, long_ago)  # no folder yet: the log decides
    # Files left by an earlier, killed attempt are old; a process started just now is not stalled.
    assert not launch.stalled(run_dir, log, 60, time.time())
    assert launch.stalled(run_dir, log, 60, time.time() - 120)


def test_reports_merge_speedups_per_strategy(tmp_path: Path) -> None:
    """Reporting a second result folder replaces only the strategies it ran (say, H100 reruns)."""
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"speedup": {"p2": {"mean": 1.1}, "speed": {"mean": None}}, "throughput": {"x": 1}}))
    report.merge_speedups(path, {"speedup": {"speed": {"mean": 0.9}}, "speedup_half": {"speed": {"mean": 1.0}}})
    summary = json.loads(path.read_text())
    assert summary["speedup"] == {"p2": {"mean": 1.1}, "speed": {"mean": 0.9}}
    assert summary["speedup_half"] == {"speed": {"mean": 1.0}}
    assert summary["throughput"] == {"x": 1}


def test_report_refuses_mixed_fid_solvers(tmp_path: Path) -> None:
    """FIDs of different solvers are not comparable: one folder, one solver; a non-protocol solver
    reports under its own summary keys and never replaces the headline speed-ups."""
    def run(strategy: str, solver: str, key: str = "fid_solver") -> dict:
        return {"strategy": strategy, "seed": 0, key: solver, "fid_history": [[2500, 9.0]]}

    same = [run("uniform", "ddpm-250"), run("speed", "ddpm-250")]
    assert stats.curve_solver(same, tmp_path) == "ddpm-250"
    assert stats.curve_solver([{"strategy": "uniform"}], tmp_path) == "ddim-50"  # results before the field
    # committed results name the field fid_sampler: read as the same solver
    assert stats.curve_solver([run("uniform", "ddpm-250", "fid_sampler"), run("speed", "ddpm-250")], tmp_path) == "ddpm-250"
    with pytest.raises(ValueError, match=r"mix FID curves.*'ddim-50': \['uniform_s0'\].*'ddpm-250': \['speed_s0'\]"):
        stats.curve_solver([run("uniform", "ddim-50"), run("speed", "ddpm-250")], tmp_path)
    assert stats.summary_keys("ddim-50") == ("speedup", "speedup_half")
    assert stats.summary_keys("ddpm-250") == ("speedup_ddpm250", "speedup_half_ddpm250")
    # the DiT recipe's study has its own keys, so it never replaces the UNet headline
    assert stats.summary_keys("ddim-50", "fashion_mnist_dit.yaml") == ("speedup_dit", "speedup_dit_half")
    assert stats.summary_keys("ddpm-250", "other.yaml") == ("speedup_other_ddpm250", "speedup_other_half_ddpm250")
    # the flow base's protocol samples with Euler-50: its headline key has no solver suffix, DDIM would
    assert stats.summary_keys("euler-50", "fashion_mnist_sit.yaml") == ("speedup_flow", "speedup_flow_half")
    assert stats.summary_keys("heun-125", "fashion_mnist_sit.yaml") == ("speedup_flow_heun125", "speedup_flow_half_heun125")
    # the base comes from the results; results from before the field count as the default base
    dit = [{"configs": ["fashion_mnist_dit.yaml", "strategies/uniform.yaml"]}, {"configs": ["fashion_mnist_dit.yaml"]}]
    assert report.base_config(dit, "fashion_mnist.yaml") == "fashion_mnist_dit.yaml"
    assert report.base_config([{"strategy": "uniform"}], "fashion_mnist.yaml") == "fashion_mnist.yaml"
    with pytest.raises(ValueError, match=r"different base configs \['fashion_mnist.yaml', 'fashion_mnist_dit.yaml'\]"):
        report.base_config([*dit, {"strategy": "speed"}], "fashion_mnist.yaml")


def test_report_includes_another_folders_baseline(tmp_path: Path, home: Path) -> None:
    """--include: strategies run in one folder are compared with the uniform runs of another (committed
    H100 baseline and H200 runs here); a run present in both folders is refused."""
    new, baseline = tmp_path / "new", tmp_path / "baseline"
    for folder, runs in ((baseline, RESULTS / "convergence_h100"), (new, RESULTS / "convergence_h200x4")):
        for run in (["uniform_s0", "uniform_s1", "uniform_s2"] if folder == baseline else ["p2_s0", "p2_s1"]):
            (folder / run).mkdir(parents=True)
            (folder / run / "result.json").write_bytes((runs / run / "result.json").read_bytes())
    run_script("convergence", ["report", "--smoke", "--out", str(new), "--include", str(baseline)], home)
    written = json.loads((new / "speedups.json").read_text())
    p2 = written["N"]["p2"]
    uniform_at_10k = [dict(json.loads((baseline / f"uniform_s{s}" / "result.json").read_text())["fid_history"])[10000]
                      for s in range(3)]
    assert p2["baseline_seeds"] == 3 and p2["baseline_fid"] == pytest.approx(sum(uniform_at_10k) / 3)
    assert {(r["strategy"], r["folder"]) for r in written["runs"]} == {("uniform", "baseline"), ("p2", "new")}
    assert (new / "fid_vs_step.png").is_file() and not (baseline / "speedups.json").exists()
    (new / "uniform_s0").mkdir()
    (new / "uniform_s0" / "result.json").write_bytes((baseline / "uniform_s0" / "result.json").read_bytes())
    proc = bench("convergence", ["report", "--smoke", "--out", str(new), "--include", str(baseline)], home)
    assert proc.returncode != 0 and "uniform_s0 is in both" in proc.stderr



def _protocol_run(strategy: str, base: str = "fashion_mnist_dit.yaml", batch: int = 64, samples: int = 5000,
                  *overrides: str) -> dict:
    """A result.json as run.py writes it, with its curve: uniform 20 -> 10, the candidate 10 -> 5 (2x)."""
    curve = [[2500, 20.0], [5000, 10.0]] if strategy == "uniform" else [[2500, 10.0], [5000, 5.0]]
    return {"strategy": strategy, "seed": 0, "steps_done": 5000, "fid_history": curve, "fid_solver": "ddim-50",
            "configs": [base, *RUNS[strategy]], "batch_size": batch, "fid_samples": samples, "card": "card",
            "overrides": ["--seed_everything", "0", "--trainer.max_steps", "5000", *overrides]}


@pytest.mark.parametrize(("candidate", "message"), [
    (_protocol_run("speed", "fashion_mnist.yaml"), r"different base configs"),
    (_protocol_run("speed", "fashion_mnist_dit.yaml", 128),
     r"batch 64: \['uniform_s0 \(baseline\)'\]; batch 128: \['speed_s0 \(new\)'\]"),
    (_protocol_run("speed", "fashion_mnist_dit.yaml", 64, 10000), r"FID samples 5000: .*; FID samples 10000: "),
    (_protocol_run("speed", "fashion_mnist_dit.yaml", 64, 5000, "--ema.init_args.decay", "0.999"),
     r"--ema.init_args.decay 0.999"),
], ids=["base", "batch", "fid_samples", "ema_override"])
def test_a_report_refuses_runs_trained_or_measured_with_other_settings(candidate: dict, message: str,
                                                                       tmp_path: Path) -> None:
    """A candidate and the baseline it is compared with must differ only in the run's config files: another base,
    batch, FID sample count or --set override (an EMA decay) makes the speed-up a comparison of two protocols. Refused
    before anything is written, with or without summary.json; per-part and cadence settings may differ."""
    def write(folder: Path, result: dict) -> None:
        (folder / f"{result['strategy']}_s0").mkdir(parents=True)
        (folder / f"{result['strategy']}_s0" / "result.json").write_text(json.dumps(result))

    baseline, new = tmp_path / "baseline", tmp_path / "new"
    write(baseline, _protocol_run("uniform"))
    write(new, candidate)
    for summary in (False, True):
        args = Namespace(out=str(new), include=[str(baseline)], base="fashion_mnist_dit.yaml", plots=False,
                         smoke=False, summary=summary, summary_file=str(tmp_path / "summary.json"), summary_key=None)
        with pytest.raises(ValueError, match=message):
            report.report(args)
        assert not (new / "speedups.json").exists() and not (tmp_path / "summary.json").exists()
    # The evaluation cadence, the compile mode and N (a run resumed further) are no part of the comparison.
    same = _protocol_run("speed", "fashion_mnist_dit.yaml", 64, 5000, "--fid.init_args.every_n_steps", "2500",
                         "--model.compile_mode", "reduce-overhead")
    same["overrides"][3] = "10000"
    (new / "speed_s0" / "result.json").write_text(json.dumps(same))
    args.summary = False
    assert report.report(args)["N"]["speed"]["per_seed"] == [2.0]


@pytest.mark.parametrize("command", [["report"], ["launch", "--jobs", "uniform:0:4", "speed:0:4", "--final-samples", "0"]],
                         ids=["report", "launch"])
def test_report_refuses_a_run_with_a_fid_that_is_not_finite(command: list[str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A diverged run's NaN (or inf) FID would be published as a NaN speed-up: the report names the run, the step and
    the fix, exits 2 and writes nothing; so does the report at the end of a launch (here of runs already finished)."""
    from benchmarks.convergence.__main__ import main

    for fid in ("NaN", "Infinity"):
        out = tmp_path / fid
        for strategy, curve in (("uniform", "[[2, 20.0], [4, 10.0]]"), ("speed", f"[[2, 12.0], [4, {fid}]]")):
            (out / f"{strategy}_s0").mkdir(parents=True)
            (out / f"{strategy}_s0" / "result.json").write_text(
                f'{{"strategy": "{strategy}", "seed": 0, "steps_done": 4, "fid_history": {curve}}}')
        monkeypatch.setattr(sys, "argv", ["python -m benchmarks.convergence", *command, "--smoke", "--out", str(out)])
        with pytest.raises(SystemExit) as exit_status:
            main()
        assert exit_status.value.code == 2
        assert re.search(rf"{re.escape(str(out / 'speed_s0'))} has FID (nan|inf) at step 4 \(a diverged run\?\): "
                         r"remove or rerun that run", capsys.readouterr().err)
        written = {"logs"} if command[0] == "launch" else set()  # the launch's (empty) log folder
        assert sorted(p.name for p in out.iterdir()) == sorted({"speed_s0", "uniform_s0", *written})  # no report


# ------------------------------------------------------------------------------ ddp_scaling.py
@needs_fashion_mnist
def test_ddp_scaling_smoke_runs_on_one_and_two_processes(tmp_path: Path, home: Path,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    """DiT on 1 and 2 CPU processes (gloo), a DDP-settings variant, repeated windows and a profile. (The UNet
    row differs only in the backbone, which test_throughput_smoke builds the same way; one model keeps the
    suite within its time.) The orchestration runs in this process: each measurement is a
    ``python -m benchmarks.ddp_scaling`` process of its own, and the orchestrator only starts them."""
    from benchmarks.ddp_scaling import merge, parse_variant, spec_of

    out = tmp_path / "ddp.json"
    run_main("ddp_scaling", ["--smoke", "--models", "dit", "--devices", "1", "2", "--variants",
                             "default:static:view:bucket=5:hook=bf16", "--profile", "--profile-steps", "2",
                             "--out", str(out)], home)
    proc = Namespace(stdout=capfd.readouterr().out)  # what the command prints, its measurement processes' included
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [(r["model"], r["devices"]) for r in runs] == [("dit", 1), ("dit", 2)]
    for r in runs:
        assert len(r["windows"]) == 2 and r["min"] <= r["images_per_s"] <= r["max"]
        assert r["profile"]["steps"] == 2 and r["profile"]["wall_ms_per_step"] > 0
    two = [r for r in runs if r["devices"] == 2]
    hook = "torch.distributed.algorithms.ddp_comm_hooks.default_hooks.bf16_compress_hook"  # resolved, not applied on CPU
    assert all(r["ddp"] == {"static_graph": True, "gradient_as_bucket_view": True, "bucket_cap_mb": 5.0,
                            "ddp_comm_hook": hook} for r in two)
    for key in ("dit@4",):
        entry = result["scaling"][key]
        variant = entry["variants"]["default:static:view:bucket=5:hook=bf16"]
        assert variant["speedup"]["2"] == pytest.approx(variant["images_per_s"]["2"] / entry["best_one_gpu"])
    assert "--- profile of rank 0" in proc.stdout and json.loads(proc.stdout[proc.stdout.rindex("\n{"):])["smoke"]
    assert result["complete"]

    # Two runs' files (1 GPU in one, 2 in the other) merge into the same table, each run keeping its command.
    files = []
    for n in (1, 2):
        part = {**result, "command": f"part {n}", "runs": [r for r in runs if r["devices"] == n]}
        files.append(tmp_path / f"part{n}.json")
        files[-1].write_text(json.dumps(part))
    merged = merge([str(f) for f in files], str(tmp_path / "merged.json"), smoke=True)
    assert merged["scaling"] == result["scaling"] and [r["command"] for r in merged["runs"]] == ["part 1", "part 2"]
    assert parse_variant(spec_of(two[0]))["ddp"] == two[0]["ddp"]  # a merged "shipped" run is named by its settings
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**result, "card": "another card"}))
    with pytest.raises(SystemExit, match="different cards"):
        merge([str(files[0]), str(other)], str(tmp_path / "bad.json"), smoke=True)


def test_ddp_scaling_variants_parse_and_reject_bad_ones() -> None:
    from benchmarks.ddp_scaling import parse_variant, same_settings, spec_of, summary_keys

    assert parse_variant("max-autotune-no-cudagraphs:static:view:bucket=50") == {
        "name": "max-autotune-no-cudagraphs:static:view:bucket=50", "compile_mode": "max-autotune-no-cudagraphs",
        "ddp": {"static_graph": True, "gradient_as_bucket_view": True, "bucket_cap_mb": 50.0}}
    shipped = parse_variant("shipped")  # what configs/multi_gpu/ddp.yaml sets: DDP options, the base's compile mode
    assert shipped["compile_mode"] is None and shipped["ddp"] == {
        "static_graph": True, "gradient_as_bucket_view": True, "bucket_cap_mb": 100, "sigterm_check_lag": 2,
        "init_stream": "side"}
    with pytest.raises(SystemExit, match="compile mode must be one of"):
        parse_variant("fast:static")
    # ddp.yaml on top of each base config trains as the measured variants with the same settings, whatever their
    # names (DDP's defaults filled in); summary.json takes their mean per model. The UNet's 6.6 MiB of gradients fit
    # one bucket under DDP's default 25 MB cap as under ddp.yaml's 100, so a run at 25 counts; DiT-B/2's 494 MiB do not.
    def variant(mode: str, ddp: dict, ips: dict) -> dict:
        return {"compile_mode": mode, "ddp": ddp, "images_per_s": ips, "speedup": {n: x / 100 for n, x in ips.items()}}

    scaling = {
        "unet@512": {"best_one_gpu": 100.0, "variants": {
            "default:static:view": variant("default", {"static_graph": True, "gradient_as_bucket_view": True}, {"2": 90.0}),
            "reduce-overhead:static:view:bucket=25": variant(
                "reduce-overhead", {"static_graph": True, "gradient_as_bucket_view": True, "bucket_cap_mb": 25.0},
                {"2": 160.0}),
            "reduce-overhead:static:view:lag=2:stream=current": variant(
                "reduce-overhead", {"static_graph": True, "gradient_as_bucket_view": True, "sigterm_check_lag": 2,
                                    "init_stream": "current"}, {"2": 165.0}),
            "reduce-overhead:static:view:lag=2:stream=side": variant(
                "reduce-overhead", {"static_graph": True, "gradient_as_bucket_view": True, "sigterm_check_lag": 2,
                                    "init_stream": "side"}, {"2": 170.0, "4": 300.0}),
            "reduce-overhead": variant("reduce-overhead", {}, {"2": 150.0})}},
        "dit@256": {"best_one_gpu": 100.0, "variants": {
            "default:static:view": variant("default", {"static_graph": True, "gradient_as_bucket_view": True}, {"2": 170.0}),
            "default:static:view:lag=2:stream=side": variant(
                "default", {"static_graph": True, "gradient_as_bucket_view": True, "sigterm_check_lag": 2,
                            "init_stream": "side"}, {"2": 175.0}),  # DDP's 25 MB buckets: not the shipped setting
            "shipped": variant("default", {"static_graph": True, "gradient_as_bucket_view": True, "bucket_cap_mb": 100,
                                           "sigterm_check_lag": 2, "init_stream": "side"}, {"2": 180.0}),
            "default:static:view:bucket=100:lag=2": variant(
                "default", {"static_graph": True, "gradient_as_bucket_view": True, "bucket_cap_mb": 100.0,
                            "sigterm_check_lag": 2}, {"2": 190.0})}},
    }
    keys = summary_keys({"card": "card", "date": "date", "command": "cmd", "dit_preset": "DiT-B/2", "scaling": scaling})
    unet = keys["ddp_scaling_2gpu"]["batch_per_gpu"]["512"]
    assert (unet["compile_mode"], unet["speedup_2gpu"], unet["speedup_4gpu"]) == ("reduce-overhead", 1.7, 3.0)
    dit = keys["ddp_scaling_dit"]["batch_per_gpu"]["256"]
    assert (dit["speedup_2gpu"], dit["runs_2gpu"]) == (pytest.approx(1.85), [180.0, 190.0])
    assert "runs_2gpu" not in unet
    nobuffers = parse_variant("reduce-overhead:static:nobuffers:bucket=10")
    assert nobuffers["ddp"] == {"static_graph": True, "broadcast_buffers": False, "bucket_cap_mb": 10.0}
    assert spec_of(nobuffers) == nobuffers["name"]
    with pytest.raises(SystemExit, match="unknown option 'statik'"):
        parse_variant("default:statik")
    # lag= and stream= select SyncFreeDDPStrategy; without them a run is Lightning's DDPStrategy (lag 0, side stream)
    ours = parse_variant("reduce-overhead:static:lag=0:stream=side")
    assert ours["ddp"] == {"static_graph": True, "sigterm_check_lag": 0, "init_stream": "side"}
    assert spec_of(ours) == ours["name"] and same_settings(ours, parse_variant("reduce-overhead:static"))
    assert not same_settings(parse_variant("reduce-overhead:static:lag=2"), parse_variant("reduce-overhead:static"))
    with pytest.raises(SystemExit, match="unknown option 'stream=default'"):
        parse_variant("default:stream=default")
    # hook=H: PyTorch's compression hook as the dotted path a YAML config names, and back
    bf16 = parse_variant("default:static:view:hook=bf16:lag=2")
    assert bf16["ddp"]["ddp_comm_hook"] == "torch.distributed.algorithms.ddp_comm_hooks.default_hooks.bf16_compress_hook"
    assert spec_of(bf16) == bf16["name"] and not same_settings(bf16, parse_variant("default:static:view:lag=2"))
    with pytest.raises(SystemExit, match="hook=bf16|fp16"):
        parse_variant("default:hook=int8")
    # fsdp: configs/multi_gpu/fsdp_dit_xl.yaml's FSDPStrategy, a variant of its own in the table and summary.json
    from lightning.pytorch.strategies import FSDPStrategy

    from benchmarks.ddp_scaling import fsdp_strategy
    from lightning_speed.backbones.dit import DiTBlock

    fsdp = parse_variant("fsdp")
    assert fsdp["compile_mode"] == "none" and fsdp["fsdp"]["sharding_strategy"] == "FULL_SHARD"
    assert not same_settings(fsdp, shipped) and same_settings(fsdp, parse_variant("fsdp:none"))
    assert parse_variant("fsdp:default")["compile_mode"] == "default"
    with pytest.raises(SystemExit, match=r"fsdp\[:MODE\] takes a compile mode"):
        parse_variant("fsdp:fast")
    strategy = fsdp_strategy(fsdp["fsdp"])
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["auto_wrap_policy"]._module_classes == {DiTBlock}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {DiTBlock}
    scaling["dit@256"]["variants"]["fsdp"] = {**variant("none", {}, {"2": 150.0}), "fsdp": fsdp["fsdp"],
                                              "peak_memory_gib": {"2": 40.0}}
    keys = summary_keys({"card": "card", "date": "date", "command": "cmd", "dit_preset": "DiT-XL/2", "scaling": scaling})
    assert keys["fsdp_dit"]["batch_per_gpu"]["256"] == {
        "images_per_s_1gpu": 100.0, "images_per_s_2gpu": 150.0, "speedup_2gpu": 1.5, "peak_memory_gib_2gpu": 40.0,
        "compile_mode": "none", "fsdp": fsdp["fsdp"]}
    assert keys["ddp_scaling_dit_xl_2"]["batch_per_gpu"]["256"]["runs_2gpu"] == [180.0, 190.0]  # not among DDP's
    assert "ddp_scaling_dit" not in keys  # DiT-B/2's key (the headline figure) is not overwritten by another preset


# ------------------------------------------------------------------ committed reports reproduce
# Every committed speedups.json, by folder, with the folders its report included (--include).
REPORTS = {
    "convergence": [],
    "convergence_ddpm250": [],
    "convergence_h100": [],
    "convergence_h200x4": ["convergence_h100"],
    "convergence_dit_h200x2": [],  # the DiT recipe: its own summary keys, speedup_dit
    "convergence_dit_ema999": [],  # its ablations at N = 10k (no summary keys)
    "convergence_dit_fixed_variance": [],
    "convergence_dit_ema999_s1": ["convergence_dit_ema999"],  # seed 1 of the EMA-0.999 pair, reported with seed 0
    "convergence_dit_batch256": [],  # the recipe's batch 256 (EMA 0.999, one seed)
    "convergence_dit_fixed_variance_s1": ["convergence_dit_fixed_variance"],  # seed 1, reported with seed 0
    "convergence_unet_batch64": [],  # the UNet pair at the DiT ablations' batch 64 (one seed, stopped at 6k)
    "convergence_unet_batch64_lr1e-4": [],  # the same at the DiT's lr 1e-4, to 10k
    "convergence_unet_batch64_s1": ["convergence_unet_batch64"],  # seed 1 of each UNet pair, reported with seed 0
    "convergence_unet_batch64_lr1e-4_s1": ["convergence_unet_batch64_lr1e-4"],
    "convergence_sit_flow": [],  # the flow base (SiT-S/2): its own summary keys, speedup_flow
    "study_screen": ["convergence_dit_ema999"],  # study candidates stopped at N/2, against uniform's seed 0 at N
    "study_ema_warmup": ["convergence_dit_h200x2"],  # EMA 0.9999 with a warm-up, against the recipe's uniform
}
# summary.json keys that quote one committed report's speed-up at N (not written by the report: ablations)
ABLATION_KEYS = {"speedup_dit_ablation_ema999": "convergence_dit_ema999_s1",
                 "speedup_dit_ablation_batch256": "convergence_dit_batch256",
                 "speedup_dit_ablation_fixed_variance": "convergence_dit_fixed_variance_s1",
                 "speedup_unet_batch64": "convergence_unet_batch64_s1",
                 "speedup_unet_batch64_lr1e-4": "convergence_unet_batch64_lr1e-4_s1"}
# The reports behind summary.json's speed-up keys, in the order BENCHMARKS.md runs them: a later
# folder's entries replace an earlier one's.
SUMMARY_ORDER = ["convergence", "convergence_h100", "convergence_h200x4", "convergence_ddpm250", "convergence_dit_h200x2",
                 "convergence_sit_flow", "study_screen", "study_ema_warmup"]
SUMMARY_ARGS = {"study_screen": ["--summary-key", "speedup_study"],  # the study's own keys
                "study_ema_warmup": ["--summary-key", "speedup_study_ema_warmup"]}
SPEEDUP_KEYS = ("speedup", "speedup_half", "speedup_ddpm250", "speedup_half_ddpm250", "speedup_dit", "speedup_dit_half",
                "speedup_flow", "speedup_flow_half", "speedup_study", "speedup_study_half", "speedup_study_screen",
                "speedup_study_ema_warmup", "speedup_study_ema_warmup_half")


def copy_raw_results(folder: str, tmp_path: Path) -> Path:
    """Only the raw result.json files of a committed result folder, under the same folder name."""
    copy = tmp_path / folder
    for result in (RESULTS / folder).glob("*/result.json"):
        (copy / result.parent.name).mkdir(parents=True)
        shutil.copyfile(result, copy / result.parent.name / "result.json")
    return copy


def test_every_committed_report_is_listed() -> None:
    assert sorted(p.parent.name for p in RESULTS.glob("*/speedups.json")) == sorted(REPORTS)


def test_committed_reports_regenerate_byte_for_byte_from_raw_results(tmp_path: Path) -> None:
    """speedups.json and speedups.md of every result folder, and summary.json's speed-up keys, from result.json
    files alone."""
    from benchmarks.convergence.__main__ import parser

    def regenerate(folder: str, *args: str) -> None:
        include = [a for i in REPORTS[folder] for a in ("--include", str(tmp_path / i))]
        report.report(parser().parse_args(["report", "--no-plots", "--out", str(tmp_path / folder), *include, *args]))

    for folder in REPORTS:
        copy_raw_results(folder, tmp_path)
    for folder in REPORTS:
        regenerate(folder, "--no-summary")
        for name in ("speedups.json", "speedups.md"):
            assert (tmp_path / folder / name).read_bytes() == (RESULTS / folder / name).read_bytes(), (folder, name)

    committed = json.loads((RESULTS / "summary.json").read_text())
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({k: v for k, v in committed.items() if k not in SPEEDUP_KEYS}))
    for folder in SUMMARY_ORDER:
        regenerate(folder, "--summary-file", str(summary), *SUMMARY_ARGS.get(folder, []))
    assert summary.read_bytes() == (RESULTS / "summary.json").read_bytes()


def test_ablation_keys_of_the_summary_quote_their_reports() -> None:
    summary = json.loads((RESULTS / "summary.json").read_text())
    for key, folder in ABLATION_KEYS.items():
        report_n = json.loads((RESULTS / folder / "speedups.json").read_text())["N"]["speed"]
        quoted = summary[key]
        assert quoted["results"] == folder, key
        assert {f: quoted[f] for f in ("mean", "min", "max", "seeds", "steps")} == \
            {f: report_n[f] for f in ("mean", "min", "max", "seeds", "steps")}, key


def test_every_committed_run_is_a_run_of_the_registry() -> None:
    """Each committed result names a run that the config files still reproduce."""
    from benchmarks.convergence.runs import CONFIGS, RUNS

    committed = {json.loads(p.read_text())["strategy"] for p in RESULTS.glob("*/*/result.json")}
    assert committed <= set(RUNS), committed - set(RUNS)
    for run, files in RUNS.items():
        assert all((CONFIGS / f).is_file() for f in files), run
    used = {f for files in RUNS.values() for f in files}
    ablation_files = {f"ablations/{p.name}" for p in (CONFIGS / "ablations").glob("*.yaml")}
    assert ablation_files <= used, ablation_files - used  # no ablation file that no run composes


def test_benchmarks_md_points_only_into_the_repository() -> None:
    """BENCHMARKS.md is read in a clone: every link and figure points into the repository, and every path under
    benchmarks/results/ it names exists (a pattern such as ``throughput*.json`` matches at least one file)."""
    text = (REPO / "BENCHMARKS.md").read_text()
    links = [link for link in re.findall(r"\]\(([^)\s]+)\)", text) if not link.startswith("#")]
    assert links and not [link for link in links if "://" in link or link.startswith(("/", ".."))], links
    assert "../" not in text  # no file outside the repository, linked or not
    named = re.findall(r"benchmarks/results/[\w./*-]+", text)
    paths = [link.partition("#")[0] for link in links] + named  # a link's #section is not part of its file
    missing = sorted({path for path in paths if not list(REPO.glob(path.rstrip("./")))})
    assert not missing, missing


# ------------------------------------------------------------------------------ dit_throughput.py
def test_dit_throughput_smoke_interleaves_rows_and_reports_ratios(tmp_path: Path, home: Path) -> None:
    out = tmp_path / "dit.json"
    run_script("dit_throughput", ["--smoke", "--repeats", "2", "--out", str(out)], home)
    result = json.loads(out.read_text())
    assert result["card"] == "cpu" and result["smoke"] and result["batch"] == 4
    preset = result["presets"]["DiT-S/2"]
    assert preset["flops_per_image"] > 0
    rows = preset["rows"]
    for name in ("plain", "trainer"):
        assert len(rows[name]["windows"]) == 2 and all(w > 0 for w in rows[name]["windows"]), name
        assert rows[name]["min"] <= rows[name]["images_per_s"] <= rows[name]["max"], name
    assert preset["trainer_over_plain"] == rows["trainer"]["images_per_s"] / rows["plain"]["images_per_s"]
    if "official" in rows:  # the official DiT code and timm are present
        assert rows["official"]["images_per_s"] > 0 and preset["trainer_over_official"] > 0
    else:
        assert any(note.startswith("official: skipped") for note in preset["notes"]), preset["notes"]


# ------------------------------------------------------------------------------ latent_throughput.py
def test_latent_throughput_smoke_encodes_caches_and_trains_from_the_cache(tmp_path: Path, home: Path) -> None:
    pytest.importorskip("diffusers")
    out = tmp_path / "latent.json"
    proc = run_script("latent_throughput", ["--smoke", "--repeats", "2", "--out", str(out)], home)
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout[proc.stdout.rindex("\n{"):]) == result  # printed too, so that a log holds the result
    assert result["card"] == "cpu" and result["smoke"] and result["batch"] == 4
    assert all(result["encode"][p]["images_per_s"] > 0 for p in ("fp32", "bf16"))
    cache = result["cache"]
    assert cache["encodes"] == 2 * cache["images"] and cache["bytes"] > 0 and cache["latent_shape"] == [4, 16, 16]
    preset = result["presets"]["DiT-S/2"]
    assert preset["loader"] == "LatentBatchLoader" and preset["flops_per_image"] > 0
    assert len(preset["windows"]) == 2 and preset["min"] <= preset["images_per_s"] <= preset["max"]
    assert preset["encoder_calls"] == 2 * 2  # built once (16 images in 2 batches, image and mirror); fit read the cache


def test_a_study_key_names_each_entrys_n_and_ema_decay(tmp_path: Path) -> None:
    """report --summary-key speedup_study writes {strategy: {mean, min, max, seeds, steps, N, ema, ...}}: uniform
    reaches FID 10 at 10k; the candidate at 6,667 (1.5x) and 5k (2x), its EMA decay read from the runs' overrides."""
    out = tmp_path / "study"
    curves = {("uniform", 0): [(5000, 20.0), (10000, 10.0)], ("uniform", 1): [(5000, 20.0), (10000, 10.0)],
              ("loss_decrease", 0): [(5000, 12.0), (10000, 6.0)], ("loss_decrease", 1): [(5000, 8.0), (10000, 5.0)]}
    for (strategy, seed), curve in curves.items():
        folder = out / f"{strategy}_s{seed}"
        folder.mkdir(parents=True)
        folder.joinpath("result.json").write_text(json.dumps({
            "strategy": strategy, "seed": seed, "steps_done": 10000, "fid_history": curve, "fid_solver": "ddim-50",
            "configs": ["fashion_mnist_dit.yaml", *RUNS[strategy]], "card": "card",
            "overrides": ["--seed_everything", str(seed), "--ema.init_args.decay", "0.999"]}))
    summary = tmp_path / "summary.json"
    args = Namespace(out=str(out), include=[], base="fashion_mnist_dit.yaml", plots=False, smoke=False, summary=True,
                     summary_file=str(summary), summary_key="speedup_study")
    report.report(args)
    written = json.loads(summary.read_text())
    assert set(written) == {"speedup_study", "speedup_study_half"}
    entry = written["speedup_study"]["loss_decrease"]
    assert {k: entry[k] for k in ("mean", "min", "max", "seeds", "steps", "N", "ema")} == {
        "mean": pytest.approx(1.75), "min": pytest.approx(1.5), "max": 2.0,
        "seeds": 2, "steps": 10000, "N": 10000, "ema": 0.999}
    half = written["speedup_study_half"]["loss_decrease"]
    assert (half["steps"], half["N"]) == (5000, 10000)  # measured at N / 2 of the same N's schedule
    # A screened candidate (stopped at 5k on N = 10k's schedule) goes to speedup_study_screen, not to the N keys:
    # uniform's mean curve (20 at 5k, 10 at 10k) reaches its 12 at 9k: 1.8x of the way.
    folder = out / "curriculum_speed_s0"
    folder.mkdir()
    folder.joinpath("result.json").write_text(json.dumps({
        "strategy": "curriculum_speed", "seed": 0, "steps_done": 5000, "stop_at": 5000,
        "fid_history": [(2500, 30.0), (5000, 12.0)], "fid_solver": "ddim-50", "card": "card",
        "configs": ["fashion_mnist_dit.yaml", *RUNS["curriculum_speed"]],
        "overrides": ["--seed_everything", "0", "--ema.init_args.decay", "0.999"]}))
    summary.unlink()
    report.report(args)
    written = json.loads(summary.read_text())
    assert set(written) == {"speedup_study", "speedup_study_half", "speedup_study_screen"}
    assert "curriculum_speed" not in written["speedup_study"] and "curriculum_speed" not in written["speedup_study_half"]
    screened = written["speedup_study_screen"]["curriculum_speed"]
    assert {k: screened[k] for k in ("steps", "N", "seeds", "reaches_2x", "ema", "fid_per_seed")} == {
        "steps": 5000, "N": 10000, "seeds": 1, "reaches_2x": False, "ema": 0.999, "fid_per_seed": [12.0]}
    assert screened["how_far"] == pytest.approx(1.8) and screened["how_far_per_seed"] == pytest.approx([1.8])
    # without the override, the base config's decay
    assert report.ema_decay([{"strategy": "uniform", "configs": ["fashion_mnist_dit.yaml"], "overrides": []}],
                            "uniform") == 0.9999


def test_a_study_entry_names_the_ema_warm_up_its_runs_composed() -> None:
    """The warm-up's power from the composed configs (ema_warmup.yaml: 0.75) or an override; no field without one."""
    def run(strategy: str, *overrides: str) -> dict:
        return {"strategy": strategy, "configs": ["fashion_mnist_dit.yaml", *RUNS[strategy]], "overrides": list(overrides)}

    assert report.ema_fields([run("uniform_ema_warmup")], "uniform_ema_warmup") == {"ema": 0.9999, "ema_warmup_power": 0.75}
    assert report.ema_fields([run("uniform")], "uniform") == {"ema": 0.9999}
    on = run("uniform", "--ema.init_args.warmup", "true", "--ema.init_args.decay", "0.999")
    assert report.ema_fields([on], "uniform") == {"ema": 0.999, "ema_warmup_power": pytest.approx(2 / 3)}
    off = run("uniform_ema_warmup", "--ema.init_args.warmup", "false")
    assert report.ema_fields([off], "uniform_ema_warmup") == {"ema": 0.9999}
    # a base that warms up (the quickstart: decay 0.99, the default power 2/3)
    base = {"strategy": "uniform", "configs": ["quickstart.yaml", "strategies/uniform.yaml"], "overrides": []}
    assert report.ema_fields([base], "uniform") == {"ema": 0.99, "ema_warmup_power": pytest.approx(2 / 3)}
    # runs that disagree name no warm-up
    assert report.ema_warmup_power([run("uniform_ema_warmup"), off], "uniform_ema_warmup") is None


def test_a_screen_says_which_strategy_reaches_uniforms_fid_at_twice_its_step() -> None:
    """Uniform (2 seeds) has mean FID 10 at 10k; screened at 5k, one candidate is at 9 and 10 (both <= 10: 2x is
    possible), another at 9 and 11 (one seed short: not 2x). Runs without --stop-at are no screen."""
    def run(strategy: str, seed: int, curve: list, stop_at: int | None = None) -> dict:
        return {"strategy": strategy, "seed": seed, "fid_history": curve, "stop_at": stop_at}

    results = [run("uniform", 0, [(5000, 20.0), (10000, 11.0)]), run("uniform", 1, [(5000, 18.0), (10000, 9.0)]),
               run("loss_decrease", 0, [(2500, 30.0), (5000, 9.0)], 5000),
               run("loss_decrease", 1, [(2500, 31.0), (5000, 10.0)], 5000),
               run("laplace_log_snr", 0, [(5000, 9.0)], 5000), run("laplace_log_snr", 1, [(5000, 11.0)], 5000),
               run("speed", 0, [(5000, 9.0), (10000, 6.0)])]
    screened = stats.screen(results)
    assert set(screened) == {"loss_decrease", "laplace_log_snr"}
    # how far: uniform's mean curve (19 at 5k, 10 at 10k) reaches 10 at 10k (2x) and never reaches 9 (None)
    assert screened["loss_decrease"] == {"step": 5000, "fid_per_seed": [9.0, 10.0], "baseline_fid_at_double": 10.0,
                                         "baseline_seeds": 2, "reaches_2x": True, "equivalent_per_seed": [None, 2.0],
                                         "equivalent_at_most_per_seed": [False, False]}
    assert screened["laplace_log_snr"]["reaches_2x"] is False
    # 11 is reached between 19 at 5k and 10 at 10k: 5000 + 8/9 * 5000 steps, over 5000
    assert screened["laplace_log_snr"]["equivalent_per_seed"] == pytest.approx([None, 1 + 8 / 9])
    behind = stats.screen([*results[:2], run("p2", 0, [(5000, 25.0)], 5000)])["p2"]  # uniform was at 19 at 5k
    assert behind["equivalent_per_seed"] == [1.0] and behind["equivalent_at_most_per_seed"] == [True]
    # summary.json says that its how far is a bound, as speedups.md does ("≤ 1.00×"); an exact one says nothing
    assert report._screen_headline(behind)["how_far_at_most"] is True
    assert "how_far_at_most" not in report._screen_headline(screened["loss_decrease"])
    # no uniform curve at twice the step: nothing to say
    assert stats.screen([r for r in results if r["strategy"] != "uniform" or r["fid_history"][-1][0] < 10000]) == {}
    # A run stopped at 5k of N = 20k's schedule (a curriculum at a quarter of its way) says nothing about 2x at
    # N = 10k: no entry, rather than one that names N = 10k. N = 10k's runs (or results without N) are screened.
    quarter = [{**r, "steps_target": 20000} for r in results if r["strategy"] == "loss_decrease"]
    assert "loss_decrease" not in stats.screen([*results[:2], *quarter])
    half = [{**r, "steps_target": 10000} for r in results if r["strategy"] == "loss_decrease"]
    assert stats.screen([*results[:2], *half])["loss_decrease"] == screened["loss_decrease"]



def test_a_run_trained_to_the_end_of_half_uniforms_schedule_takes_the_screens_test_against_plain_uniform() -> None:
    """The budget form: a run with a 5k schedule (its rate annealed by 5k) beside uniform to 10k. Its own baseline
    (uniform_onecycle, also 5k steps) cannot say what uniform reaches at 10k: plain uniform does."""
    def run(strategy: str, seed: int, curve: list, steps_target: int | None, done: int | None = None) -> dict:
        return {"strategy": strategy, "seed": seed, "fid_history": curve, "stop_at": None, "steps_target": steps_target,
                "steps_done": done if done is not None else curve[-1][0]}

    results = [run("uniform", 0, [(5000, 20.0), (10000, 11.0)], 10000), run("uniform", 1, [(5000, 18.0), (10000, 9.0)], 10000),
               run("uniform_onecycle", 0, [(2500, 25.0), (5000, 12.0)], 5000),
               run("speed_onecycle", 0, [(2500, 20.0), (5000, 9.5)], 5000),
               run("speed_onecycle", 1, [(2500, 21.0), (5000, 10.0)], 5000),
               run("speed", 0, [(5000, 9.0), (10000, 6.0)], 10000),  # trained to 10k: no uniform at 20k, no entry
               {**run("p2", 0, [(5000, 12.0)], 10000), "stop_at": 5000}]  # a screen beside them, read first
    assert set(stats.screen(results)) == {"p2"}  # opt-in: report --budget
    screened = stats.screen(results, budget=True)
    assert set(screened) == {"uniform_onecycle", "speed_onecycle", "p2"} and "budget" not in screened["p2"]
    assert screened["speed_onecycle"] == {
        "step": 5000, "fid_per_seed": [9.5, 10.0], "baseline_fid_at_double": 10.0, "baseline_seeds": 2,
        "reaches_2x": True, "equivalent_per_seed": [None, 2.0], "equivalent_at_most_per_seed": [False, False],
        "budget": True, "baseline": "uniform"}
    # 12 is reached between 19 at 5k and 10 at 10k: 5000 + 7/9 * 5000 steps, over 5000
    assert screened["uniform_onecycle"]["reaches_2x"] is False
    assert screened["uniform_onecycle"]["equivalent_per_seed"] == pytest.approx([1 + 7 / 9])
    assert report._screen_headline(screened["speed_onecycle"])["budget"] is True
    # a run cut short of its schedule (killed, not yet resumed) is no budget run
    cut = [*results[:2], run("speed_onecycle", 0, [(2500, 20.0)], 5000, done=2600)]
    assert stats.screen(cut, budget=True) == {}
    from benchmarks.convergence.table import markdown

    table = markdown({"N": {}, "N_half": {}, "runs": [{"strategy": "speed_onecycle", "seed": s} for s in (0, 1)],
                      "screen": {"speed_onecycle": screened["speed_onecycle"]}})
    assert "| speed_onecycle | 0, 1 | 5k (its N) | 10.00 | 9.50 / 10.00 | never / 2.00× | yes |" in table
    assert '"its N": a run trained to the end of a schedule of that many steps, against plain uniform' in table


def test_the_screen_figure_is_drawn_only_for_a_screen(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks.convergence.plots import plot_screen

    results = [{"strategy": "uniform", "seed": 0, "fid_history": [(5000, 20.0), (10000, 10.0)]},
               {"strategy": "loss_decrease", "seed": 0, "fid_history": [(2500, 30.0), (5000, 12.0)], "stop_at": 5000},
               {"strategy": "speed", "seed": 0, "fid_history": [(5000, 15.0), (10000, 8.0)]}]
    plot_screen(results, stats.screen(results), tmp_path / "screen.png")
    assert (tmp_path / "screen.png").stat().st_size > 0
    plot_screen(results[:1] + results[2:], stats.screen(results[:1] + results[2:]), tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()  # no screened run: no figure

@pytest.mark.parametrize(("base", "solvers", "process"), [("fashion_mnist_sit.yaml", [], "flow"),
                                                           ("fashion_mnist_dit.yaml", ["heun-125"], "ddpm")])
def test_final_fids_of_the_other_process_are_refused_before_any_run(base, solvers, process, tmp_path: Path,
                                                                    home: Path) -> None:
    """The flow base with the default final solvers (ddim-50, ddpm-250), or a DDPM base with Heun, would fail only at N."""
    extra = ["--final-solvers", *solvers] if solvers else []
    proc = bench("convergence", ["launch", "--base", base, "--final-samples", "100", *extra, "--jobs", "uniform:0:10",
                                 "--out", str(tmp_path)], home)
    assert proc.returncode == 2 and f"do not all sample the {process} model of {base}" in proc.stderr
    assert not (tmp_path / "uniform_s0").exists()


# ------------------------------------------------------------------------------ strategy_cost.py
@pytest.fixture(scope="module")
def strategy_cost(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Namespace:
    """uniform, SpeeD and the adaptive loss_decrease sampler, each built as the convergence harness builds it from the
    DiT base, 2 repeats of one window each."""
    out = tmp_path_factory.mktemp("strategy_cost") / "cost.json"
    proc = run_script("strategy_cost", ["--smoke", "--runs", "uniform", "speed", "loss_decrease", "--repeats", "2",
                                        "--set", "ema.init_args.decay=0.99", "--out", str(out)], home)
    return Namespace(result=json.loads(out.read_text()), stdout=proc.stdout)


@needs_fashion_mnist
def test_strategy_cost_smoke_times_each_run_against_uniform(strategy_cost: Namespace) -> None:
    result = strategy_cost.result
    assert json.loads(strategy_cost.stdout[strategy_cost.stdout.rindex("\n{"):]) == result  # printed too
    assert result["card"] == "cpu" and result["smoke"] and result["base"] == "fashion_mnist_dit.yaml"
    assert result["batch_size"] == 64 and result["repeats"] == 2 and result["torch"] and result["lightning"]
    assert result["set"] == ["ema.init_args.decay=0.99"]
    assert result["command"].startswith("python -m benchmarks.strategy_cost --smoke --runs uniform speed")
    # every run once per repeat, the order rotated by one
    first, second = result["orders"]
    assert sorted(first) == ["loss_decrease", "speed", "uniform"] and second == first[1:] + first[:1]
    runs = result["runs"]
    assert set(runs) == {"uniform", "speed", "loss_decrease"}
    uniform = runs["uniform"]["steps_per_s"]
    for name, run in runs.items():
        assert run["configs"] == ["fashion_mnist_dit.yaml", *RUNS[name]]
        windows = run["windows"]
        assert len(windows) == 2 and all(w["steps"] > 0 and w["seconds"] > 0 for w in windows), name
        rates = [w["steps_per_s"] for w in windows]
        assert rates == [pytest.approx(w["steps"] / w["seconds"]) for w in windows], name
        assert run["steps_per_s"] == statistics.median(rates) and [run["min"], run["max"]] == [min(rates), max(rates)]
        assert run["ratio"] == pytest.approx(run["steps_per_s"] / uniform, rel=1e-12), name
        per_repeat = [w["steps_per_s"] / u["steps_per_s"] for w, u in zip(windows, runs["uniform"]["windows"])]
        assert run["ratios_per_repeat"] == pytest.approx(per_repeat, rel=1e-12), name
        # the strategy's callback and EMA train; evaluations, sample grids, checkpoints and logging do not
        assert "EMAWeightAveraging" in run["callbacks"], name
        assert ("TimestepCallback" in run["callbacks"]) == (name != "uniform"), name
        assert not {"FIDCallback", "SampleGridCallback", "ModelCheckpoint", "TimestepMonitor", "LearningRateMonitor",
                    "CheckpointOnSignal"} & set(run["callbacks"]), name
    assert runs["uniform"]["ratio"] == 1.0


@pytest.mark.parametrize(("option", "message"), [
    (["--runs", "uniform", "no_such_run"], "argument --runs: invalid choice: 'no_such_run'"),
    (["--base", "no_such_base.yaml"], "--base no_such_base.yaml: no such file in"),
    (["--set", "ema.init_args.decay"], "--set 'ema.init_args.decay': write KEY=VALUE"),
])
def test_strategy_cost_refuses_an_unknown_run_or_base_before_any_training(option: list[str], message: str,
                                                                          tmp_path: Path, home: Path) -> None:
    out = tmp_path / "cost.json"
    proc = bench("strategy_cost", ["--smoke", *option, "--out", str(out)], home, timeout=60)
    assert proc.returncode in (1, 2) and message in proc.stderr, proc.stderr
    assert "steps/s" not in proc.stdout and not out.exists()


# ------------------------------------------------------------------------------ convergence/table.py
def test_speedups_markdown_in_benchmarks_wording() -> None:
    """Hand-made speedups.json and step costs: every cell below is computed by hand in the comments."""
    from benchmarks.convergence.table import markdown

    def entry(per_seed, reverse, fids, mean=None, low=None, high=None, steps=10000, baseline="uniform", fid=4.6,
              at_least=None, at_most=None):
        return {"mean": mean, "min": low, "max": high, "per_seed": per_seed, "seeds": len(per_seed), "steps": steps,
                "fid_at_steps": fids, "equivalent_per_seed": reverse, "baseline": baseline, "baseline_fid": fid,
                "at_least": any(at_least or []), "at_least_per_seed": at_least or [False] * len(per_seed),
                "equivalent_at_most_per_seed": at_most or [False] * len(per_seed)}

    speedups = {
        "N": {  # per-seed lists follow "runs": fast's seed 1 comes first, the table lists seed 0 first
            "fast": entry([1.5, 1.2], [None, None], [4.0, 4.5], mean=1.35, low=1.2, high=1.5),
            "slow": entry([None], [0.74], [5.5]),  # never reached uniform's 4.6 by 10k: < 1, reverse 0.74
            "mixed": entry([1.1, None], [None, 0.9], [4.5, 5.0], high=1.1),  # seed 1 never reached it
        },
        "N_half": {"fast": entry([1.0, 1.0], [None, None], [8.5, 8.0], mean=1.0, low=1.0, high=1.0, steps=5000,
                                 baseline="uniform_cosine", fid=9.0),
                   # below uniform's FID at its first evaluation (a lower bound); uniform needs 1.4x the steps to
                   # reach its FID
                   "early": entry([1.0], [1.4], [7.0], mean=1.0, low=1.0, high=1.0, steps=5000, at_least=[True]),
                   # two seeds, one a bound; and a slow one that uniform beat already at its first evaluation
                   "both": entry([1.2, 1.0], [None, None], [8.0, 7.0], mean=1.1, low=1.0, high=1.2, steps=5000,
                                 at_least=[False, True]),
                   "behind": entry([None], [1.0], [12.0], steps=5000, at_most=[True]),
                   # both seeds bounds: the reverse views, in seed order, say how far ahead each is
                   "ahead": entry([1.0, 1.0], [1.3, 1.5], [6.0, 5.0], mean=1.0, low=1.0, high=1.0, steps=5000,
                                  at_least=[True, True])},
        "runs": [{"strategy": s, "seed": seed} for s, seed in
                 (("fast", 1), ("fast", 0), ("mixed", 0), ("mixed", 1), ("slow", 0), ("uniform", 0), ("scr", 3),
                  ("early", 0), ("both", 0), ("both", 1), ("behind", 0), ("ahead", 1), ("ahead", 0))],
        "screen": {"fast": {"step": 5000, "fid_per_seed": [6.0, 5.0], "baseline_fid_at_double": 6.5, "reaches_2x": True,
                            "equivalent_per_seed": [2.2, None], "equivalent_at_most_per_seed": [False, False]},
                   "scr": {"step": 500, "fid_per_seed": [9.0], "baseline_fid_at_double": 8.5, "reaches_2x": False,
                           "equivalent_per_seed": [0.8], "equivalent_at_most_per_seed": [True]}},
    }
    cost = {"card": "NVIDIA H100", "date": "2026-12-08", "batch_size": 64,
            "set": ["ema.init_args.decay=0.999", "model.compile_mode=reduce-overhead"],
            "runs": {"uniform": {"ratio": 1.0}, "fast": {"ratio": 0.8}, "slow": {"ratio": 0.5}}}  # no "mixed"
    assert markdown(speedups, cost) == "\n".join([
        "**Speed-up at N** (steps to the baseline's mean FID at the budget)",
        "",
        "| run | seeds | steps | baseline FID | FID per seed | speed-up | steps/s over uniform | wall-clock speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        # wall-clock: 1.35 x 0.8 = 1.08, 1.2 x 0.8 = 0.96, 1.5 x 0.8 = 1.20
        "| fast | 0, 1 | 10k | 4.60 | 4.50 / 4.00 | 1.35 (1.20–1.50) | 0.80 | 1.08 (0.96–1.20) |",
        "| mixed | 0, 1 | 10k | 4.60 | 4.50 / 5.00 | 1.10 / < 1 (0.90) | — | — |",  # not in the cost file
        "| slow | 0 | 10k | 4.60 | 5.50 | < 1 (0.74) | 0.50 | < 0.50 (0.37) |",  # < 1 x 0.5; 0.74 x 0.5 = 0.37
        "",
        "**Speed-up at N/2** (steps to the baseline's mean FID at the budget)",
        "",
        "| run | seeds | steps | baseline FID | FID per seed | speed-up | steps/s over uniform | wall-clock speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        "| ahead | 0, 1 | 5k | 4.60 | 5.00 / 6.00 | ≥ 1.00 (1.50 / 1.30) | — | — |",
        "| behind | 0 | 5k | 4.60 | 12.00 | < 1 (≤ 1.00) | — | — |",
        "| both | 0, 1 | 5k | 4.60 | 8.00 / 7.00 | ≥ 1.10 (1.00–1.20) | — | — |",
        "| early | 0 | 5k | 4.60 | 7.00 | ≥ 1.00 (1.40) | — | — |",
        "| fast | 0, 1 | 5k | 9.00 (uniform_cosine) | 8.00 / 8.50 | 1.00 (1.00–1.00) | 0.80 | 0.80 (0.80–0.80) |",
        "",
        "Step cost: python -m benchmarks.strategy_cost on NVIDIA H100, 2026-12-08, batch 64, compile mode "
        "reduce-overhead: wall-clock speed-up = speed-up × steps/s over uniform.",
        "",
        "**Screen** (FID at the stop step against the baseline's mean FID at twice it; how far each got: the "
        "baseline's steps to that FID, over the stop step)",
        "",
        "| run | seeds | steps | baseline FID at 2× steps | FID per seed | how far | reaches 2× |",
        "|---|---:|---:|---:|---:|---:|---|",
        "| fast | 0, 1 | 5k | 6.50 | 5.00 / 6.00 | never / 2.20× | yes |",  # seed 0's 6.0 is reached at 2.2x
        "| scr | 3 | 500 | 8.50 | 9.00 | ≤ 0.80× | no |",
        "",
    ])
    plain = markdown(speedups)  # no cost file: no cost columns
    assert "| run | seeds | steps | baseline FID | FID per seed | speed-up |\n" in plain and "steps/s" not in plain
    assert "| slow | 0 | 10k | 4.60 | 5.50 | < 1 (0.74) |\n" in plain
    # one of three runs short of the budget: which seeds count is unknown, so their number, in the runs' order
    short = {"N": {"fast": speedups["N"]["fast"]}, "runs": [*speedups["runs"], {"strategy": "fast", "seed": 2}]}
    assert "| fast | 2 | 10k | 4.60 | 4.00 / 4.50 | 1.35 (1.20–1.50) |\n" in markdown(short)


def _screen_folder(tmp_path: Path) -> list[str]:
    """The committed study screen's raw results under tmp_path, and its report's arguments."""
    for folder in ("study_screen", "convergence_dit_ema999"):
        copy_raw_results(folder, tmp_path)
    return ["report", "--no-plots", "--no-summary", "--out", str(tmp_path / "study_screen"),
            "--include", str(tmp_path / "convergence_dit_ema999")]


@pytest.mark.parametrize(("command", "content", "message"), [
    ("report", None, "no such file"),
    ("launch", None, "no such file"),
    ("report", "{not json", "is not JSON"),
    ("report", '{"runs": {"speed": {"ratio": "fast"}}}', 'has no "runs" with a numeric "ratio"'),
])
def test_convergence_refuses_a_missing_or_garbled_cost_file_before_any_work(command: str, content: str | None,
                                                                            message: str, tmp_path: Path, home: Path) -> None:
    cost = tmp_path / "cost.json"
    if content is not None:
        cost.write_text(content)
    args = _screen_folder(tmp_path)
    if command == "launch":
        args = ["launch", "--smoke", "--jobs", "uniform:0:2", "--out", str(tmp_path / "study_screen")]
    proc = bench("convergence", [*args, "--cost", str(cost)], home, timeout=60)
    assert proc.returncode == 2 and f"--cost {cost}" in proc.stderr and message in proc.stderr, proc.stderr
    assert not list((tmp_path / "study_screen").glob("speedups.*")) and not (tmp_path / "study_screen" / "logs").exists()


def test_report_writes_speedups_md_with_the_costs_of_the_runs_the_cost_file_has(tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.convergence.__main__ import parser

    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"card": "cpu", "date": "2026-12-08", "base": "fashion_mnist_dit.yaml", "batch_size": 64,
                                "runs": {"uniform": {"ratio": 1.0}, "speed": {"ratio": 0.5}}}))  # no study candidate
    report.report(parser().parse_args([*_screen_folder(tmp_path), "--cost", str(cost)]))
    out = tmp_path / "study_screen"
    assert (out / "speedups.json").read_bytes() == (RESULTS / "study_screen" / "speedups.json").read_bytes()
    table = (out / "speedups.md").read_text()
    assert table in capsys.readouterr().out  # printed too
    # speed at 10k: 1.3042581741035766 x 0.5 = 0.652; the screened candidates have no cost
    assert "| speed | 0 | 10k | 6.81 | 5.98 | 1.30 | 0.50 | 0.65 |\n" in table
    assert "| curriculum_speed | 0 | 5k | 10.80 | 9.61 | 1.03 | — | — |\n" in table
    assert "| laplace_log_snr | 0 | 5k | 10.80 | 14.32 | < 1 (0.93) | — | — |\n" in table
    assert "| laplace_log_snr | 0 | 5k | 6.81 | 14.32 | 0.93× | no |\n" in table
    assert "on cpu, 2026-12-08, batch 64, the base's compile mode: wall-clock" in table  # the cost file sets none


@pytest.mark.parametrize(("base", "batch"), [("fashion_mnist.yaml", 64), ("fashion_mnist_dit.yaml", 256)])
def test_report_refuses_a_cost_measured_on_another_base_or_batch(base: str, batch: int, tmp_path: Path) -> None:
    from benchmarks.convergence.__main__ import parser

    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"base": base, "batch_size": batch, "runs": {"uniform": {"ratio": 1.0}}}))
    with pytest.raises(ValueError, match=rf"measured on {base} at batch {batch}, but the runs train "
                                         r"fashion_mnist_dit.yaml at batch 64: .* --base fashion_mnist_dit.yaml --batch-size 64"):
        report.report(parser().parse_args([*_screen_folder(tmp_path), "--cost", str(cost)]))
    assert not (tmp_path / "study_screen" / "speedups.md").exists()



def test_report_of_a_folder_without_results_says_so(tmp_path: Path, capsys) -> None:
    """A launch whose runs all failed or never started ends in its report: a line, not a KeyError."""
    from benchmarks.convergence.__main__ import parser

    args = parser().parse_args(["report", "--no-plots", "--no-summary", "--out", str(tmp_path)])  # a launch made the folder
    assert report.report(args) == {}
    assert "no results to report yet" in capsys.readouterr().out


def test_report_screens_runs_trained_to_half_of_uniforms_schedule_only_when_asked(tmp_path: Path) -> None:
    """The UNet folder holds strategies trained to N = 10k beside uniform to 20k: report --budget reads them against
    uniform's FID at 20k; a plain report leaves its committed tables as they are."""
    from benchmarks.convergence.__main__ import parser

    copy_raw_results("convergence", tmp_path)
    args = ["report", "--no-plots", "--no-summary", "--out", str(tmp_path / "convergence")]
    assert "screen" not in report.report(parser().parse_args(args))
    screened = report.report(parser().parse_args([*args, "--budget"]))["screen"]
    assert screened["min_snr"]["budget"] is True and screened["min_snr"]["step"] == 10000
    assert screened["min_snr"]["baseline"] == "uniform" and screened["min_snr"]["baseline_fid_at_double"] > 0
