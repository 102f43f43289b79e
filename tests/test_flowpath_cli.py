"""The flow base composed with each strategy that has a flow form trains two CPU steps through the real CLI, and the
times it trains on come from the composed strategy, with the shift that the module's solvers sample with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from benchmarks.common import smoke_args
from conftest import have_fashion_mnist  # pytest puts tests/ on sys.path (no __init__.py there)
from lightning_speed import flow
from lightning_speed.cli import main
from lightning_speed.module import DiffusionModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE = CONFIGS / "fashion_mnist_sit.yaml"
FLOW_FILES = sorted((CONFIGS / "flow").glob("*.yaml"))
STRATEGY_FILES = [p for p in FLOW_FILES if "timesteps" in yaml.safe_load(p.read_text())]
SHIFT_FILES = [p for p in FLOW_FILES if p not in STRATEGY_FILES]
SHARED = [CONFIGS / "strategies" / f"{name}.yaml" for name in ("speed_auto", "logit_normal", "min_snr")]
RUNS = [(p,) for p in [*STRATEGY_FILES, *SHARED]] + [(p, s) for p in (SHARED[0], *STRATEGY_FILES) for s in SHIFT_FILES]


def rel(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


@pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST is not installed (dataset-fashion-mnist)")
@pytest.mark.parametrize("files", RUNS, ids=lambda files: "+".join(map(rel, files)))
def test_the_flow_base_with_each_flow_strategy_trains_two_cpu_steps(files: tuple[Path, ...], cli_env: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sampling(self: DiffusionModule, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("two training steps generated images")

    monkeypatch.setattr(DiffusionModule, "sample", no_sampling)
    composed: dict[str, Any] = {}
    for path in (BASE, *files):
        composed = {**composed, **yaml.safe_load(path.read_text())}
    args = ["fit", "--config", str(BASE), *(a for f in files for a in ("--config", str(f))),
            *smoke_args("lightning_speed.backbones.DiT"),
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_checkpointing", "false", "--checkpoint", "null", "--fid", "null", "--final_fid", "null",
            "--samples", "null", "--trainer.logger.init_args.save_dir", str(cli_env / "runs"),
            "--data.init_args.batch_size", "4", "--data.init_args.val_images", "4", "--data.init_args.on_device", "false"]
    drawn: list[torch.Tensor] = []
    train_step = DiffusionModule.training_step

    def record(self: DiffusionModule, batch: Any, batch_idx: int) -> Any:
        out = train_step(self, batch, batch_idx)
        drawn.append(self.timesteps.last.t.clone())
        return out

    monkeypatch.setattr(DiffusionModule, "training_step", record)
    cli = main(args)
    model = cli.model
    assert cli.trainer.global_step == 2 and len(drawn) == 2
    shift = float(composed["model"].get("shift", 1.0))
    assert model.process == "flow" and model.noise_schedule.shift == shift
    strategy = composed["timesteps"]["class_path"].rsplit(".", 1)[-1]
    timesteps = model.timesteps
    installed = {type(timesteps.sampler).__name__, type(timesteps.weights).__name__}
    assert strategy in installed
    # the strategy draws on the schedule the solvers sample with: the same shift on both sides
    assert timesteps.schedule.shift == shift and timesteps.sampler.schedule.shift == shift
    t = torch.cat(drawn)
    assert t.dtype == torch.float32 and bool(((t > 0) & (t < 1)).all())
    grid = flow.time_grid(4, model.noise_schedule.shift)
    torch.testing.assert_close(grid, flow.shift_time(torch.linspace(1.0, 0.0, 5, dtype=torch.float64), shift))
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
