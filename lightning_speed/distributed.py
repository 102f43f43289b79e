"""Lightning's DDP without its per-step wait for the GPU, which keeps a fast compiled step from scaling.

``SyncFreeDDPStrategy`` is ``lightning.pytorch.strategies.DDPStrategy`` (same arguments, same gradients) with two
arguments of its own, each able to restore Lightning's behaviour:

- ``sigterm_check_lag``: Lightning 2.6 broadcasts rank 0's SIGTERM flag at the start of every training step and reads
  it back with ``.item()`` (Lightning-AI/pytorch-lightning#21487). That read waits for the GPU to finish everything
  queued, so the host cannot run ahead, and its per-step Python work (the loop, callbacks, logging, kernel launches)
  is added to every step instead of overlapping the GPU's work. Here each step still combines the ranks' flags,
  copies the result to pinned host memory without waiting and records a CUDA event; the decision at step s reads the
  flags of step s - lag, whose event has long completed. Every rank decides at the same step, so all ranks stop
  together, ``lag`` steps later than with Lightning's check (0 decides at the step of the signal, with Lightning's
  wait). During a fit the strategy also handles SIGTERM itself: Lightning's handler runs a broadcast inside the
  signal handler, which pairs with whatever collective the other ranks are in (e.g. DDP's gradient all-reduce) and
  hangs the run, and it sets a flag on which Lightning's loops stop the signalled rank alone. This strategy's handler
  only records the signal (after forwarding SIGTERM, as Lightning does, to the processes Lightning started); the
  per-step check above then stops every rank.
- ``init_stream``: Lightning builds ``DistributedDataParallel`` inside a new CUDA stream, which puts DDP's gradient
  accumulators on that side stream while forward and backward run on the current stream (PyTorch then warns that
  "The AccumulateGrad node's stream does not match..." and synchronises the two streams per parameter;
  Lightning-AI/pytorch-lightning#21567). ``"current"`` builds DDP on the current stream, as plain PyTorch does, and
  silences the warning. Measured on 2 H200s it was not faster: 2 % slower for the UNet, equal for DiT-B/2
  (``benchmarks/results/ddp_scaling_h200x2_bucket/``), so ``"side"``, Lightning's, is the default.

Select it in YAML (``configs/multi_gpu/ddp.yaml`` does)::

    trainer:
      strategy:
        class_path: lightning_speed.distributed.SyncFreeDDPStrategy
        init_args: {static_graph: true, gradient_as_bucket_view: true}

BENCHMARKS.md, under multi-GPU scaling, has the measurements.
"""

from __future__ import annotations

import signal
from collections import deque
from contextlib import nullcontext
from types import FrameType
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_speed.validation import check_choice, check_int

InitStream = Literal["current", "side"]

RANK_SEED_STRIDE = 1_000_003
"""Seed distance between consecutive global ranks (a prime), for generators that must differ from rank to rank."""


def rank_seed(seed: int, rank: int) -> int:
    """``seed`` moved by ``rank`` strides, as a valid torch seed."""
    return (seed + RANK_SEED_STRIDE * rank) % 2**63


def received_stop_signal(trainer: pl.Trainer) -> bool:
    """Whether this rank received a stop signal: Lightning's flag, or one ``SyncFreeDDPStrategy`` has recorded and its
    per-step check has not yet acted on."""
    return bool(getattr(trainer, "received_sigterm", False) or getattr(trainer.strategy, "received_signal", False))


class LaggedSigtermCheck:
    """Every rank learns whether any rank received SIGTERM ``lag`` steps later, without waiting for the GPU.

    Called once per training step on every rank (in place of Lightning's per-step check); raises
    ``SIGTERMException`` on every rank at the same step once some rank's flag of ``lag`` steps ago was set.
    """

    def __init__(self, trainer: pl.Trainer, lag: int) -> None:
        self.trainer, self.lag = trainer, lag
        self.pending: deque[tuple[Tensor, torch.cuda.Event | None]] = deque()

    def __call__(self) -> None:
        device = self.trainer.strategy.root_device
        # torch.full launches a fill kernel: no host-to-device copy (torch.tensor([...], device=...) would wait)
        flag = torch.full((1,), int(received_stop_signal(self.trainer)), dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # NCCL: queued on the GPU; the host does not wait
        if device.type == "cuda":
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((host, event))
        else:  # gloo on the CPU: the all-reduce has already finished
            self.pending.append((flag, None))
        if len(self.pending) <= self.lag:
            return
        host, event = self.pending.popleft()
        if event is not None:
            event.synchronize()  # recorded lag steps ago: done unless the host is lag steps ahead of the GPU
        if int(host[0]) == 1:
            connector = getattr(self.trainer, "_signal_connector", None)
            if connector is not None:
                connector.received_sigterm = True  # trainer.received_sigterm, now on every rank
            dist.barrier()  # every rank reaches this at the same step; leave together
            raise SIGTERMException()


class SyncFreeDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with no host-device wait per step.

    Args:
        sigterm_check_lag: steps between rank 0's SIGTERM flag being broadcast and every rank acting on it; 0 is
            Lightning's per-step check, which waits for the GPU at every step.
        init_stream: the CUDA stream ``DistributedDataParallel`` is built on: ``"side"`` (Lightning's: a new stream)
            or ``"current"`` (that of forward and backward).
        *args, **kwargs: ``DDPStrategy``'s (``static_graph``, ``gradient_as_bucket_view``, ``bucket_cap_mb``, ...).
    """

    def __init__(self, *args: Any, sigterm_check_lag: int = 2, init_stream: InitStream = "side", **kwargs: Any) -> None:
        lag = check_int(sigterm_check_lag, "sigterm_check_lag", minimum=0,
                        hint="steps; 0 is Lightning's per-step check, 2 the default")
        super().__init__(*args, **kwargs)
        self.sigterm_check_lag = lag
        self.init_stream = check_choice(init_stream, "init_stream", get_args(InitStream))
        self.received_signal = False  # a stop signal this rank received, for the per-step check to act on
        self._signal_connector: Any = None

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        loop = trainer.fit_loop.epoch_loop
        # Lightning's per-step check is a private method of the training loop, called under DDP only; a Lightning
        # without it has no wait to remove. The trainer registers the connector's handler after this setup.
        if (trainer.state.fn == TrainerFn.FITTING and trainer.world_size > 1
                and hasattr(type(loop), "_broadcast_sigterm_tensor")):
            loop._broadcast_sigterm_tensor = LaggedSigtermCheck(trainer, self.sigterm_check_lag)
            self.received_signal = False
            self._signal_connector = trainer._signal_connector
            self._signal_connector._sigterm_notifier_fn = self._record_signal

    def _record_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM handler in place of Lightning's (``CheckpointOnSignal`` routes SIGINT here too): forward SIGTERM as
        Lightning does, then only record the signal.

        No collective here (it would pair with another rank's gradient all-reduce) and no Lightning flag (its loops
        would stop this rank alone): ``LaggedSigtermCheck`` stops every rank at the same step. SIGINT is not
        forwarded: a terminal's Ctrl+C reaches every process of its foreground group, the ranks Lightning started
        included, and a second copy would be taken there for a second Ctrl+C, which stops that rank at once.
        """
        if not self.received_signal and self.launcher is not None and signum != signal.SIGINT:
            self.launcher.kill(signum)  # the ranks Lightning's launcher started get the signal too
        self.received_signal = True

    @override
    def teardown(self) -> None:
        if self._signal_connector is not None:
            del self._signal_connector._sigterm_notifier_fn  # Lightning's handler again
            self._signal_connector, self.received_signal = None, False
        super().teardown()

    @override
    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        device_ids = self.determine_ddp_device_ids()
        side = self.init_stream == "side" and device_ids is not None
        with torch.cuda.stream(torch.cuda.Stream()) if side else nullcontext():
            return DistributedDataParallel(module=model, device_ids=device_ids, **self._ddp_kwargs)
