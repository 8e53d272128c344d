"""One TP group's process group, joined through DeepSpeed's comm.

Rank 0 binds a free port on its own node and reports `node_ip:port`; the other ranks
dial that address. Nothing guesses a random port, so no restart loop is needed.

The model's all-reduce: NCCL on GPUs; on CPU, DeepSpeed's shared-memory all-reduce when
every rank is on one node (serve_tp/engine/shm_all_reduce.py), else gloo. Step plans go
through a shared-memory ring when every rank is on one node (plan_channel.py), else gloo.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from serve_tp.engine.fast_all_reduce import multicast_off_environment
from serve_tp.engine.plan_channel import PlanRing, open_ring
from serve_tp.engine.shm_all_reduce import (
    CollectiveWatchdog, prepare_environment, shm_unavailable, unlink_own_segment,
)

logger = logging.getLogger(__name__)

CpuAllReduce = Literal["auto", "shm", "gloo"]
SHM_DTYPES = (torch.float32, torch.bfloat16)  # what shm.cpp sums (fp16 too, but not on CPU here)


def free_port(host: str) -> int:
    """A port the OS just gave us on `host`. Rank 0 calls it on its own node."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        return sock.getsockname()[1]


PLAN_INLINE_BYTES = 8192  # a decode plan for hundreds of sequences fits in one message


@dataclass
class TPComm:
    """The collectives a rank uses: the model's all-reduce and the plan broadcast.

    `all_reduce_kind` says what sums the row-parallel outputs: "nccl", "gloo", "shm"
    (DeepSpeed's shared memory, bounded by `watchdog`) or "none" (one rank).
    """

    rank: int
    world_size: int
    control_group: Optional[object]
    all_reduce_kind: str = "none"
    watchdog: Optional[CollectiveWatchdog] = None
    plan_ring: Optional[PlanRing] = None
    plan_timeout_s: float = 900.0  # a follower's wait for the next plan (rank 0 heartbeats every second)
    stall_timeout_s: float = 60.0  # rank 0's wait for a follower to free a ring slot

    @property
    def plan_channel(self) -> str:
        if self.world_size == 1:
            return "none"
        return "shm" if self.plan_ring is not None else "gloo"

    def __post_init__(self):
        self._plan_buffer = torch.zeros(PLAN_INLINE_BYTES, dtype=torch.uint8)
        self._ds_comm = None
        if self.world_size > 1:
            import deepspeed.comm as ds_comm

            self._ds_comm = ds_comm

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place. Every rank takes the same path: the
        choice depends only on the kind (agreed at start) and the tensor's dtype and layout."""
        watchdog = self.watchdog
        if watchdog is not None and tensor.dtype in SHM_DTYPES and tensor.is_contiguous():
            watchdog.entered_at = time.monotonic()
            try:
                self._ds_comm.inference_all_reduce(tensor)
            finally:
                watchdog.entered_at = None
        else:
            self._ds_comm.all_reduce(tensor)

    def broadcast_sampled(self, tokens: torch.Tensor) -> None:
        """Rank 0's sampled tokens to every rank, in place, on the forward's group (NCCL on
        cuda: queued in stream order, the host does not wait; gloo on cpu). Async scheduling
        sends them so, not in the plan: rank 0 plans a step before it reads them."""
        if self.world_size > 1:
            torch.distributed.broadcast(tokens, src=0)

    def broadcast_plan(self, plan):
        """Rank 0 sends `plan`; the others receive it. Pickled, through the shared-memory
        ring when the group has one, else over the CPU group."""
        if self.world_size == 1:
            return plan
        if self.plan_ring is not None:
            return self._ring_plan(plan)
        return self._gloo_plan(plan)

    def _ring_plan(self, plan):
        ring = self.plan_ring
        if self.rank == 0:
            payload = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
            rest = ring.send(payload, self.stall_timeout_s)
            if rest:  # too big for a slot: the tail follows on gloo
                tail = torch.frombuffer(bytearray(payload[-rest:]), dtype=torch.uint8)
                torch.distributed.broadcast(tail, src=0, group=self.control_group)
            return plan

        def fetch_rest(size: int) -> bytes:
            tail = torch.empty(size, dtype=torch.uint8)
            torch.distributed.broadcast(tail, src=0, group=self.control_group)
            return tail.numpy().tobytes()

        return pickle.loads(ring.receive(self.plan_timeout_s, fetch_rest))

    def _gloo_plan(self, plan):
        """One fixed-size message carries the length and, for the usual decode step, the
        whole plan: one round trip per step where broadcast_object_list takes two. A plan
        too big for it (many long prompts admitted at once) sends the rest in a second one.
        """
        group, buffer = self.control_group, self._plan_buffer
        if self.rank == 0:
            payload = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
            inline = payload[: PLAN_INLINE_BYTES - 8]
            buffer[:8] = torch.frombuffer(bytearray(len(payload).to_bytes(8, "little")), dtype=torch.uint8)
            buffer[8: 8 + len(inline)] = torch.frombuffer(bytearray(inline), dtype=torch.uint8)
            torch.distributed.broadcast(buffer, src=0, group=group)
            if len(payload) > len(inline):
                rest = torch.frombuffer(bytearray(payload[len(inline):]), dtype=torch.uint8)
                torch.distributed.broadcast(rest, src=0, group=group)
            return plan
        torch.distributed.broadcast(buffer, src=0, group=group)
        size = int.from_bytes(buffer[:8].numpy().tobytes(), "little")
        payload = buffer[8: 8 + min(size, PLAN_INLINE_BYTES - 8)].numpy().tobytes()
        if size > len(payload):
            rest = torch.empty(size - len(payload), dtype=torch.uint8)
            torch.distributed.broadcast(rest, src=0, group=group)
            payload += rest.numpy().tobytes()
        return pickle.loads(payload)


def init_tp_comm(
    rank: int, world_size: int, address: str, port: int, backend: str, timeout_s: float,
    cuda_index: int = 0, cpu_all_reduce: CpuAllReduce = "gloo", shm_timeout_s: Optional[float] = None,
    plan_channel: str = "gloo",
) -> TPComm:
    """Join the group (blocks until every rank has joined) and make the control group.

    `cuda_index` is this rank's GPU among the visible ones (0 inside a Ray actor that sees
    only its own); DeepSpeed binds NCCL to it via LOCAL_RANK.
    `cpu_all_reduce` (gloo backend only): "auto" or "shm" promise that every rank is on
    this node; "auto" then uses shared memory if every rank can, "shm" requires it.
    A shm all-reduce that waits longer than `shm_timeout_s` (default `timeout_s`) ends
    the rank (see CollectiveWatchdog). `plan_channel` "shm" promises the same of the
    ranks and asks for the shared-memory plan ring (gloo if a rank cannot map it).
    """
    if world_size == 1:
        return TPComm(rank, 1, None)
    import deepspeed

    if backend == "nccl":  # before NCCL or symmetric memory read them
        multicast_off_environment()
    want_shm = backend == "gloo" and cpu_all_reduce in ("auto", "shm")
    prepare_environment(want_shm, world_size, address, port)
    os.environ["LOCAL_RANK"] = str(cuda_index)
    timeout = datetime.timedelta(seconds=timeout_s)
    deepspeed.init_distributed(
        dist_backend=backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        auto_mpi_discovery=False,
        verbose=False,
    )
    # Plans travel on gloo even when the model's collectives use NCCL: pickled Python
    # objects belong on the CPU, and gloo's timeouts keep an idle follower from hanging.
    control = torch.distributed.new_group(backend="gloo", timeout=timeout)
    ring = open_ring(control, rank, world_size, address, port) if plan_channel == "shm" else None
    comm = dict(plan_ring=ring, plan_timeout_s=timeout_s, stall_timeout_s=shm_timeout_s or timeout_s)
    if backend != "gloo":
        return TPComm(rank, world_size, control, all_reduce_kind=backend, **comm)
    if not want_shm:
        return TPComm(rank, world_size, control, all_reduce_kind="gloo", **comm)
    if _every_rank_has_shm(control, cpu_all_reduce, address, port, rank):
        watchdog = CollectiveWatchdog(rank, shm_timeout_s or timeout_s)
        return TPComm(rank, world_size, control, all_reduce_kind="shm", watchdog=watchdog, **comm)
    return TPComm(rank, world_size, control, all_reduce_kind="gloo", **comm)


def _every_rank_has_shm(control, cpu_all_reduce: CpuAllReduce, address: str, port: int, rank: int) -> bool:
    """Whether all ranks agree to sum in shared memory (a MIN over the control group).

    The vote is also the barrier after which each rank's segment name can go: every
    rank has returned from init_distributed, so has mapped every peer's segment.
    """
    reason = shm_unavailable()
    vote = torch.tensor([0 if reason else 1], dtype=torch.int32)
    torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MIN, group=control)
    unlink_own_segment(address, port, rank)
    if vote.item() == 1:
        return True
    why = reason or "another rank cannot use it"
    if cpu_all_reduce == "shm":
        raise RuntimeError(f"cpu_all_reduce=shm, but rank {rank} cannot sum in shared memory: {why}")
    logger.warning("rank %d: all-reduce over gloo, not shared memory: %s", rank, why)
    return False
