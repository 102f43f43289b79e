"""Fixtures shared by the test files; pytest loads this module itself.

Plain helper functions that tests import by name (fake data sets, float64 tolerances) are in
``_fixtures.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The test models are tiny: one thread per process is as fast as two, and it keeps the suite's
# subprocesses (CLI runs, DDP ranks, benchmark smokes) from oversubscribing the CI machine's two
# cores, where OpenMP's spinning threads make a step of a tiny model many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# What Lightning's DDP strategy writes into os.environ when a test runs it in the pytest process (even
# with one device): left there, a later test's DDP subprocess inherits the port of a store that this
# process still holds and fails with EADDRINUSE.
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "RANK",
                   "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@pytest.fixture(autouse=True)
def _no_distributed_env_leaks() -> object:
    before = {key: os.environ.get(key) for key in DISTRIBUTED_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


REPO = Path(__file__).resolve().parents[1]
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def have_fashion_mnist() -> bool:
    """The four Fashion-MNIST files are installed (apt-get install dataset-fashion-mnist), gzipped or not."""
    return all((FASHION_ROOT / f).is_file() or (FASHION_ROOT / (f + ".gz")).is_file() for f in FASHION_FILES)


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the CLI inside tmp_path: no network, FID statistics cached in tmp_path, no stray argv."""
    from lightning_speed.metrics import features as features_module
    from lightning_speed.metrics import reference as reference_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-speed"])  # main(args=...) must not see pytest's arguments
    monkeypatch.setattr(reference_module, "DEFAULT_CACHE_DIR", tmp_path / "fid-cache")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no Inception file from a real cache

    def offline(url: str, dst: Path, timeout: float) -> None:
        raise OSError("network disabled in the test suite")

    monkeypatch.setattr(features_module, "_download", offline)
    return tmp_path


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of tests/ddp_script.py: one real 2-process DDP launch on CPU (gloo) whose parts the tests of
    test_fid_callback.py (``fid/``), test_ddp_callbacks.py (``callbacks/``) and test_distributed.py (``sigterm/``)
    check; one launch, because every process start-up imports torch and Lightning."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(out)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_script.py"), str(out)],
                          cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out
