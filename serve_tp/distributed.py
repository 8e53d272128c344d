"""One TP group's process group, joined through DeepSpeed's comm.

Rank 0 binds a free port on its own node and reports `node_ip:port`; the other ranks
dial that address. Nothing guesses a random port, so no restart loop is needed.
"""

from __future__ import annotations

import datetime
import os
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


@dataclass
class TPComm:
    """The collectives a rank uses: the model's all-reduce and the plan broadcast."""

    rank: int
    world_size: int
    control_group: Optional[object]

    def all_reduce(self, tensor: torch.Tensor) -> None:
        import deepspeed.comm as ds_comm

        ds_comm.all_reduce(tensor)

    def broadcast_plan(self, plan):
        """Rank 0 sends `plan`; the others receive it. Pickled over the CPU group."""
        if self.world_size == 1:
            return plan
        box = [plan]
        torch.distributed.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]


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
