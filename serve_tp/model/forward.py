"""GPT-2's forward pass over one rank's shard and a preallocated KV cache.

Hugging Face's forward grows its KV cache by concatenation, rebuilds masks on the host
and costs hundreds of kernel launches per token. Here every sequence owns a fixed slot
of one cache tensor, so a decode step has static shapes and can be captured as a CUDA
graph (decode_runner.py); its cache write and attention may be one Triton kernel per
layer (decode_attention.py, `decode_attention="triton"`). The maths is GPT-2's
(transformers' GPT2Block); the weights are a `GPT2Shard` (shard.py), whose plan gives this
rank's head count (ranks may differ by one head), and the row-parallel outputs are summed
with the group's all-reduce.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Protocol, Sequence, Union

import torch
import torch.nn.functional as F

from serve_tp.model.epilogue import TANH_GELU, bias_tanh_gelu
from serve_tp.model.host_copy import upload, upload_tensor
from serve_tp.model.shard import BlockShard, Conv1DWeights, GPT2Shard

logger = logging.getLogger(__name__)

AllReduce = Callable[[torch.Tensor], None]
DECODE_ATTENTION = ("sdpa", "triton")


class DecodeAllReduce(Protocol):
    """A sum over the ranks for decode-sized partials (serve_tp/engine/fast_all_reduce.py)."""

    def fits(self, rows: int, width: int) -> bool: ...

    def target(self, rows: int, width: int, slot: int = 0) -> Optional[torch.Tensor]: ...

    def __call__(self, partial: torch.Tensor, cast: bool = True, residual: Optional[torch.Tensor] = None,
                 slot: int = 0) -> torch.Tensor: ...


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """GPT-2's tanh GELU as one fused kernel; any other activation as transformers has it."""
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def attention_scales(config, num_layers: int, head_dim: int) -> list[float]:
    """Each layer's softmax scale, as GPT2Attention computes it."""
    scales = []
    for index in range(num_layers):
        scale = 1.0 / math.sqrt(head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= index + 1
        scales.append(scale)
    return scales


class GPT2Forward:
    """Prefill and decode of one rank's GPT-2 shard into slots of a `KVCache`."""

    def __init__(self, shard: GPT2Shard, all_reduce: Optional[AllReduce] = None,
                 decode_all_reduce: Optional["DecodeAllReduce"] = None, compile_decode: Union[bool, str] = False,
                 decode_attention: str = "sdpa", mlp_epilogue: bool = False, fused_decode: bool = False):
        plan = shard.plan
        if plan.world_size > 1 and all_reduce is None:
            raise ValueError(f"a shard of a {plan.world_size}-rank plan needs the group's all_reduce")
        self.shard = shard
        self.num_heads = plan.heads  # this rank's heads
        self.head_dim = plan.head_dim
        self.num_layers = len(shard.blocks)
        self.world_size = plan.world_size
        self.rank = plan.rank
        self.all_reduce = all_reduce
        # the decode step's faster all-reduce (fast_all_reduce.py), None: `all_reduce` there too
        self.decode_all_reduce = decode_all_reduce
        self.wte, self.wpe = shard.wte, shard.wpe
        self.ln_f = shard.ln_f
        self.lm_head = shard.vocab_projection
        self.act = _activation(shard.config.activation_function)
        # c_fc's bias + tanh GELU in cuBLASLt's GEMM epilogue (epilogue.py): off by default, as
        # on H200 it was neither exact (5-10x fp32 rounding) nor faster; gpu_profile --mlp-epilogue
        self.mlp_epilogue = mlp_epilogue and shard.config.activation_function in TANH_GELU
        self.device, self.dtype = shard.device, shard.dtype
        self.blocks: list[BlockShard] = list(shard.blocks)
        self.scales = attention_scales(shard.config, self.num_layers, self.head_dim)
        if decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION}, got {decode_attention!r}")
        # "triton": the decode step's cache write + attention as one kernel per layer (decode_attention.py)
        self.decode_attention = decode_attention
        self._attention_kernel = None
        if decode_attention == "triton":
            from serve_tp.model.decode_attention import check_usable, decode_attention as kernel

            check_usable(self.device)
            self._attention_kernel = kernel
        # steps of up to fused_linear.MAX_ROWS rows as five Triton kernels a layer (fused_linear.py)
        self.fused = None
        if fused_decode:
            self.fused = self._fused_kernels(shard.config.activation_function)
        self.compiled = None  # torch.compile'd pieces of decode (compiled.py), when asked and possible
        if compile_decode:
            from serve_tp.model.compiled import compiled_pieces, gelu_approximation

            self.gelu = gelu_approximation(shard.config.activation_function)
            if self.gelu is None:
                logger.warning("compile_decode: activation %s is not a GELU; decode stays eager",
                               shard.config.activation_function)
            else:
                # True: Inductor's default mode; a string: that mode (gpu_profile.py --compile max)
                self.compiled = compiled_pieces(compile_decode if isinstance(compile_decode, str) else "default")

    def _fused_kernels(self, activation: str):
        """fused_linear (and the attention kernel it runs beside), or None with a warning
        where the model's activation has no fused epilogue."""
        from serve_tp.model import fused_linear
        from serve_tp.model.compiled import gelu_approximation
        from serve_tp.model.decode_attention import check_usable, decode_attention as kernel

        self.gelu = gelu_approximation(activation)
        if self.gelu is None:
            logger.warning("fused_decode: activation %s has no fused epilogue; decode stays unfused", activation)
            return None
        check_usable(self.device)
        # the fused step's attention is Triton's kernel, and so is that of steps too large to fuse
        self._attention_kernel, self.decode_attention = kernel, "triton"
        fused_linear.workspace(self.device)  # split-K's, before any CUDA graph captures its address
        return fused_linear

    def new_cache(self, slots: int, max_len: int) -> "KVCache":
        return KVCache(self.num_layers, slots, self.num_heads, max_len, self.head_dim, self.dtype, self.device)

    # ---- pieces shared by prefill and decode ----
    def _row_parallel(self, x: torch.Tensor, linear: Conv1DWeights, decode: bool = False,
                      cast: bool = True, residual: Optional[torch.Tensor] = None, slot: int = 0) -> torch.Tensor:
        """x @ W summed over the ranks, plus `residual` when given. Rank 0 adds the bias
        inside its GEMM, so the sum holds it exactly once without a separate kernel.

        In a decode step the sum may go through `decode_all_reduce`, whose result may be valid
        only until its next call (symm_mem's: callers add it to the residual at once, or hand
        it the residual, which the p2p kernel adds in the same launch); `cast=False` leaves it in the
        dtype it was summed in (float32 for symm_mem's fp16 staging). `slot`: 0 for the
        attention sum, 1 for the MLP's, so consecutive calls alternate (p2p_all_reduce.py)."""
        fast = self.decode_all_reduce if decode and self.world_size > 1 else None
        rows, width = x.shape[0], linear.weight.shape[1]
        if fast is not None and fast.fits(rows, width):
            return fast(self._project(x, linear, fast.target(rows, width, slot)), cast, residual=residual, slot=slot)
        out = self._project(x, linear)
        if self.world_size > 1:
            self.all_reduce(out)
        return out if residual is None else residual + out

    def _project(self, x: torch.Tensor, linear: Conv1DWeights, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This rank's partial x @ W (+ bias on rank 0), into `out` when given."""
        if self.rank == 0:
            return torch.addmm(linear.bias, x, linear.weight, out=out)
        return torch.mm(x, linear.weight, out=out)

    def _mlp(self, block: BlockShard, h: torch.Tensor, decode: bool = False) -> torch.Tensor:
        if self.mlp_epilogue:
            x = bias_tanh_gelu(block.c_fc.bias, block.ln_2(h), block.c_fc.weight)
        else:
            x = self.act(torch.addmm(block.c_fc.bias, block.ln_2(h), block.c_fc.weight))
        return self._row_parallel(x, block.mlp_proj, decode, residual=h, slot=1)

    def _qkv(self, block: BlockShard, h: torch.Tensor) -> torch.Tensor:
        """[tokens, E] -> [tokens, 3, heads, head_dim]."""
        qkv = torch.addmm(block.c_attn.bias, block.ln_1(h), block.c_attn.weight)
        return qkv.view(h.shape[0], 3, self.num_heads, self.head_dim)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln_f(h), self.lm_head)

    # ---- prefill: new prompts, right-padded, into consecutive slots ----
    @torch.inference_mode()
    def prefill(
        self, cache: "KVCache", first_slot: int, prompts: Sequence[Sequence[int]], keep_all: Sequence[int] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run whole prompts, store their K/V in slots first_slot.., return last-token logits [n, V],
        and for each row in `keep_all` the logits of all its prompt positions [len, V].

        Rows are right-padded: causal attention keeps each real token from seeing the
        padding after it, and decode overwrites the padded positions before reading them.
        """
        n, length = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros((n, length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        ids = upload_tensor(ids, self.device)
        positions = torch.arange(length, device=self.device)
        h = (F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)).view(n * length, -1)
        slots = slice(first_slot, first_slot + n)
        for layer, (block, scale) in enumerate(zip(self.blocks, self.scales)):
            q, k, v = self._qkv(block, h).view(n, length, 3, self.num_heads, self.head_dim).unbind(2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [n, heads, T, D]
            cache.kv[layer, slots, 0, :, :length] = k
            cache.kv[layer, slots, 1, :, :length] = v
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            attn = attn.transpose(1, 2).reshape(n * length, self.num_heads * self.head_dim)
            h = h + self._row_parallel(attn, block.attn_proj)
            h = self._mlp(block, h)
        h = h.view(n, length, -1)
        last = upload([len(p) - 1 for p in prompts], torch.long, self.device)
        every = {row: self._logits(h[row, : len(prompts[row])]) for row in keep_all}
        return self._logits(h[torch.arange(n, device=self.device), last]), every

    # ---- a chunk of one prompt, after the part already in its slot ----
    @torch.inference_mode()
    def prefill_chunk(
        self, cache: "KVCache", slot: int, tokens: Sequence[int], start: int, last: bool, keep_all: bool,
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Prompt tokens at positions [start, start + len(tokens)) of the sequence in `slot`,
        whose positions before `start` are already cached.

        Stores the chunk's K/V and returns (the last position's logits [1, V] if `last`,
        every position's logits [len, V] if `keep_all`). Each position attends over the
        cached prefix and the chunk up to itself (an explicit mask: the causal diagonal
        is offset by `start`).
        """
        n, end = len(tokens), start + len(tokens)
        ids = upload(list(tokens), torch.long, self.device)
        positions = torch.arange(start, end, device=self.device)
        h = F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)
        visible = torch.arange(end, device=self.device)[None, :] <= positions[:, None]  # [n, end]
        for layer, (block, scale) in enumerate(zip(self.blocks, self.scales)):
            q, k, v = self._qkv(block, h).permute(1, 2, 0, 3).unbind(0)  # each [heads, n, D]
            cache.kv[layer, slot, 0, :, start:end] = k
            cache.kv[layer, slot, 1, :, start:end] = v
            keys, values = cache.kv[layer, slot, 0, :, :end], cache.kv[layer, slot, 1, :, :end]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scale)  # [heads, n, D]
            h = h + self._row_parallel(attn.transpose(0, 1).reshape(n, self.num_heads * self.head_dim),
                                       block.attn_proj)
            h = self._mlp(block, h)
        return (self._logits(h[-1:]) if last else None), (self._logits(h) if keep_all else None)

    # ---- decode: one token for each of the first `tokens.shape[0]` slots ----
    def decode(self, cache: "KVCache", tokens: torch.Tensor, positions: torch.Tensor, span: int) -> torch.Tensor:
        """Logits [B, V] for token b at position positions[b] of slot b, for b < B.

        Attends over the first `span` cached positions (> every position), masking those
        after each row's own. Static shapes for fixed B and span; no host synchronisation,
        so it can be captured as a CUDA graph.
        """
        if self.fused is not None and tokens.shape[0] <= self.fused.MAX_ROWS:
            return self._decode_fused(cache, tokens, positions, span)
        rows = mask = None  # the Triton kernel needs neither: each row stops at its own position
        if self.decode_attention == "sdpa":
            rows, mask = sdpa_decode_mask(positions, span, self.dtype)
        if self.compiled is not None:
            return self._decode_compiled(cache, tokens, rows, positions, mask, span)
        h = F.embedding(tokens, self.wte) + F.embedding(positions, self.wpe)
        for layer, block in enumerate(self.blocks):
            attn = self._attend(cache, layer, self._qkv(block, h), rows, positions, mask, span)
            h = self._row_parallel(attn, block.attn_proj, decode=True, residual=h, slot=0)
            h = self._mlp(block, h, decode=True)
        return self._logits(h)

    def _decode_fused(self, cache: "KVCache", tokens: torch.Tensor, positions: torch.Tensor, span: int) -> torch.Tensor:
        """decode() as five launches a layer: layer norm + Q|K|V, attention with the cache
        write, the attention's projection + sum + residual, layer norm + c_fc + GELU, the
        MLP's projection + sum + residual (fused_linear.py)."""
        fused, batch = self.fused, tokens.shape[0]
        h = F.embedding(tokens, self.wte) + F.embedding(positions, self.wpe)
        for layer, block in enumerate(self.blocks):
            qkv = fused.ln_linear(h, block.ln_1, block.c_attn.weight, block.c_attn.bias)
            attn = self._attention_kernel(qkv.view(batch, 3, self.num_heads, self.head_dim), cache.kv[layer],
                                          positions, span, self.scales[layer])
            h = self._fused_row_parallel(attn, block.attn_proj, h, slot=0)
            x = fused.ln_linear(h, block.ln_2, block.c_fc.weight, block.c_fc.bias, gelu=self.gelu)
            h = self._fused_row_parallel(x, block.mlp_proj, h, slot=1)
        return self._logits(h)

    def _fused_row_parallel(self, x: torch.Tensor, linear: Conv1DWeights, residual: torch.Tensor,
                            slot: int) -> torch.Tensor:
        """residual + x @ W summed over the ranks, in the GEMM's own kernel where the p2p
        all-reduce's buffers can take it (else the kernel's partial goes through the group's
        all-reduce). Rank 0 adds the bias, as in _row_parallel."""
        bias = linear.bias if self.rank == 0 else None
        if self.world_size == 1:
            return self.fused.linear_sum(x, linear.weight, bias, residual)
        fast = self.decode_all_reduce
        if hasattr(fast, "takes_linear") and fast.takes_linear(*x.shape, linear.weight.shape[1]):
            return fast.linear(x, linear.weight, bias, residual, slot=slot)
        partial = self.fused.linear_sum(x, linear.weight, bias)
        self.all_reduce(partial)
        return residual + partial

    def _attend(self, cache: "KVCache", layer: int, qkv: torch.Tensor, rows, positions, mask, span: int):
        """Store this token's K/V in its slot, attend over the first `span` positions: [B, heads * D]."""
        if self._attention_kernel is not None:
            return self._attention_kernel(qkv, cache.kv[layer], positions, span, self.scales[layer])
        return sdpa_decode_attention(qkv, cache.kv[layer], rows, positions, mask, span, self.scales[layer])

    def _decode_compiled(self, cache: "KVCache", tokens, rows, positions, mask, span: int) -> torch.Tensor:
        """decode() with the pieces between GEMMs and all-reduces compiled (compiled.py).

        The embeddings are gathered inside the first piece; each sum is handed on un-cast and
        added to the residual inside the next piece."""
        from serve_tp.model.compiled import batch_dynamic

        pieces, batch, total = self.compiled, tokens.shape[0], None
        for layer, block in enumerate(self.blocks):
            ln, fused = block.ln_1, block.c_attn
            if layer == 0:
                batch_dynamic(tokens, positions)
                h, qkv = pieces.embedded_attention_input(tokens, positions, self.wte, self.wpe, ln.weight, ln.bias,
                                                         ln.eps, fused.weight, fused.bias)
            else:
                batch_dynamic(h, total)
                h, qkv = pieces.attention_input(h, total, ln.weight, ln.bias, ln.eps, fused.weight, fused.bias)
            attn = self._attend(cache, layer, qkv.view(batch, 3, self.num_heads, self.head_dim), rows, positions,
                                mask, span)
            total = self._row_parallel(attn, block.attn_proj, decode=True, cast=False, slot=0)
            batch_dynamic(h, total)
            h, x = pieces.mlp_input(h, total, block.ln_2.weight, block.ln_2.bias, block.ln_2.eps,
                                    block.c_fc.weight, block.c_fc.bias, self.gelu, self.mlp_epilogue)
            total = self._row_parallel(x, block.mlp_proj, decode=True, cast=False, slot=1)
        batch_dynamic(h, total)
        return F.linear(pieces.final_norm(h, total, self.ln_f.weight, self.ln_f.bias, self.ln_f.eps), self.lm_head)


def sdpa_decode_mask(positions: torch.Tensor, span: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, additive mask [B, 1, 1, span]) for `sdpa_decode_attention`, made once per step: -inf
    at the positions after each row's own (a boolean mask is converted again in every layer)."""
    batch = positions.shape[0]
    rows = torch.arange(batch, device=positions.device)
    hidden = torch.arange(span, device=positions.device)[None, :] > positions[:, None]
    mask = torch.zeros((batch, 1, 1, span), dtype=dtype, device=positions.device)
    return rows, mask.masked_fill_(hidden.view(batch, 1, 1, span), float("-inf"))


def sdpa_decode_attention(qkv: torch.Tensor, kv: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                          mask: torch.Tensor, span: int, scale: float) -> torch.Tensor:
    """decode_attention="sdpa": index_put this token's K/V into one layer's cache `kv`, then SDPA
    over the first `span` positions under decode()'s additive mask: [B, heads * D]."""
    batch = qkv.shape[0]
    kv[rows, :, :, positions] = qkv[:, 1:]  # this token's K and V, one write
    attn = F.scaled_dot_product_attention(
        qkv[:, 0].unsqueeze(2), kv[:batch, 0, :, :span], kv[:batch, 1, :, :span], attn_mask=mask, scale=scale,
    )
    return attn.reshape(batch, -1)


class KVCache:
    """Keys and values of every layer for `slots` sequences of up to `max_len` tokens.

    Zero-filled: masked positions are multiplied by a zero weight, which must not meet NaN.
    """

    def __init__(self, layers: int, slots: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        # [layer, slot, key|value, head, position, head_dim]: a token's K and V in one write
        self.kv = torch.zeros((layers, slots, 2, heads, max_len, head_dim), dtype=dtype, device=device)
        self.slots, self.max_len = slots, max_len

    def move(self, source: int, target: int, length: int) -> None:
        """Copy slot `source`'s first `length` positions into slot `target`."""
        self.kv[:, target, :, :, :length] = self.kv[:, source, :, :, :length]

    def move_many(self, sources: list[int], targets: list[int], length: int) -> None:
        """Copy slots `sources`' first `length` positions into slots `targets`: every source
        is read before any target is written, so the moves may form cycles (a swap). The slot
        indices go up through pinned copies: indexing with host lists would make torch copy
        them synchronously, the host waiting for the step in flight (async scheduling)."""
        source_rows, target_rows = (upload(rows, torch.long, self.kv.device) for rows in (sources, targets))
        self.kv[:, target_rows, :, :, :length] = self.kv[:, source_rows, :, :, :length]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

