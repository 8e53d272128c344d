"""The sampler's device chain replayed as CUDA graphs, one per `SamplePlan` (rank 0, CUDA only).

A sampled step is a chain of some 30-100 small kernels (temperature, softmax, sort, cumsum,
searchsorted, gathers...): at small batches the GPU waits on Python launching them (at
batch 1 on H200: 0.7 ms for temperature alone, 1.8 ms with top-p, against 0.09 ms for
greedy's one argmax). Replayed as a graph, the chain launches at once.

Why one graph per exact row count, not per padded bucket as the decode graphs: a CUDA
reduction picks its thread layout from the number of rows (torch's Reduce splits a row
over 512 threads when it is alone and over 32 when there are 128), and topk picks its
algorithm the same way, so a padded row count can change a real row's sums in the last
bit, or the order of tied candidates, and with it a token. With the plan's exact shapes
the graph launches the kernels the eager chain does, and its tokens are the eager
sampler's bit for bit.

A plan is captured the second time it comes (the first, eager run is the warm-up that
does the kernels' lazy initialisation, and a one-off plan never costs a capture). No
collectives run here and only rank 0 samples, so capturing lazily mid-serve is safe.
The graphs share one private memory pool apart from the decode graphs'; each replay's
outputs are copied out, since another plan's replay may reuse the pool memory they sit in.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, NamedTuple, Optional

import torch

from serve_tp.engine.sampling_plan import SamplePlan

logger = logging.getLogger(__name__)

MAX_GRAPHS = 256  # plans past this many run eagerly (each graph holds its outputs and a graph exec)

Chain = Callable[[SamplePlan, torch.Tensor], tuple]


class _Captured(NamedTuple):
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # the static input the graph reads
    outputs: tuple  # what the chain returned during capture (tensors or None)


class SamplerGraphs:
    """Replays `chain(plan, logits)` from a graph when it can; `run` returns None when the caller
    should run the chain eagerly instead (first sight of a plan, a failed capture, a host read)."""

    def __init__(self, chain: Chain, layout: Callable[[], tuple]):
        self._chain = chain
        self._layout = layout  # where the slot state's optional tables live (graphs read them by address)
        self._current_layout: Optional[tuple] = None
        self._pool = None
        self._graphs: dict[SamplePlan, _Captured] = {}
        self._seen: set[SamplePlan] = set()
        self._refused: set[SamplePlan] = set()
        self._warned_full = False
        self.capture_s = 0.0
        self.replays = 0

    @property
    def count(self) -> int:
        return len(self._graphs)

    @property
    def refused(self) -> int:
        """Plans whose capture failed (each logged once; they run eagerly)."""
        return len(self._refused)

    def run(self, plan: SamplePlan, logits: torch.Tensor) -> Optional[tuple]:
        if plan.reads_host or plan in self._refused:
            return None
        layout = self._layout()
        if layout != self._current_layout:
            # A table was (re)allocated (the first biased or penalised request, a longer
            # bias list): graphs captured before read the old one.
            self._graphs.clear()
            self._current_layout = layout
        captured = self._graphs.get(plan)
        if captured is None:
            if plan not in self._seen:
                self._seen.add(plan)
                return None
            if len(self._graphs) >= MAX_GRAPHS:
                if not self._warned_full:
                    logger.warning("%d sampler graphs captured; new sampling plans run eagerly", MAX_GRAPHS)
                    self._warned_full = True
                return None
            captured = self._capture(plan, logits)
            if captured is None:
                return None
        captured.logits.copy_(logits)
        captured.graph.replay()
        self.replays += 1
        return tuple(None if out is None else out.clone() for out in captured.outputs)

    def _capture(self, plan: SamplePlan, logits: torch.Tensor) -> Optional[_Captured]:
        started = time.monotonic()
        try:
            static = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: NCCL's watchdog thread may query events while we capture
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                outputs = self._chain(plan, static)
        except Exception:  # noqa: BLE001 -- any capture failure: that plan stays eager, serving goes on
            logger.warning("capturing the sampler graph for %s failed; it runs eagerly", plan, exc_info=True)
            self._refused.add(plan)
            return None
        self._graphs[plan] = captured = _Captured(graph, static, outputs)
        self.capture_s += time.monotonic() - started
        logger.debug("captured a sampler graph for %s in %.1f ms", plan, 1000 * (time.monotonic() - started))
        return captured
