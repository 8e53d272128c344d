"""The decode step's all-reduce over torch's symmetric memory, NCCL when that cannot run.

At batch 1 a TP=2 decode step is latency bound, and inside a CUDA graph NCCL takes
10.5-17 µs per all-reduce where torch's symmetric-memory one-shot all-reduce takes
6.7-9 µs (docs/results/h200x2/allreduce.md): every rank reads its peers' buffers over
NVLink through pointers mapped at start, one kernel, no proxy thread. Two of them per
layer is most of what TP adds to a step.

torch sums only float32 and bfloat16 there ("not implemented for 'Half'"). An fp16 model's
partial is staged into a float32 buffer and the float32 sum cast back: for two ranks
a + b is exact in float32, so casting it rounds once, exactly as NCCL's fp16 sum does,
and tokens stay bitwise those of the NCCL path. With more ranks the float32 sum rounds
once at the end where NCCL rounds after each addition: within fp16 rounding, not bitwise.

Multicast stays off: the one-shot kernel loads peers' memory through plain P2P pointers
(`one_shot_all_reduce_out`, never a `multimem_*` op), and `multicast_off_environment`
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

logger = logging.getLogger(__name__)

GpuAllReduce = Literal["auto", "symm_mem", "nccl"]
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
MAX_BUFFER_BYTES = 8 * 2**20  # vLLM's cap for 2 ranks; a decode step of 256 rows x 1600 fp32 is 1.6 MiB
DIRECT_DTYPES = (torch.float32, torch.bfloat16)  # what torch's symmetric-memory kernels sum


def multicast_off_environment() -> None:
    """Keep NVLink multicast (NVLS, multimem) off in this process, whatever was inherited."""
    os.environ.update(MULTICAST_OFF)


def sum_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the symmetric buffer holds: the model's own when torch can sum it, else float32."""
    return model_dtype if model_dtype in DIRECT_DTYPES else torch.float32


def buffer_elements(max_rows: int, width: int, model_dtype: torch.dtype, cap_bytes: int = MAX_BUFFER_BYTES) -> int:
    """Elements of the symmetric buffer: the largest decode step's rows, within the cap."""
    size = torch.empty((), dtype=sum_dtype(model_dtype)).element_size()
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
        import torch.distributed._symmetric_memory as symm_mem

        try:
            symm_mem.set_backend("CUDA")  # peer pointers over NVLink, not NVSHMEM
        except Exception as exc:  # older torch has one backend only
            logger.debug("symm_mem.set_backend: %s", exc)
        self.model_dtype = model_dtype
        self.dtype = sum_dtype(model_dtype)
        self.elements = elements
        self.group_name = group.group_name
        self.buffer = symm_mem.empty(elements, dtype=self.dtype, device=device)
        handle = symm_mem.rendezvous(self.buffer, self.group_name)  # collective
        if getattr(handle, "multicast_ptr", 0):
            # never used (no multimem op is called), but its existence means the
            # environment did not reach torch: say so loudly
            logger.warning("symmetric buffer has a multicast address although %s is set", MULTICAST_OFF)
        self.out = torch.empty(elements, dtype=self.dtype, device=device)
        self.staged = self.dtype != model_dtype

    @property
    def description(self) -> str:
        return "symm_mem one_shot" + (f" ({str(self.dtype).removeprefix('torch.')} staging)" if self.staged else "")

    def fits(self, rows: int, width: int) -> bool:
        return rows * width <= self.elements

    def target(self, rows: int, width: int) -> Optional[torch.Tensor]:
        """The buffer as [rows, width] when the GEMM can write its partial there (no staging)."""
        if self.staged:
            return None
        return self.buffer[: rows * width].view(rows, width)

    def __call__(self, partial: torch.Tensor, cast: bool = True) -> torch.Tensor:
        """The sum of every rank's `partial`; in the model's dtype, or as summed when not `cast`."""
        n = partial.numel()
        staged = self.buffer[:n].view(partial.shape)
        if staged.data_ptr() != partial.data_ptr():
            staged.copy_(partial)  # fp16 -> fp32 is exact
        total = torch.ops.symm_mem.one_shot_all_reduce_out(
            staged, "sum", self.group_name, self.out[:n].view(partial.shape))
        return total if not cast or total.dtype == self.model_dtype else total.to(self.model_dtype)


def choose_decode_all_reduce(setting: GpuAllReduce, world_size: int, device: torch.device) -> tuple[bool, str]:
    """(try symmetric memory?, why) for this rank, before the group votes."""
    if world_size == 1:
        return False, "one rank"
    if setting == "nccl":
        return False, "gpu_all_reduce=nccl"
    reason = symm_mem_unavailable(device)
    if reason:
        if setting == "symm_mem":
            raise RuntimeError(f"gpu_all_reduce=symm_mem, but this rank cannot use symmetric memory: {reason}")
        return False, reason
    return True, "available"


def _vote(control, ok: bool) -> bool:
    """True when every rank says ok (a MIN over the CPU control group)."""
    vote = torch.tensor([1 if ok else 0], dtype=torch.int32)
    torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MIN, group=control)
    return vote.item() == 1


def _check_sum(reduce: SymmMemAllReduce, rank: int, world_size: int, width: int) -> Optional[str]:
    """One eager all-reduce of known values; what is wrong with its result, if anything."""
    rows = max(1, min(4, reduce.elements // width))
    part = torch.full((rows, width), float(rank + 1), dtype=reduce.model_dtype, device=reduce.buffer.device)
    got = reduce(part)
    expected = float(world_size * (world_size + 1) // 2)
    if not bool((got == expected).all()):
        return f"one-shot sum gave {got.flatten()[:4].tolist()}, expected {expected}"
    return None


def setup_decode_all_reduce(setting: GpuAllReduce, rank: int, world_size: int, device: torch.device,
                            model_dtype: torch.dtype, max_rows: int, width: int, control) -> tuple[
                                Optional[SymmMemAllReduce], str]:
    """The decode step's all-reduce (None: the group's NCCL) and a line saying which and why.

    Collective over `control` (every rank calls it at the same point): the ranks vote
    before the rendezvous, and again after a check sum, so either all use it or none.
    `symm_mem` makes any failure fatal; `auto` falls back to NCCL with a warning.
    """
    want, why = choose_decode_all_reduce(setting, world_size, device)
    if world_size == 1 or setting == "nccl":
        return None, f"nccl ({why})" if world_size > 1 else "none (one rank)"
    if not _vote(control, want):
        return _fallback(setting, rank, why if not want else "another rank cannot use symmetric memory")
    reduce, error = None, None
    try:
        reduce = SymmMemAllReduce(torch.distributed.group.WORLD, device, model_dtype,
                                  buffer_elements(max_rows, width, model_dtype))
        error = _check_sum(reduce, rank, world_size, width)
    except Exception as exc:  # a missing driver feature, no P2P between the GPUs...
        error = f"{type(exc).__name__}: {exc}"
    torch.cuda.synchronize(device)
    if not _vote(control, error is None):
        return _fallback(setting, rank, error or "another rank's symmetric memory failed")
    logger.info("rank %d: decode all-reduce over %s, up to %d elements", rank, reduce.description, reduce.elements)
    return reduce, reduce.description


def _fallback(setting: GpuAllReduce, rank: int, why: str) -> tuple[None, str]:
    if setting == "symm_mem":
        raise RuntimeError(f"gpu_all_reduce=symm_mem, but rank {rank} cannot use it: {why}")
    logger.warning("rank %d: decode all-reduce over NCCL, not symmetric memory: %s", rank, why)
    return None, f"nccl (symm_mem unavailable: {why})"
