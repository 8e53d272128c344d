"""The decode step's all-reduce as one Triton kernel over peer memory: vLLM's custom all-reduce, ours.

Inside a CUDA graph NCCL takes 10.5-17 µs per small all-reduce (docs/results/h200x2/
allreduce.md), and a TP=2 decode step runs two a layer: for gpt2-large, 72 of them cost about
what halving the weights saves. torch's symmetric-memory one-shot reads peers over NVLink in
6.7-9 µs but sums no fp16, and staging into float32 cost more kernels than it saved
(fast_all_reduce.py). This kernel does the whole sum in one launch, in the model's dtype:

1. the row-parallel GEMM writes this rank's partial straight into this rank's symmetric
   buffer (`target`); any other caller's partial is copied in by the kernel itself;
2. every program raises a flag in each peer's signal pad and waits for each peer's flag in
   its own, then a CTA-wide barrier, so every thread's loads come after the flags;
3. it loads its share from every rank's buffer, in rank order, sums in float32, rounds
   once to the model's dtype, adds the residual when given (rounded once more, as the eager
   `h + s` does), and writes the result.

Memory order: flags are taken with acquire semantics. When the GEMM published the partial,
it did so in an earlier kernel, whose writes are in its GPU's memory before this kernel
starts, so the flag is raised relaxed (vLLM's custom all-reduce and torch's symmetric-memory
kernels rely on the same); when the kernel copies the partial in itself, it raises the flag
with release semantics after a CTA-wide barrier, so the copy is visible to the peer that
reads it. Peers' buffers are read past L1 (`.cg`).

No timeout: a peer that never arrives (its process died between two calls) leaves this
rank's kernel spinning, as a dead peer leaves NCCL's. The group's health check sees the dead
rank and Serve replaces the replica, whose rank actors are killed with it (the healing the
NCCL path is tested for; not yet run on a GPU with p2p).

Exactness: at TP=2 the float32 sum of two fp16/bf16 values is exact, so rounding it once is
NCCL's correctly rounded two-rank sum, bit for bit (tests/test_gpu.py checks logits at every
step); fp32 a + b is one rounding, as NCCL's. With more ranks every rank sums in the same
order, so the ranks agree with each other (lockstep), within one rounding of NCCL.

Flags, not counters: a flag is set 0 -> 1 by its sender with a compare-and-swap (the sender
spins while the previous call's flag is still unread) and reset 1 -> 0 by its
receiver with an acquire compare-and-swap, so the zero-filled pads return to zero after every
call and a captured graph needs no value from the host. Pads are indexed by program and
sender: program p of every rank meets only program p of its peers, and the grid is the same
on every rank for a given shape. (The fused GEMM + sum, `linear`, indexes them by column
tile instead: its split-K chunks of a tile raise one flag, from the tile's last program.)

Two buffer slots, no closing barrier: the decode step's attention sums use slot 0 and its MLP
sums slot 1, so consecutive calls alternate. A rank writes slot s again (its GEMM, or the
kernel's copy) only two calls later, after passing the middle call's flags, which a peer
raises only once it has finished the kernel that read slot s (kernels on one stream run in
order). Prefill keeps NCCL, and never touches these buffers.

NVLink multicast stays off: the peers' buffers are plain P2P mappings made by torch's
symmetric memory (CUDA backend, `TORCH_SYMM_MEM_DISABLE_MULTICAST=1` set in every rank), read
with ordinary loads; no multimem instruction exists here.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)

SLOTS = 2  # attention sums in slot 0, MLP sums in slot 1 (the module docstring says why two)
# Decode steps of more rows go to NCCL (the same on every rank: rows are). On 2xH200 this kernel
# took 3.8-6.9 µs against NCCL's 11-13 up to 32 rows, but lost from 128 rows of 1600
# (docs/results/h200x2/p2p/), and decode steps of 128 rows of gpt2-large/xl were 9-12% slower.
MAX_ROWS = 32
BLOCK = 1024  # elements per program per pass: 8 fp16 (16 bytes) per thread at 4 warps
NUM_WARPS = 4
MAX_PROGRAMS = 64  # programs per call; more elements loop. Each spins on its own flag, so every
# program must be resident at once: 64 small CTAs fit H100/H200's 132 SMs with room to spare


def unavailable(device: torch.device) -> Optional[str]:
    """Why this rank cannot run the kernel (None: it can try)."""
    if device.type != "cuda":
        return f"device is {device.type}"
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError as exc:
        return f"torch has no symmetric memory: {exc}"
    return None


def symmetric_buffer(elements: int, dtype: torch.dtype, device: torch.device, group_name: str):
    """(buffer, handle): `elements` of `dtype` in torch's symmetric memory, mapped by every rank
    of the group (collective). The CUDA backend: peer pointers over NVLink, not NVSHMEM. Shared
    by this kernel and torch's one-shot (fast_all_reduce.SymmMemAllReduce)."""
    import torch.distributed._symmetric_memory as symm_mem

    try:
        symm_mem.set_backend("CUDA")
    except Exception as exc:  # older torch has one backend only
        logger.debug("symm_mem.set_backend: %s", exc)
    buffer = symm_mem.empty(elements, dtype=dtype, device=device)
    handle = symm_mem.rendezvous(buffer, group_name)
    if getattr(handle, "multicast_ptr", 0):
        # never used (no multimem op is called), but its existence means the multicast-off
        # environment did not reach torch: say so loudly
        logger.warning("symmetric buffer has a multicast address although multicast is off")
    return buffer, handle


def programs_for(elements: int) -> int:
    """The grid of one call: enough programs for one pass, at most MAX_PROGRAMS."""
    return max(1, min(MAX_PROGRAMS, -(-elements // BLOCK)))


class P2PAllReduce:
    """One-kernel all-reduce of up to `elements` values a call, in the model's dtype.

    `__call__(partial, slot=..., residual=h)` returns h + the sum over the ranks (or the sum
    alone), in a new tensor. Callers alternate slots from call to call (the decode step does:
    attention 0, MLP 1), which is what lets a rank reuse a slot without a closing barrier.
    """

    kind = "p2p"

    def __init__(self, group, rank: int, world_size: int, device: torch.device, dtype: torch.dtype,
                 elements: int):
        self.rank, self.world_size, self.elements = rank, world_size, elements
        self.model_dtype = dtype  # summed in the model's own dtype: no staging
        self.buffer, handle = symmetric_buffer(SLOTS * elements, dtype, device, group.group_name)
        self.pad_words = handle.signal_pad_size // 4
        if self.pad_words < MAX_PROGRAMS * world_size:  # a flag per program and sender
            raise RuntimeError(f"signal pad holds {self.pad_words} flags, the kernel needs {MAX_PROGRAMS * world_size}")
        # The peers' addresses, as this process maps them, in a device table the kernel reads:
        # passed as tensors, a peer's memory fails Triton's launch-time pointer check.
        self.buffer_ptrs = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
        self.pad_ptrs = torch.tensor(list(handle.signal_pad_ptrs), dtype=torch.int64, device=device)
        self.handle = handle  # keeps the mappings alive
        self._last_slot: Optional[int] = None

    @property
    def description(self) -> str:
        return f"p2p one-shot ({str(self.model_dtype).removeprefix('torch.')}, Triton)"

    def fits(self, rows: int, width: int) -> bool:
        return rows * width <= self.elements

    def target(self, rows: int, width: int, slot: int = 0) -> Optional[torch.Tensor]:
        """Where the GEMM writes its partial for a call on `slot`: that slot of this rank's
        symmetric buffer, which the peers read without a copy."""
        start = (slot % SLOTS) * self.elements
        return self.buffer[start: start + rows * width].view(rows, width)

    def _take_slot(self, slot: int) -> int:
        """The slot of this call, refused when it is the call before's: a peer may still be
        reading it (the module docstring)."""
        slot %= SLOTS
        if slot == self._last_slot:
            raise RuntimeError(f"p2p all-reduce called on slot {slot} twice in a row: calls must alternate")
        self._last_slot = slot
        return slot

    def takes_linear(self, rows: int, k: int, width: int) -> bool:
        """Whether `linear` can sum x [rows, k] @ W [k, width] in the GEMM's own kernel: the
        partial fits a slot, the rows fit the tile, a flag per column tile and sender fits the
        pad, and the column tiles are fewer than the GPU's SMs. Each tile's last program spins
        until the peers' same tile arrives; with an SM left over the chunks it waits for on
        any rank still start (fused_linear.plan)."""
        from serve_tp.model import fused_linear

        tiles = fused_linear.plan(k, width).tiles
        return (self.fits(rows, width) and rows <= fused_linear.MAX_ROWS and tiles * self.world_size <= self.pad_words
                and tiles < fused_linear.resident_programs(self.buffer.device))

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               residual: Optional[torch.Tensor] = None, slot: int = 0) -> torch.Tensor:
        """residual + the sum over the ranks of x @ weight (+ bias: rank 0 passes it), as one
        kernel: the GEMM's tiles go into this rank's buffer and are summed with the peers'
        tiles by the same programs (serve_tp/model/fused_linear.py, `fused_decode`)."""
        from serve_tp.model import fused_linear

        if not self.takes_linear(x.shape[0], x.shape[1], weight.shape[1]):
            raise ValueError(f"{tuple(x.shape)} @ {tuple(weight.shape)} does not fit the fused p2p sum")
        if x.dtype != self.model_dtype:
            raise TypeError(f"p2p sums {self.model_dtype}, got {x.dtype}")
        slot = self._take_slot(slot)
        exchange = (self.buffer_ptrs, self.pad_ptrs, slot * self.elements, self.rank, self.world_size)
        return fused_linear.linear_sum(x, weight, bias, residual, exchange)

    def __call__(self, partial: torch.Tensor, cast: bool = True, residual: Optional[torch.Tensor] = None,
                 slot: int = 0) -> torch.Tensor:
        """residual + the sum of every rank's `partial` (the sum alone without a residual).
        `cast` is moot: the sum is already in the model's dtype. Calls alternate slots
        (`_take_slot`)."""
        slot = self._take_slot(slot)
        if partial.dtype != self.model_dtype:
            raise TypeError(f"p2p all-reduce sums {self.model_dtype}, got {partial.dtype}")
        n = partial.numel()
        if n > self.elements:
            raise ValueError(f"{n} elements exceed the p2p buffer's {self.elements}")
        partial = partial.contiguous()
        slot_offset = slot * self.elements
        # the GEMM wrote it in place (target): published by a finished kernel, no copy
        published = partial.data_ptr() == self.buffer[slot_offset:].data_ptr()
        out = torch.empty_like(partial)
        has_residual = residual is not None
        if has_residual:
            residual = residual.contiguous()
        from serve_tp.engine.p2p_kernel import one_shot_kernel

        one_shot_kernel[(programs_for(n),)](
            partial, residual if has_residual else partial, out, self.buffer_ptrs, self.pad_ptrs, n, slot_offset,
            RANK=self.rank, WORLD=self.world_size, HAS_RESIDUAL=has_residual, PUBLISHED=published,
            BLOCK=BLOCK, num_warps=NUM_WARPS)
        return out
