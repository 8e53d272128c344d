"""The decode step's all-reduce over peer memory, NCCL when that cannot run.

At batch 1 a TP=2 decode step is latency bound, and inside a CUDA graph NCCL takes
10.5-17 µs per all-reduce (docs/results/h200x2/allreduce.md). Two kernels read the peers'
buffers over NVLink instead, through pointers mapped at start, one kernel, no proxy thread:

- `p2p`, our own (p2p_all_reduce.py): the sum in the model's dtype with the residual add in
  the same launch, 3.8-6.9 µs up to 32 rows on 2xH200 (docs/results/h200x2/p2p/); `auto`
  takes it. Steps of more rows sum over NCCL, where it lost.
- `symm_mem`, torch's symmetric-memory one-shot (below): 6.7-9 µs, but no fp16 sum, and its
  float32 staging made our steps slower than NCCL's.

This module sets up either, votes over the group so every rank takes the same one, and
checks a sum before use.

symm_mem: torch sums only float32 and bfloat16 ("not implemented for 'Half'"). An fp16 model's
partial is staged into a float32 buffer and the float32 sum cast back: for two ranks
a + b is exact in float32, so casting it rounds once, exactly as NCCL's fp16 sum does,
and tokens stay bitwise those of the NCCL path. With more ranks the float32 sum rounds
once at the end where NCCL rounds after each addition: within fp16 rounding, not bitwise.

Multicast stays off: both kernels load peers' memory through plain P2P pointers
(`one_shot_all_reduce_out` or ours, never a `multimem_*` op), and `multicast_off_environment`
is set in every rank before NCCL or symmetric memory start (a multicast object on a
shared machine is what we must never create).

Every rank must take the same path for every call, or the group hangs: the choice
depends only on the setting, a vote over the control group at start, and the tensor's
shape (the same on every rank).
"""

from __future__ import annotations

import logging
import os
from typing import Literal, Optional

import torch

from serve_tp.engine.p2p_all_reduce import MAX_ROWS as P2P_MAX_ROWS
from serve_tp.engine.p2p_all_reduce import SLOTS, P2PAllReduce, symmetric_buffer
from serve_tp.engine.p2p_all_reduce import unavailable as p2p_unavailable

logger = logging.getLogger(__name__)

GpuAllReduce = Literal["auto", "p2p", "symm_mem", "nccl"]
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
MAX_BUFFER_BYTES = 8 * 2**20  # vLLM's cap for 2 ranks; a decode step of 256 rows x 1600 fp32 is 1.6 MiB
DIRECT_DTYPES = (torch.float32, torch.bfloat16)  # what torch's symmetric-memory kernels sum


def multicast_off_environment() -> None:
    """Keep NVLink multicast (NVLS, multimem) off in this process, whatever was inherited."""
    os.environ.update(MULTICAST_OFF)


def sum_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the symmetric buffer holds: the model's own when torch can sum it, else float32."""
    return model_dtype if model_dtype in DIRECT_DTYPES else torch.float32


def buffer_elements(max_rows: int, width: int, model_dtype: torch.dtype, cap_bytes: int = MAX_BUFFER_BYTES,
                    buffer_dtype: Optional[torch.dtype] = None) -> int:
    """Elements of the symmetric buffer (of one slot): the largest decode step's rows, within the
    cap; `buffer_dtype` defaults to what torch's one-shot sums in."""
    size = torch.empty((), dtype=buffer_dtype or sum_dtype(model_dtype)).element_size()
    return max(1, min(max_rows * width, cap_bytes // size))


def symm_mem_unavailable(device: torch.device) -> Optional[str]:
    """Why this rank cannot sum in symmetric memory (None: it can try)."""
    if device.type != "cuda":
        return f"device is {device.type}"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError as exc:
        return f"torch has no symmetric memory: {exc}"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out"):
        return "torch.ops.symm_mem.one_shot_all_reduce_out is missing"
    return None


class SymmMemAllReduce:
    """One-shot all-reduce of up to `elements` values through a symmetric buffer.

    `target(shape)` is where the row-parallel GEMM may write its partial directly (the
    buffer itself when it holds the model's dtype), `__call__` returns the sum in the
    model's dtype. The result lives in this object's output buffer until the next call:
    the caller consumes it at once (the residual add), as the decode step does.
    """

    kind = "symm_mem"

    def __init__(self, group, device: torch.device, model_dtype: torch.dtype, elements: int):
        self.model_dtype = model_dtype
        self.dtype = sum_dtype(model_dtype)
        self.elements = elements
        self.group_name = group.group_name
        self.buffer, _ = symmetric_buffer(elements, self.dtype, device, self.group_name)
        self.out = torch.empty(elements, dtype=self.dtype, device=device)
        self.staged = self.dtype != model_dtype

    @property
    def description(self) -> str:
        return "symm_mem one_shot" + (f" ({str(self.dtype).removeprefix('torch.')} staging)" if self.staged else "")

    def fits(self, rows: int, width: int) -> bool:
        return rows * width <= self.elements

    def target(self, rows: int, width: int, slot: int = 0) -> Optional[torch.Tensor]:
        """The buffer as [rows, width] when the GEMM can write its partial there (no staging)."""
        if self.staged:
            return None
        return self.buffer[: rows * width].view(rows, width)

    def __call__(self, partial: torch.Tensor, cast: bool = True, residual: Optional[torch.Tensor] = None,
                 slot: int = 0) -> torch.Tensor:
        """The sum of every rank's `partial`; in the model's dtype, or as summed when not `cast`;
        `residual` + that sum when given (a separate add: torch's kernel takes none). `slot` is
        the p2p kernel's (attention / MLP), moot here: one buffer, rewritten only after the
        one-shot's closing barrier."""
        total = self._sum(partial, cast)
        return total if residual is None else residual + total

    def _sum(self, partial: torch.Tensor, cast: bool) -> torch.Tensor:
        n = partial.numel()
        staged = self.buffer[:n].view(partial.shape)
        if staged.data_ptr() != partial.data_ptr():
            staged.copy_(partial)  # fp16 -> fp32 is exact
        total = torch.ops.symm_mem.one_shot_all_reduce_out(
            staged, "sum", self.group_name, self.out[:n].view(partial.shape))
        return total if not cast or total.dtype == self.model_dtype else total.to(self.model_dtype)


def choose_decode_all_reduce(setting: GpuAllReduce, world_size: int, device: torch.device) -> tuple[
        Optional[str], str]:
    """(the kind this rank would try: "p2p", "symm_mem" or None for NCCL, why), before the vote.

    auto tries our p2p kernel: torch's one-shot made our steps slower (its fp16 staging)."""
    if world_size == 1:
        return None, "one rank"
    if setting == "nccl":
        return None, "gpu_all_reduce=nccl"
    kind = "symm_mem" if setting == "symm_mem" else "p2p"
    reason = symm_mem_unavailable(device) if kind == "symm_mem" else p2p_unavailable(device)
    if reason:
        if setting != "auto":
            raise RuntimeError(f"gpu_all_reduce={setting}, but this rank cannot use it: {reason}")
        return None, reason
    return kind, "available"


def _vote(control, ok: bool) -> bool:
    """True when every rank says ok (a MIN over the CPU control group)."""
    vote = torch.tensor([1 if ok else 0], dtype=torch.int32)
    torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MIN, group=control)
    return vote.item() == 1


def _check_sum(reduce, rank: int, world_size: int, width: int) -> Optional[str]:
    """Eager all-reduces of known values, through both slots, the second with a residual;
    what is wrong with their results, if anything."""
    rows = max(1, min(4, reduce.elements // width))
    device = reduce.buffer.device
    part = torch.full((rows, width), float(rank + 1), dtype=reduce.model_dtype, device=device)
    expected = float(world_size * (world_size + 1) // 2)
    for slot, residual in ((0, None), (1, torch.full_like(part, 100.0))):
        got = reduce(part, residual=residual, slot=slot)
        want = expected + (0.0 if residual is None else 100.0)
        if not bool((got == want).all()):
            return f"{reduce.kind} sum (slot {slot}) gave {got.flatten()[:4].tolist()}, expected {want}"
    return None


def _make(kind: str, rank: int, world_size: int, device: torch.device, model_dtype: torch.dtype,
          max_rows: int, width: int):
    group = torch.distributed.group.WORLD
    if kind == "p2p":
        rows = min(max_rows, P2P_MAX_ROWS)  # larger steps sum over NCCL (fits() says no)
        return P2PAllReduce(group, rank, world_size, device, model_dtype,
                            buffer_elements(rows, width, model_dtype, MAX_BUFFER_BYTES // SLOTS, model_dtype))
    return SymmMemAllReduce(group, device, model_dtype, buffer_elements(max_rows, width, model_dtype))


def setup_decode_all_reduce(setting: GpuAllReduce, rank: int, world_size: int, device: torch.device,
                            model_dtype: torch.dtype, max_rows: int, width: int, control) -> tuple[
                                Optional[object], str]:
    """The decode step's all-reduce (None: the group's NCCL) and a line saying which and why.

    Collective over `control` (every rank calls it at the same point): the ranks vote
    before the rendezvous, after it, and after a check sum, so either all use it or none.
    `p2p` and `symm_mem` make any failure fatal; `auto` falls back to NCCL with a warning.
    """
    kind, why = choose_decode_all_reduce(setting, world_size, device)
    if world_size == 1 or setting == "nccl":
        return None, f"nccl ({why})" if world_size > 1 else "none (one rank)"
    if not _vote(control, kind is not None):
        return _fallback(setting, rank, why if kind is None else "another rank cannot use it")
    reduce, error = None, None
    try:
        reduce = _make(kind, rank, world_size, device, model_dtype, max_rows, width)
    except Exception as exc:  # a missing driver feature, no P2P between the GPUs...
        error = f"{type(exc).__name__}: {exc}"
    # every rank built it before any launches the check: a kernel whose peer never arrives spins
    if not _vote(control, error is None):
        return _fallback(setting, rank, error or "another rank's set-up failed")
    try:
        error = _check_sum(reduce, rank, world_size, width)
    except Exception as exc:  # a Triton compile error...
        error = f"{type(exc).__name__}: {exc}"
    torch.cuda.synchronize(device)
    if not _vote(control, error is None):
        return _fallback(setting, rank, error or "another rank's check sum failed")
    logger.info("rank %d: decode all-reduce over %s, up to %d elements", rank, reduce.description, reduce.elements)
    return reduce, reduce.description


def _fallback(setting: GpuAllReduce, rank: int, why: str) -> tuple[None, str]:
    if setting != "auto":
        raise RuntimeError(f"gpu_all_reduce={setting}, but rank {rank} cannot use it: {why}")
    logger.warning("rank %d: decode all-reduce over NCCL, not peer memory: %s", rank, why)
    return None, f"nccl (p2p unavailable: {why})"
