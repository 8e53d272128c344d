"""DeepSpeed's shared-memory all-reduce for CPU ranks on one node, and the bound on its wait.

On CPU, gloo sums each row-parallel output over TCP loopback: two socket round trips per
layer. DeepSpeed's `inference_all_reduce` (the deepspeed_shm_comm op, built from
deepspeed/ops/csrc/cpu/comm/shm.cpp) has each rank copy its partial into a shared-memory
segment and add the peers' copies in place: no socket, no kernel round trip.

What DeepSpeed needs, read from its source (0.19.8):
  * `init_distributed` builds the op and calls its `initialize(world_size, rank)`, which
    maps the segments only when the environment says LOCAL_SIZE == world_size, naming
    them after MASTER_ADDR and MASTER_PORT. `inference_all_reduce` then takes the shm
    path for fp32 (AVX2) and bf16 (AVX-512BW), else torch.distributed's all_reduce, but it
    never checks that the segments exist: LOCAL_SIZE must be set exactly when every rank is
    on this node (the replica decides that from its placement group).
  * The segments are never unlinked (66 MB each in /dev/shm, one per rank per group); once
    every rank has mapped every segment, each rank unlinks its own name.
  * A rank waits for its peers by spinning on their flags in shared memory, with no
    timeout: a peer that dies or stops mid-collective leaves the others spinning, a core
    each, forever. `CollectiveWatchdog` bounds that wait.
  * Only contiguous fp32/bf16/fp16 tensors are summed; any other tensor would be returned
    unsummed, so `TPComm.all_reduce` sends those through gloo.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

logger = logging.getLogger(__name__)

SHM_TIMEOUT_EXIT_CODE = 75  # EX_TEMPFAIL: the rank ended itself, its group must be replaced


def prepare_environment(use_shm: bool, world_size: int, address: str, port: int) -> None:
    """Before `deepspeed.init_distributed`: what its shm `initialize` reads.

    The group's own rendezvous address and port name the segments, so two groups on one
    node (two replicas) never share one.
    """
    if use_shm:
        os.environ.update(LOCAL_SIZE=str(world_size), MASTER_ADDR=address, MASTER_PORT=str(port))
    else:  # an inherited LOCAL_SIZE would map segments that peers on other nodes never create
        os.environ.pop("LOCAL_SIZE", None)


def shm_unavailable() -> Optional[str]:
    """After `init_distributed`: why this rank cannot sum fp32 in shared memory, or None."""
    import torch
    from deepspeed.comm import comm as ds_comm

    if not hasattr(torch.ops.deepspeed, "inference_all_reduce_"):
        return "DeepSpeed's deepspeed_shm_comm op is not built here (it needs a C++ compiler)"
    if getattr(ds_comm.cdb, "shm_comm_op", None) is None:
        return "DeepSpeed's backend did not load its deepspeed_shm_comm op"
    if getattr(ds_comm.cdb, "shm_vector_kernel_level", 0) < 1:
        return "this CPU lacks AVX2, which DeepSpeed's shm kernels need"
    return None


def segment_path(address: str, port: int, rank: int) -> Path:
    """The name shm.cpp gives rank `rank`'s segment: shm_open's names live in /dev/shm."""
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}"


def unlink_own_segment(address: str, port: int, rank: int) -> None:
    """Call once every rank has mapped every segment: the mappings outlive the name."""
    try:
        segment_path(address, port, rank).unlink()
    except FileNotFoundError:
        pass


def _exit_process(code: int) -> None:
    logging.shutdown()  # flush the reason before the process goes
    sys.stderr.flush()
    os._exit(code)


class CollectiveWatchdog:
    """Ends the rank when one shm all-reduce outlasts `timeout_s`.

    The waiting thread spins inside DeepSpeed's C++ loop, where Python cannot interrupt
    it. Ending the process is the clean way out: the replica's poll of rank 0 or its
    health check sees the rank gone at once (503, in-flight requests fail instead of
    hanging), Serve replaces the whole group, and no core keeps spinning meanwhile.
    `timeout_s` is the engine's stall timeout: one collective waits only for its peers'
    share of the same step, milliseconds, unless a peer is gone or stopped.
    """

    def __init__(self, rank: int, timeout_s: float, exit_process: Callable[[int], None] = _exit_process):
        self.rank = rank
        self.timeout_s = timeout_s
        self.entered_at: Optional[float] = None  # set by the caller around each collective
        self._exit_process = exit_process
        self._thread = threading.Thread(target=self._watch, name="shm-all-reduce-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        period = min(1.0, self.timeout_s / 4)
        while True:
            time.sleep(period)
            entered = self.entered_at
            if entered is None:
                continue
            waited = time.monotonic() - entered
            if waited > self.timeout_s:
                logger.critical(
                    "rank %d: shm all-reduce waited %.1fs (> %.1fs) for its peers: a rank is gone or "
                    "stopped. Ending this rank so the replica fails fast and Serve replaces the group.",
                    self.rank, waited, self.timeout_s)
                self._exit_process(SHM_TIMEOUT_EXIT_CODE)
                return
