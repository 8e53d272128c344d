"""A decode step's KV-cache write and attention over the cache as one Triton kernel per layer.

Replayed as a CUDA graph, a GPT-2-small decode step at batch 1 is ~156 kernels of ~3.5 us
each (docs/results/h200x1/profile_tp1_max.md): their count, not their bytes, sets its time.
The eager path spends several of a layer's kernels on attention: the index arithmetic and
index_put that store this token's K/V, then SDPA over the padded span with an additive mask.
Here one launch does both, one program per (row, head):

- it stores the token's K and V at `positions[row]` of the row's slot;
- it attends over the cached positions before it, in blocks of BLOCK_N with an online
  softmax (fp32 accumulation), stopping at the row's own length rather than the padded
  span, plus the token itself, whose K/V it still holds in registers.

Taking the new token's K/V from registers instead of reading them back from the cache means
no program reads an address it wrote: on a GPU, another thread of the same program may hold
that cache element, and a global store is not visible to it without a barrier.

Numerics: the same values as SDPA on the same inputs, summed in another order (blocks,
online rescaling): fp32 agrees with SDPA to rounding (tests/test_decode_attention.py, run
with Triton's CPU interpreter, TRITON_INTERPRET=1). No split-K (flash-decoding): at batch 1
a layer runs `heads` programs, each reading its row's whole prefix; a split would need a
second reduction kernel per layer, the very thing this kernel removes.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the "sdpa" path needs none of this
    triton = tl = None

# Cached positions per step of the online softmax, and warps per program. Not tuned on a GPU;
# ptxas for sm_90 (fp16, D=64): 64/4 uses 162 registers, no spills; 128 spills below 8 warps.
BLOCK_N = 64
NUM_WARPS = 4
LOG2E = 1.0 / math.log(2.0)


def interpreting() -> bool:
    """The kernel was made under Triton's CPU interpreter (TRITON_INTERPRET=1 when this module
    was imported: triton.jit decides then): it runs on CPU tensors with numpy, for tests."""
    return triton is not None and type(_decode_attention_kernel).__name__ == "InterpretedFunction"


def check_usable(device: torch.device) -> None:
    """Refuse decode_attention="triton" where it cannot run, with the fix in the message."""
    if triton is None:
        raise ValueError("decode_attention='triton' needs the triton package (pip install triton; "
                         "CUDA builds of torch ship it), or use decode_attention='sdpa'")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"decode_attention='triton' runs on cuda only, not {device.type}: use 'sdpa' "
                         "(TRITON_INTERPRET=1 runs the kernel on CPU, for tests)")


if triton is not None:

    # span varies with the step (decode_runner's span buckets, the last one any cache length):
    # specialising on it (divisible by 16?) could compile a second variant inside a graph capture
    @triton.jit(do_not_specialize=["span"])
    def _decode_attention_kernel(
        qkv, kv, positions, out, span, scale_log2,
        qkv_row, qkv_part, qkv_head,  # strides of qkv [B, 3, heads, D] (D contiguous)
        kv_slot, kv_part, kv_head, kv_pos,  # strides of one layer's cache [slot, 2, heads, pos, D]
        out_row,  # stride of out [B, heads * D]
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        pos = tl.load(positions + row).to(tl.int64)

        token = qkv + row * qkv_row + head * qkv_head + d
        q = tl.load(token, mask=d_ok, other=0.0)
        k_new = tl.load(token + qkv_part, mask=d_ok, other=0.0)
        v_new = tl.load(token + 2 * qkv_part, mask=d_ok, other=0.0)
        keys = kv + row * kv_slot + head * kv_head  # decode row b owns slot b
        values = keys + kv_part
        tl.store(keys + pos * kv_pos + d, k_new, mask=d_ok)
        tl.store(values + pos * kv_pos + d, v_new, mask=d_ok)

        q = q.to(tl.float32)
        # the token itself opens the online softmax: a finite running max from the start,
        # so masked positions (-inf) never meet -inf - -inf
        m = tl.sum(q * k_new.to(tl.float32), axis=0) * scale_log2  # log2 domain: exp2 below
        total = tl.full((), 1.0, tl.float32)
        acc = v_new.to(tl.float32)
        n = tl.arange(0, BLOCK_N)
        # a graph's padding rows sit at the cache's last position, past every real row's span
        # (decode_runner.padded_inputs): they store their K/V and read nothing, their output unused
        stop = tl.where(pos < span, pos, 0)
        for start in range(0, stop, BLOCK_N):  # the positions before this token, in its own length
            at = start + n
            seen = at < pos
            offsets = at[:, None] * kv_pos + d[None, :]
            both = seen[:, None] & d_ok[None, :]
            k = tl.load(keys + offsets, mask=both, other=0.0).to(tl.float32)
            scores = tl.sum(k * q[None, :], axis=1) * scale_log2
            scores = tl.where(seen, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            rescale = tl.exp2(m - m_new)
            p = tl.exp2(scores - m_new)
            v = tl.load(values + offsets, mask=both, other=0.0).to(tl.float32)
            acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
            total = total * rescale + tl.sum(p, axis=0)
            m = m_new
        result = acc / total
        tl.store(out + row * out_row + head * HEAD_DIM + d, result.to(out.dtype.element_ty), mask=d_ok)


def decode_attention(qkv: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, span: int,
                     scale: float) -> torch.Tensor:
    """Store each row's K/V at its position in its slot of `kv`, attend over its prefix.

    qkv: [B, 3, heads, D], this step's Q|K|V; kv: one layer's cache [slots, 2, heads, max_len, D],
    row b in slot b; positions: [B] device integers, each < max_len (not checked: no host sync).
    A row at or past `span` is a CUDA graph's padding: it stores its K/V and its output is
    its own V, not attention (nobody reads it). Returns [B, heads * D] in qkv's dtype. One
    launch; capturable in a CUDA graph.
    """
    batch, parts, heads, head_dim = qkv.shape
    if parts != 3 or qkv.stride(3) != 1 or kv.stride(4) != 1:
        raise ValueError(f"qkv must be [B, 3, heads, D] and both contiguous in D, got {tuple(qkv.shape)}")
    if kv.shape[2] != heads or kv.shape[4] != head_dim or kv.shape[0] < batch or kv.dtype != qkv.dtype:
        raise ValueError(f"cache {tuple(kv.shape)} {kv.dtype} does not hold qkv {tuple(qkv.shape)} {qkv.dtype}")
    out = torch.empty((batch, heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    _decode_attention_kernel[(batch, heads)](
        qkv, kv, positions, out, span, scale * LOG2E,
        qkv.stride(0), qkv.stride(1), qkv.stride(2),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        out.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=BLOCK_N, num_warps=NUM_WARPS,
    )
    return out
