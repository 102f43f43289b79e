"""Lightning's DDP without its per-step wait for the GPU, which keeps a fast compiled step from scaling.

``SyncFreeDDPStrategy`` is ``lightning.pytorch.strategies.DDPStrategy`` (same arguments, same gradients) with two
arguments of its own, each able to restore Lightning's behaviour:

- ``sigterm_check_lag``: Lightning 2.6 broadcasts rank 0's SIGTERM flag at the start of every training step and reads
  it back with ``.item()`` (Lightning-AI/pytorch-lightning#21487). That read waits for the GPU to finish everything
  queued, so the host cannot run ahead, and its per-step Python work (the loop, callbacks, logging, kernel launches)
  is added to every step instead of overlapping the GPU's work. Here each step still broadcasts the flag, copies it
  to pinned host memory without waiting and records a CUDA event; the decision at step s reads the flag broadcast at
  step s - lag, whose event has long completed. Every rank decides at the same step, so all ranks stop together,
  ``lag`` steps later than with Lightning's check (0 restores Lightning's check and its wait).
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

from collections import deque
from contextlib import nullcontext
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_speed.validation import check_choice, check_int

InitStream = Literal["current", "side"]


class LaggedSigtermCheck:
    """Every rank learns rank 0's SIGTERM flag ``lag`` steps after it was broadcast, without waiting for the GPU.

    Called once per training step on every rank (in place of Lightning's per-step check); raises
    ``SIGTERMException`` on every rank at the same step once rank 0's flag of ``lag`` steps ago was set.
    """

    def __init__(self, trainer: pl.Trainer, lag: int) -> None:
        self.trainer, self.lag = trainer, lag
        self.pending: deque[tuple[Tensor, torch.cuda.Event | None]] = deque()

    def __call__(self) -> None:
        device = self.trainer.strategy.root_device
        # torch.full launches a fill kernel: no host-to-device copy (torch.tensor([...], device=...) would wait)
        flag = torch.full((1,), int(bool(getattr(self.trainer, "received_sigterm", False))), dtype=torch.int32,
                          device=device)
        dist.broadcast(flag, src=0)  # NCCL: queued on the GPU; the host does not wait
        if device.type == "cuda":
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((host, event))
        else:  # gloo on the CPU: the broadcast has already finished
            self.pending.append((flag, None))
        if len(self.pending) <= self.lag:
            return
        host, event = self.pending.popleft()
        if event is not None:
            event.synchronize()  # recorded lag steps ago: done unless the host is lag steps ahead of the GPU
        if int(host[0]) == 1:
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

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        loop = trainer.fit_loop.epoch_loop
        # Lightning's per-step check is a private method of the training loop; a Lightning without it has no wait
        # to remove
        if self.sigterm_check_lag > 0 and hasattr(type(loop), "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = LaggedSigtermCheck(trainer, self.sigterm_check_lag)

    @override
    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        device_ids = self.determine_ddp_device_ids()
        side = self.init_stream == "side" and device_ids is not None
        with torch.cuda.stream(torch.cuda.Stream()) if side else nullcontext():
            return DistributedDataParallel(module=model, device_ids=device_ids, **self._ddp_kwargs)
