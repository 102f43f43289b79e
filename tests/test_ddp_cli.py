"""Several processes through the CLI: the README's DDP commands (Lightning's launcher, torchrun, srun) on 2 CPU
processes (gloo), with EMA, the time-step monitor, sample grids and FID on, and the EMA copy they depend on."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from lightning_speed import DiffusionModule
from lightning_speed.backbones import UNet
from lightning_speed.callbacks import EMAWeightAveraging

from _fixtures import blob_loader, cpu_trainer  # pytest puts tests/ on sys.path
from conftest import DISTRIBUTED_ENV, have_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["configs/quickstart.yaml", "configs/strategies/speed.yaml", "configs/multi_gpu/ddp.yaml"]
STEPS = 4
TIMEOUT = 240  # seconds; a run takes about 15 on 2 CPU cores, and ranks waiting on each other never end
SMALL = [  # CPU-sized steps, grid and FID; every callback of the configs stays on
    "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", str(STEPS),
    "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
    "--data.init_args.batch_size", "8", "--data.init_args.val_images", "16",
    "--monitor.init_args.log_every_n_steps", "2",
    "--samples.init_args.every_n_steps", str(STEPS), "--samples.init_args.num_samples", "4",
    "--samples.init_args.solver_steps", "2",
    "--fid.init_args.num_samples", "16", "--fid.init_args.batch_size", "8", "--fid.init_args.solver_steps", "2",
    "--fid.init_args.num_reference", "64",
]  # fmt: skip


class _CLIOptimizer:
    """What LightningCLI passes as ``optimizer``: a callable that holds objects a deep copy cannot copy (the CLI,
    its parser and trainer, with thread locks under DDP)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self, params):
        return torch.optim.SGD(params, lr=0.1)


def test_ema_copies_the_weights_and_shares_the_optimizer_factory() -> None:
    backbone = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                    attention_resolutions=[])
    model = DiffusionModule(backbone, optimizer=_CLIOptimizer(), solver_steps=2)
    ema = EMAWeightAveraging(decay=0.5)
    cpu_trainer(max_steps=3, callbacks=[ema]).fit(model, blob_loader(n=48, batch_size=16))
    average = ema._average_model.module
    assert ema.n_averaged == 3
    assert average.optimizer_factory is model.optimizer_factory  # shared, not copied
    # the weights are the copy's own
    own, copied = model.state_dict(), average.state_dict()
    assert own.keys() == copied.keys()
    assert not {t.untyped_storage().data_ptr() for t in own.values()} & {
        t.untyped_storage().data_ptr() for t in copied.values()}


# ------------------------------------------------------------------------------ the README's commands
def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    python_path = [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
    # HOME and TORCH_HOME: the FID's reference statistics are computed and cached in the test's folder
    return {**env, "PYTHONPATH": os.pathsep.join(python_path), "HOME": str(home), "TORCH_HOME": str(home / "torch"),
            "OMP_NUM_THREADS": "1"}


def _run(command: list[str], cwd: Path, tasks: tuple[dict[str, str], ...] = ({},)) -> str:
    """Run ``command`` once per task (its extra environment; rank 0's first), each with its ranks in a process group
    of its own; rank 0's output, after checking that every task succeeded."""
    procs = [subprocess.Popen(command, cwd=cwd, env={**_env(cwd), **task}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for task in tasks]
    outs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for each in procs:
                os.killpg(each.pid, signal.SIGKILL)  # the ranks too, not only the launcher
            out, _ = proc.communicate()
            pytest.fail(f"{' '.join(command[:4])} ... still ran after {TIMEOUT} s (ranks waiting on each other):\n"
                        f"{out[-4000:]}")
        assert proc.returncode == 0, out[-4000:]
        outs.append(out)
    assert "Starting with 2 processes" in outs[0]
    return outs[0]


def _config_args(base: str = CONFIGS[0]) -> list[str]:
    return [arg for path in (base, *CONFIGS[1:]) for arg in ("--config", str(REPO / path))]


def _check_run(cwd: Path, runs: str = "runs/speed") -> None:
    """One run folder, by rank 0, with the TensorBoard scalars of the loss, the monitor and the FID, the last grid,
    and a checkpoint holding the EMA average next to the training weights."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [p.name for p in (cwd / runs).iterdir()] == ["version_0"]
    run = cwd / runs / "version_0"
    strategy = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_speed.distributed.SyncFreeDDPStrategy"

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "train/loss" in scalars and "timesteps/share/convergence" in scalars  # the monitor saw SpeeD's sampling
    fid = events.Scalars("fid")
    assert [e.step for e in fid] == [STEPS] and math.isfinite(fid[0].value) and fid[0].value > 0
    assert (run / f"samples_step{STEPS}.png").is_file()

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS
    assert int(ckpt["averaging_state"]["n_averaged"]) == STEPS  # updated after every step
    average, training = ckpt["state_dict"], ckpt["current_model_state"]
    assert average.keys() == training.keys()
    assert all(torch.isfinite(t).all() for t in average.values() if t.is_floating_point())
    assert any(not torch.equal(average[k], training[k]) for k in average)  # an average, not the weights


def _command() -> list[str]:
    script = Path(sys.executable).with_name("lightning-speed")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lightning_speed"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_docs_ddp_command_on_two_cpu_processes(tmp_path: Path) -> None:
    """docs/multi_gpu.md's one-node command, ``lightning-speed fit --config BASE --config STRATEGY --config
    configs/multi_gpu/ddp.yaml --trainer.devices N``: Lightning starts the second process itself. On the docs' base,
    fashion_mnist.yaml, every rank holds the images and trains on its own shard through the on-device loader (CUDA
    graphs off: compiling on a CPU takes minutes); without its files, on the quickstart's."""
    if not have_fashion_mnist():
        _run([*_command(), "fit", *_config_args(), *SMALL], tmp_path)
        _check_run(tmp_path)
        return
    _run([*_command(), "fit", *_config_args("configs/fashion_mnist.yaml"), *SMALL, "--model.compile_mode", "null"],
         tmp_path)
    _check_run(tmp_path, "runs/fashion_mnist/speed")
    config = yaml.safe_load((tmp_path / "runs/fashion_mnist/speed/version_0/config.yaml").read_text())
    assert config["data"]["class_path"].endswith("FashionMNISTDataModule") and config["data"]["init_args"]["on_device"]


def test_docs_srun_command_on_one_node_of_two_cpu_processes(tmp_path: Path) -> None:
    """docs/multi_gpu.md's SLURM command with one node: srun starts one process per task with SLURM's variables, from
    which Lightning takes the ranks (its SLURMEnvironment); here the test sets them."""
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
             "SLURM_JOB_NAME": "speed", "SLURM_JOB_ID": "1", "SLURM_NODELIST": "127.0.0.1",
             "MASTER_PORT": str(_free_port())}
    _run([*_command(), "fit", *_config_args(), *SMALL, "--trainer.num_nodes", "1"], tmp_path,
         tasks=tuple({**slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)} for r in (0, 1)))
    _check_run(tmp_path)


def test_readme_torchrun_command_on_one_node_of_two_cpu_processes(tmp_path: Path) -> None:
    """The README's multi-node command with one node: torchrun starts both processes and sets their ranks."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # the ``torchrun`` command
    _run([*torchrun, "--nnodes", "1", "--nproc_per_node", "2", "--node_rank", "0", "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), "-m", "lightning_speed", "fit", *_config_args(), *SMALL,
          "--trainer.num_nodes", "1"], tmp_path)
    _check_run(tmp_path)
