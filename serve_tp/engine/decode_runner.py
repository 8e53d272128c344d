"""Runs decode steps, replaying CUDA graphs on GPU and calling the forward eagerly otherwise.

A GPT-2-small decode step is a few hundred small kernels and 24 all-reduces: launched one
by one from Python it costs milliseconds of host time for microseconds of GPU work. A CUDA
graph launches the whole step at once. One graph is captured per (batch bucket, attention
span) pair: a step with n rows replays the smallest bucket >= n, the rows past n
decoding a dummy token at the last cache position of the slots after them
(`padded_inputs`), and attends over the smallest power-of-two span that covers every row. NCCL all-reduces are captured with the rest (every rank captures the
same graphs in the same order, at startup, so they replay in lockstep).
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import torch

from serve_tp.model.forward import GPT2Forward, KVCache

logger = logging.getLogger(__name__)

SMALLEST_SPAN = 64


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below max_batch, then max_batch itself."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch]


def attention_span(longest: int, max_len: int) -> int:
    """The power-of-two number of cached positions a decode step attends over (capped)."""
    span = SMALLEST_SPAN
    while span < longest:
        span *= 2
    return min(span, max_len)


def span_buckets(max_len: int) -> list[int]:
    """Every span `attention_span` can return for this cache length."""
    spans, span = [], SMALLEST_SPAN
    while span < max_len:
        spans.append(span)
        span *= 2
    return spans + [max_len]


def padded_inputs(tokens: Sequence[int], positions: Sequence[int], batch: int, max_len: int) -> list[list[int]]:
    """[tokens, positions] padded to a graph's batch: the padding rows write a dummy K/V
    into slots n..batch-1, where sequences still prefilling may sit. They write it at the
    cache's last position, which no prompt reaches (prompts end before it) and which a real
    decode there writes itself before reading, so no sequence ever reads a dummy."""
    pad = batch - len(tokens)
    return [list(tokens) + [0] * pad, list(positions) + [max_len - 1] * pad]


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= n)


class DecodeRunner:
    """Decode steps for slots 0..n-1 of `cache`; graphs when `use_graphs` and on CUDA."""

    def __init__(self, forward: GPT2Forward, cache: KVCache, use_graphs: bool):
        self.forward = forward
        self.cache = cache
        self.use_graphs = use_graphs and forward.device.type == "cuda"
        self.batches = batch_buckets(cache.slots)
        self.spans = span_buckets(cache.max_len)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}
        self._tokens: Optional[torch.Tensor] = None
        self._positions: Optional[torch.Tensor] = None
        self.capture_s = 0.0

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket's graph (largest first, sharing one memory pool)."""
        if not self.use_graphs:
            return
        started = time.monotonic()
        device = self.forward.device
        self._tokens = torch.zeros(self.cache.slots, dtype=torch.long, device=device)
        self._positions = torch.zeros(self.cache.slots, dtype=torch.long, device=device)
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # compiled pieces (compile_decode) compile on first sight of a shape: every bucket once
        warm = self.batches if getattr(self.forward, "compiled", None) is not None else (self.batches[-1], 1)
        with torch.cuda.stream(side):  # warm-up: lazy inits (cuBLAS handles, NCCL) stay out of the graphs
            for batch in warm:
                self._eager(batch, self.spans[-1])
        torch.cuda.current_stream().wait_stream(side)
        for batch in reversed(self.batches):
            for span in reversed(self.spans):
                graph = torch.cuda.CUDAGraph()
                # thread_local: NCCL's watchdog thread may query events while we capture
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self._outputs[(batch, span)] = self._eager(batch, span)
                self._graphs[(batch, span)] = graph
        torch.cuda.synchronize()
        self.capture_s = time.monotonic() - started
        logger.info("captured %d decode graphs in %.2fs", len(self._graphs), self.capture_s)

    def _eager(self, batch: int, span: int) -> torch.Tensor:
        return self.forward.decode(self.cache, self._tokens[:batch], self._positions[:batch], span)

    @torch.inference_mode()
    def run(self, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Logits [n, V] for token i at position positions[i] of slot i."""
        n = len(tokens)
        span = attention_span(max(positions) + 1, self.cache.max_len)
        if not self._graphs:
            device = self.forward.device
            return self.forward.decode(
                self.cache, torch.tensor(tokens, device=device), torch.tensor(positions, device=device), span
            )
        batch = bucket_for(n, self.batches)
        host = torch.tensor(padded_inputs(tokens, positions, batch, self.cache.max_len), dtype=torch.long)
        self._tokens[:batch].copy_(host[0])
        self._positions[:batch].copy_(host[1])
        self._graphs[(batch, span)].replay()
        return self._outputs[(batch, span)][:n]
