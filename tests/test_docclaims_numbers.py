"""Numbers and commands of docs/timestep_analysis.md, flow_matching.md, performance.md and benchmarking.md, checked
against the code and the committed results they quote."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from lightning_speed import analysis, flow
from lightning_speed.flow import FlowSchedule
from lightning_speed.schedules import NoiseSchedule, auto_tau
from lightning_speed.timesteps import CosMapSampling, LogitNormalSampling, ModeSampling, SpeeD, UniformSampling

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
RESULTS = REPO / "benchmarks" / "results"


def doc(name: str) -> str:
    return (DOCS / name).read_text()


def flat(text: str) -> str:
    """The prose with its line breaks as spaces, so a phrase can be found across a wrapped line."""
    return re.sub(r"\s+", " ", text)


def result(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def table(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after ``heading``."""
    rows, seen = [], False
    for line in text[text.index(heading):].splitlines()[1:]:
        if line.startswith("|"):
            seen = True
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif seen:
            break
    return [r for r in rows[1:] if not set("".join(r)) <= set("-: ")]


# ------------------------------------------------------------------ timestep_analysis.md
def test_timestep_analysis_output_is_the_commands(capsys):
    text = doc("timestep_analysis.md")
    shown = re.findall(r"```\n(schedule=.*?)```", text, re.S)[0]
    analysis.main(["--schedule", "linear", "--num-timesteps", "1000"])
    assert capsys.readouterr().out == shown


def test_timestep_analysis_pivots():
    text = flat(doc("timestep_analysis.md"))
    found = re.search(r"(\d+) for linear, (\d+) for cosine, (\d+) for quadratic at T = 1000", text)
    assert found, "docs/timestep_analysis.md no longer states the pivots"
    pivots = [auto_tau(NoiseSchedule.create(name, 1000)) for name in ("linear", "cosine", "quadratic")]
    assert [int(g) for g in found.groups()] == pivots


def test_notebook_convergence_share():
    """The notebook's share of uniform draws in the convergence area, at the paper's tau and at the automatic one."""
    cell = json.loads((REPO / "notebooks" / "timestep_analysis.ipynb").read_text())["cells"][0]
    text = flat("".join(cell["source"]))
    found = re.search(r"spends (\d+)% of its draws on at the paper's \$\\tau = (\d+)\$ \((\d+)% at the automatic "
                      r"\$\\tau = (\d+)\$\)", text)
    assert found, "the notebook no longer states the convergence share"
    share, tau, auto_share, auto = (int(g) for g in found.groups())
    assert auto == auto_tau(NoiseSchedule.create("linear", 1000))
    for t, pct in ((tau, share), (auto, auto_share)):
        fraction = analysis.analyse("linear", 1000, tau=t).areas.fractions()["convergence"]
        assert round(100 * fraction) == pct


# ------------------------------------------------------------------ flow_matching.md
def percent(cell: str) -> float:
    return float(cell.replace("%", "").strip()) / 100


FLOW_ROWS = {
    "flow uniform": lambda: UniformSampling().bind(FlowSchedule(1.0)),
    "flow uniform, shift 3": lambda: UniformSampling().bind(FlowSchedule(3.0)),
    "flow logit-normal (0, 1)": lambda: LogitNormalSampling(0.0, 1.0).bind(FlowSchedule(1.0)),
    "flow logit-normal (0, 1), shift 3": lambda: LogitNormalSampling(0.0, 1.0).bind(FlowSchedule(3.0)),
    "flow mode 1.29": lambda: ModeSampling(1.29).bind(FlowSchedule(1.0)),
    "flow cosmap": lambda: CosMapSampling().bind(FlowSchedule(1.0)),
    "flow SpeeD k 5": lambda: SpeeD(k=5, dual=False).bind(FlowSchedule(1.0)),
    "flow SpeeD k 5, dual": lambda: SpeeD(k=5, dual=True).bind(FlowSchedule(1.0)),
    "flow SpeeD k 5, shift 3": lambda: SpeeD(k=5, dual=False).bind(FlowSchedule(3.0)),
    "flow SpeeD k 5, dual, shift 3": lambda: SpeeD(k=5, dual=True).bind(FlowSchedule(3.0)),
}
DISCRETE_ROWS = {
    "discrete uniform": UniformSampling,
    "discrete SpeeD k 5": lambda: SpeeD(k=5, dual=False),
    "discrete SpeeD k 5, dual": lambda: SpeeD(k=5, dual=True),
}


def test_flow_share_table():
    """Each row's shares, rounded to 0.1 %, are those of the sampler's exact CDF (flow) or probabilities (linear)."""
    rows = table(doc("flow_matching.md"), "### Shares of draws per area")
    assert {r[0] for r in rows} == set(FLOW_ROWS) | set(DISCRETE_ROWS)
    tau = flow.auto_tau()
    linear = NoiseSchedule.create("linear", 1000)
    for name, *cells in rows:
        if name in FLOW_ROWS:
            below = FLOW_ROWS[name]().cdf_at(torch.tensor([0.5, tau], dtype=torch.float64)).double().tolist()
            shares = [below[0], below[1] - below[0], 1 - below[1]]
        else:
            p = DISCRETE_ROWS[name]().bind(linear).probabilities().double()
            shares = [float(p[:219].sum()), float(p[219:700].sum()), float(p[700:].sum())]
        assert [percent(c) for c in cells] == pytest.approx(shares, abs=0.0005 + 1e-6), name


def test_flow_areas_table():
    rows = table(doc("flow_matching.md"), "The areas (`flow.flow_areas(\"auto\")`)")
    tau = flow.auto_tau()
    assert [(r[0], percent(r[2])) for r in rows] == [
        ("acceleration", pytest.approx(0.5, abs=0.0005)),
        ("deceleration", pytest.approx(tau - 0.5, abs=0.0005)),
        ("convergence", pytest.approx(1 - tau, abs=0.0005)),
    ]
    assert f"tau = {tau:.4f}" in doc("flow_matching.md")


def test_flow_measured_speedups_are_the_summarys():
    found = re.search(r"reaches uniform's FID at 10k ([\d.]+)× sooner and SD3's logit-normal ([\d.]+)× sooner; at 5k "
                      r"both are ([\d.]+)×", flat(doc("flow_matching.md")))
    assert found, "docs/flow_matching.md no longer states the flow speed-ups"
    summary = result("summary.json")
    full, half = summary["speedup_flow"], summary["speedup_flow_half"]
    assert float(found[1]) == round(full["speed_auto"]["mean"], 2)
    assert float(found[2]) == round(full["logit_normal"]["mean"], 2)
    assert float(found[3]) == round(half["speed_auto"]["mean"], 2) == round(half["logit_normal"]["mean"], 2)


# ------------------------------------------------------------------ performance.md
def test_performance_fid_times_are_the_results():
    text = flat(doc("performance.md"))
    unet = re.search(r"took ([\d.]+) s this way against ([\d.]+) s eager", text)
    dit = re.search(r"takes ([\d.]+) s on an H100 this way; timed per forward, the same network takes ([\d.]+) s with "
                    r"a separate GELU", text)
    assert unet and dit, "docs/performance.md no longer states the FID times"
    fid = result("fid_speed.json")
    assert (float(unet[1]), float(unet[2])) == (round(fid["compiled"]["seconds"]["10000"], 1),
                                                round(fid["eager"]["seconds"]["10000"], 1))
    epilogue = result("fid_speed_dit_epilogue_h100.json")["compiled"]["seconds"]["10000"]
    roofline = result("dit_roofline_epilogue_h100.json")
    assert roofline["backbone_calls_per_fid"] == 1000  # so ms per forward are s per FID
    assert (float(dit[1]), float(dit[2])) == (round(epilogue, 1),
                                              round(roofline["fid_seconds"]["autocast-unfused-default"], 1))


def test_performance_training_ratios_are_the_results():
    text = flat(doc("performance.md"))
    layout = re.search(r"train (\d+) % faster at batch 512, where the profiler had found (\d+) % of the step in layout",
                       text)
    hosts = re.search(r"0.87 on an unsteady one, ([\d.]+)–([\d.]+) on H200 hosts", text)
    ema = re.search(r"\(([\d.]+)× the training rate of Lightning's at batch 128", text)
    assert layout and hosts and ema, "docs/performance.md no longer states the training ratios"
    profile = result("step_profile.json")
    at_512 = profile["calls"][1]["images_per_s"]["512"]
    assert int(layout[1]) == round(100 * (at_512["channels_last"] / at_512["base"] - 1))
    assert int(layout[2]) == round(100 * profile["breakdown"]["fraction"]["layout_conversion"])
    h200 = [result(f)["rows"]["128"]["ratios"]["b_over_a"] for f in
            ("throughput_h200.json", "throughput_h200_logskip.json", "throughput_h200_host_probe.json",
             "throughput_h200_profile.json")]
    assert (float(hosts[1]), float(hosts[2])) == (round(min(h200), 2), round(max(h200), 2))
    assert float(ema[1]) == round(result("throughput.json")["rows"]["128"]["ratios"]["d_over_d_lightning"], 1)


# ------------------------------------------------------------------ benchmarking.md
def tool_options(tool: str, monkeypatch, capsys) -> set[str]:
    """The options of ``python -m benchmarks.<tool>``, read from its --help."""
    module = importlib.import_module(f"benchmarks.{tool}" + (".__main__" if tool == "convergence" else ""))
    if hasattr(module, "parser"):
        return set(re.findall(r"--[a-z][a-z-]*", module.parser().format_help()))
    monkeypatch.setattr(sys, "argv", [tool, "--help"])
    with pytest.raises(SystemExit):
        module.main()
    return set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))


def test_benchmarking_commands_take_their_options(monkeypatch, capsys):
    blocks = re.findall(r"```bash\n(.*?)```", doc("benchmarking.md"), re.S)
    commands = [re.sub(r"\s*#.*", "", line) for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    used: dict[str, set[str]] = {}
    for command in commands:
        for tool, rest in re.findall(r"python -m benchmarks\.(\w+)(.*?)(?:;|$)", command):
            used.setdefault(tool, set()).update(re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest))
    assert {"convergence", "strategy_cost"} <= set(used)
    prose = set(re.findall(r"`(--[a-z][a-z-]*)", doc("benchmarking.md")))  # options named in the text, of either tool
    used["convergence"] |= prose - tool_options("strategy_cost", monkeypatch, capsys)
    for tool, options in used.items():
        missing = options - tool_options(tool, monkeypatch, capsys)
        assert not missing, f"docs/benchmarking.md gives python -m benchmarks.{tool} {sorted(missing)}"
