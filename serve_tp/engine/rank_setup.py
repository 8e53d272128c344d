"""Everything one rank does before it can decode: device, group, shard, forward, batch.

The Ray rank actor (worker.py), the gloo/NCCL test ranks (tests/tp_ranks.py), the GPU
scripts and the tutorial baseline all start a rank this one way, so what they measure
or check is the path that serves.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from serve_tp.engine.batch import SequenceBatch
from serve_tp.engine.distributed import TPComm, init_tp_comm
from serve_tp.engine.fast_all_reduce import setup_decode_all_reduce
from serve_tp.engine.loop import EngineLoop
from serve_tp.engine.sampling import Sampler
from serve_tp.messages import RankSettings
from serve_tp.model.forward import GPT2Forward
from serve_tp.model.loader import load_shard
from serve_tp.model.shard import GPT2Shard
from serve_tp.model.source import resolve_model_dir

logger = logging.getLogger(__name__)


@dataclass
class RankSetup:
    """A ready rank: its group, its shard of the model, and the batch that decodes with it."""

    rank: int
    world_size: int
    device: torch.device
    backend: str
    model_dir: str
    comm: TPComm
    shard: GPT2Shard
    forward: GPT2Forward
    batch: SequenceBatch
    load_s: float
    decode_all_reduce: str = "none"  # what sums inside a decode step, and why (fast_all_reduce.py)

    @property
    def eos_token_id(self):
        return self.shard.config.eos_token_id

    def info(self) -> dict:
        """What the rank reports about itself (health, startup log)."""
        return {
            "rank": self.rank,
            "device": str(self.device),
            "backend": self.backend,
            "all_reduce": self.comm.all_reduce_kind,
            "decode_all_reduce": self.decode_all_reduce,
            "plan_channel": self.comm.plan_channel,
            "dtype": str(self.shard.dtype).removeprefix("torch."),
            "heads": self.shard.plan.heads,
            "kv_cache_mib": round(self.batch.cache.nbytes / 2**20, 1),
            "cuda_graphs": self.batch.runner.graph_count,
            "compiled_decode": self.forward.compiled is not None,
            "decode_attention": self.forward.decode_attention,
            "fused_decode": self.forward.fused is not None,
            "load_s": round(self.load_s, 2),
        }


def build_engine(ready: RankSetup, settings: RankSettings,
                 on_step: Optional[Callable[[int, int, int], None]] = None) -> EngineLoop:
    """The rank's engine loop (not started): rank 0 gets the sampler and leads, the others follow.

    The rank actor and the test ranks build it here, so tests drive the wiring that serves.
    """
    config = ready.shard.config
    sampler = None
    if ready.rank == 0:  # rank 0 alone samples, and sends the tokens to the others
        sampler = Sampler(settings.max_batch_size, config.vocab_size, ready.device,
                          eos_token_id=config.eos_token_id, max_logprobs=settings.max_logprobs,
                          context_length=settings.context_length, sampleable_vocab=settings.sampleable_vocab,
                          graphs=settings.sampler_graphs)
    return EngineLoop(
        ready.batch,
        ready.comm.broadcast_plan,
        ready.rank,
        eos_token_id=config.eos_token_id,
        max_context=settings.context_length,
        max_batch_size=settings.max_batch_size,
        batch_wait_s=settings.batch_wait_timeout_s,
        max_prefill_tokens=settings.max_prefill_tokens,
        prefill_share_tokens=settings.prefill_share_tokens,
        sampler=sampler,
        on_step=on_step,
        async_scheduling=settings.async_scheduling,
        share_sampled=ready.comm.broadcast_sampled if ready.world_size > 1 else None,
    )


def peer_memory_wanted(settings: RankSettings, world_size: int) -> bool:
    """Whether this rank may map its peers' GPU memory (gpu_all_reduce p2p, symm_mem or auto,
    resolved by the replica only when every rank is on one node)."""
    return settings.device == "cuda" and world_size > 1 and settings.gpu_all_reduce != "nccl"


def see_group_gpus(group_gpus: Sequence[str]) -> int:
    """Make every GPU of the group visible to this process; this rank's index among them.

    Ray shows each rank actor only its own GPU (CUDA_VISIBLE_DEVICES), and CUDA maps a peer
    GPU's memory only into a process that sees that GPU: with one visible, the p2p kernel's
    symmetric buffers cannot be set up (vLLM's Ray workers see every GPU of their node for the
    same reason). Must run before this process touches CUDA.
    """
    own = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if own not in group_gpus:
        raise RuntimeError(f"this rank's GPU {own!r} is not among the group's {list(group_gpus)}")
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA is already initialised in this process: its visible GPUs cannot change")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(group_gpus)
    return list(group_gpus).index(own)


def rank_device(settings: RankSettings, cuda_index: int = 0) -> torch.device:
    """The rank's device, made current (DeepSpeed places the shard on the current one)."""
    if settings.device != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", cuda_index)
    torch.cuda.set_device(device)
    return device


def setup_rank(rank: int, world_size: int, address: str, port: int, settings: RankSettings,
               cuda_index: int = 0) -> RankSetup:
    """Join the group at address:port, load and place this rank's shard, build its batch.

    Blocks until every rank has joined. `cuda_index` is the rank's GPU among the visible
    ones: 0 in a Ray actor that sees only its own GPU, its index among the group's when it
    sees them all (`see_group_gpus`) or when one process tree drives every GPU. Decode graphs are captured last, and every rank
    captures the same ones in the same order, so NCCL calls inside them pair up.
    """
    started = time.monotonic()
    device = rank_device(settings, cuda_index)
    backend = "nccl" if device.type == "cuda" else "gloo"
    model_dir = str(resolve_model_dir(settings.model, settings.hf_revision))
    comm = init_tp_comm(rank, world_size, address, port, backend, settings.collective_timeout_s, cuda_index,
                        cpu_all_reduce=settings.cpu_all_reduce, shm_timeout_s=settings.stall_timeout_s,
                        plan_channel=settings.plan_channel)
    shard = load_shard(model_dir, settings.dtype, device, rank, world_size)
    decode_sum, decode_path = None, comm.all_reduce_kind
    if device.type == "cuda":
        decode_sum, decode_path = setup_decode_all_reduce(
            settings.gpu_all_reduce, rank, world_size, device, shard.dtype, settings.max_batch_size,
            shard.config.n_embd, comm.control_group)
    forward = GPT2Forward(shard, comm.all_reduce, decode_all_reduce=decode_sum,
                          compile_decode=settings.compile_decode, decode_attention=settings.decode_attention,
                          fused_decode=settings.fused_decode)
    batch = SequenceBatch(forward, settings.max_batch_size, settings.context_length, cuda_graphs=settings.cuda_graphs)
    batch.capture()
    setup = RankSetup(rank, world_size, device, backend, model_dir, comm, shard, forward, batch,
                      time.monotonic() - started, decode_path)
    logger.info("rank %d/%d ready: %s", rank, world_size, setup.info())
    return setup
