"""Run by the ``ddp_run`` fixture (tests/conftest.py): one 2-process launch on CPU (gloo) for the tests of
test_fid_callback.py, test_ddp_callbacks.py and test_distributed.py, one after the other in the same two processes
(every process start-up imports torch and Lightning, seconds on a two-core machine).

    python tests/ddp_script.py OUT_DIR

Lightning's DDP launcher starts this script again for rank 1 at the first fit; the second Trainer finds both ranks
running (``LOCAL_RANK`` is set in each) and the process group already initialised, which the SIGTERM check then
uses. Writes ``OUT_DIR/fid`` (ddp_fid_script.py), ``OUT_DIR/callbacks`` (ddp_callbacks_script.py) and
``OUT_DIR/sigterm`` (ddp_sigterm_script.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

import ddp_callbacks_script  # this script's folder, tests/, is first on sys.path
import ddp_fid_script
import ddp_sigterm_script

if __name__ == "__main__":
    out = Path(sys.argv[1])
    for folder in ("fid", "callbacks", "sigterm"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    ddp_fid_script.main(str(out / "fid"), str(out / "fid" / "cache"))
    ddp_callbacks_script.main(str(out / "callbacks"))
    ddp_sigterm_script.main(str(out / "sigterm"))
    # Both ranks destroy the process group before exiting: a gloo group left to interpreter shutdown can abort a rank
    # there ("terminate called without an active exception", exit status -6; pytorch/pytorch#179291).
    dist.barrier()
    dist.destroy_process_group()
