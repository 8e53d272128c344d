"""The p2p all-reduce's Triton kernel (p2p_all_reduce.py says what it does and why it is safe).

A module of its own, imported when the kernel first runs, so that importing serve_tp never
imports triton: CPU ranks do not pay for it, and tests/test_decode_attention.py can still set
TRITON_INTERPRET before triton's first import (triton makes its own functions interpreted or
compiled then).
"""

import triton
import triton.language as tl

# the flags' compare-and-swap, shared with the fused GEMM + sum (serve_tp/model/fused_linear.py)
from serve_tp.model.fused_linear import raise_flag as _raise_flag
from serve_tp.model.fused_linear import take_flag as _take_flag


@triton.jit
def one_shot_kernel(partial_ptr, residual_ptr, out_ptr, buffer_ptrs, pad_ptrs, n, slot_offset,
                    RANK: tl.constexpr, WORLD: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                    PUBLISHED: tl.constexpr, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    stride = tl.num_programs(0) * BLOCK
    element = partial_ptr.dtype.element_ty
    if not PUBLISHED:  # 1. copy this rank's share into its buffer, then release it
        mine = tl.load(buffer_ptrs + RANK).to(tl.pointer_type(element)) + slot_offset
        for start in range(program * BLOCK, n, stride):
            offsets = start + tl.arange(0, BLOCK)
            inside = offsets < n
            tl.store(mine + offsets, tl.load(partial_ptr + offsets, mask=inside), mask=inside)
        tl.debug_barrier()  # every thread's stores precede the flag's release
    own_pad = tl.load(pad_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):  # 2. flags: raise in each peer's pad...
        if peer != RANK:
            pad = tl.load(pad_ptrs + peer).to(tl.pointer_type(tl.int32))
            if PUBLISHED:
                _raise_flag(pad + program * WORLD + RANK, "relaxed")
            else:
                _raise_flag(pad + program * WORLD + RANK, "release")
    for peer in tl.static_range(WORLD):  # ...then take each peer's from this rank's
        if peer != RANK:
            _take_flag(own_pad + program * WORLD + peer, "acquire")
    tl.debug_barrier()  # every thread's loads follow the flags
    for start in range(program * BLOCK, n, stride):  # 3. the sum, in rank order
        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < n
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for source in tl.static_range(WORLD):
            if source == RANK:
                total += tl.load(partial_ptr + offsets, mask=inside).to(tl.float32)
            else:
                theirs = tl.load(buffer_ptrs + source).to(tl.pointer_type(element)) + slot_offset
                total += tl.load(theirs + offsets, mask=inside, cache_modifier=".cg").to(tl.float32)
        result = total.to(element)
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + offsets, mask=inside).to(tl.float32)
            result = (residual + result.to(tl.float32)).to(element)
        tl.store(out_ptr + offsets, result, mask=inside)
