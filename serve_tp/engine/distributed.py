"""One TP group's process group, joined through DeepSpeed's comm.

Rank 0 binds a free port on its own node and reports `node_ip:port`; the other ranks
dial that address. Nothing guesses a random port, so no restart loop is needed.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
from dataclasses import dataclass
from typing import Optional

import torch


def free_port(host: str) -> int:
    """A port the OS just gave us on `host`. Rank 0 calls it on its own node."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        return sock.getsockname()[1]


PLAN_INLINE_BYTES = 8192  # a decode plan for hundreds of sequences fits in one message


@dataclass
class TPComm:
    """The collectives a rank uses: the model's all-reduce and the plan broadcast."""

    rank: int
    world_size: int
    control_group: Optional[object]

    def all_reduce(self, tensor: torch.Tensor) -> None:
        import deepspeed.comm as ds_comm

        ds_comm.all_reduce(tensor)

    def __post_init__(self):
        self._plan_buffer = torch.zeros(PLAN_INLINE_BYTES, dtype=torch.uint8)

    def broadcast_plan(self, plan):
        """Rank 0 sends `plan`; the others receive it. Pickled over the CPU group.

        One fixed-size message carries the length and, for the usual decode step, the
        whole plan: one round trip per step where broadcast_object_list takes two. A plan
        too big for it (many long prompts admitted at once) sends the rest in a second one.
        """
        if self.world_size == 1:
            return plan
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
    cuda_index: int = 0,
) -> TPComm:
    """Join the group (blocks until every rank has joined) and make the control group.

    `cuda_index` is this rank's visible GPU (0 inside a Ray actor, whose
    CUDA_VISIBLE_DEVICES holds one GPU); DeepSpeed binds NCCL to it via LOCAL_RANK.
    """
    if world_size == 1:
        return TPComm(rank, 1, None)
    import deepspeed

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
    return TPComm(rank, world_size, control)
