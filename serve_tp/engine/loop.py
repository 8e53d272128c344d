"""The per-rank decode loop: rank 0 schedules, every rank executes the same step plans.

Continuous batching: between two decode steps rank 0 evicts finished or cancelled
sequences and admits waiting ones, then broadcasts the step plan on a CPU (gloo) control
group. Every rank runs exactly the plans it receives, in order, so the collectives inside
the forward pass can never interleave between requests, however many clients there are.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from serve_tp.engine.batch import SequenceBatch
from serve_tp.engine.sampling import make_generator, sample_tokens
from serve_tp.messages import SamplingParams, SequenceOutput, SequenceRequest

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # an idle rank 0 still sends an empty plan this often


@dataclass
class StepPlan:
    """What every rank does in one step; built by rank 0 only."""

    evict: list[str] = field(default_factory=list)
    decode_tokens: list[int] = field(default_factory=list)  # one per remaining row, row order
    admit: list[tuple[str, list[int]]] = field(default_factory=list)
    shutdown: bool = False


Sink = Callable[[SequenceOutput], None]
Broadcast = Callable[[Optional[StepPlan]], StepPlan]


@dataclass
class _Sequence:
    seq_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    generator: Optional[torch.Generator] = None
    generated: int = 0
    next_token: Optional[int] = None


class StepTimings:
    """Where rank 0's working steps spend their time, averaged over the last window.

    On GPU the forward only launches kernels (or replays a graph); waiting for them to
    finish falls in `sample_and_emit`, where the sampled tokens are first read back.
    """

    WINDOW = 256

    def __init__(self):
        self._sums = [0.0, 0.0, 0.0]
        self._count = 0

    def add(self, broadcast_s: float, forward_s: float, sample_s: float) -> None:
        if self._count >= self.WINDOW:
            self._sums, self._count = [0.0, 0.0, 0.0], 0
        for i, value in enumerate((broadcast_s, forward_s, sample_s)):
            self._sums[i] += value
        self._count += 1

    def averages_ms(self) -> dict:
        n = max(self._count, 1)
        names = ("broadcast", "forward", "sample_and_emit")
        return {name: round(1000 * total / n, 3) for name, total in zip(names, self._sums)}


def execute(batch: SequenceBatch, plan: StepPlan) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Run one plan on this rank's batch; returns (decode logits, admit logits)."""
    if plan.evict:
        batch.evict(plan.evict)
    decode_logits = batch.decode(plan.decode_tokens) if plan.decode_tokens else None
    admit_logits = None
    if plan.admit:
        admit_logits = batch.admit([sid for sid, _ in plan.admit], [ids for _, ids in plan.admit])
    return decode_logits, admit_logits


class EngineLoop:
    """Runs on a background thread of every rank actor; rank 0 leads, the others follow."""

    def __init__(
        self,
        batch: SequenceBatch,
        broadcast: Broadcast,
        rank: int,
        *,
        eos_token_id: Optional[int],
        max_context: int,
        max_batch_size: int,
        batch_wait_s: float,
        on_step: Optional[Callable[[int, int, int], None]] = None,
    ):
        self.batch = batch
        self.broadcast = broadcast
        self.rank = rank
        self.eos_token_id = eos_token_id
        self.max_context = max_context
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.on_step = on_step  # rank 0's metrics: (batch size, waiting, running) after each step
        self.failure: Optional[BaseException] = None
        self.last_step_at = time.monotonic()
        self.steps = 0
        self._cond = threading.Condition()
        self._pending: deque[_Sequence] = deque()
        self._active: dict[str, _Sequence] = {}
        self._cancelled: set[str] = set()
        self._to_evict: list[str] = []
        self._stopping = False
        self._timings = StepTimings()
        self._thread = threading.Thread(target=self._run, name=f"engine-rank{rank}", daemon=True)

    # ---- called from the actor's threads ----
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: SequenceRequest, sink: Sink) -> None:
        """Queue a sequence (rank 0 only); its tokens arrive through `sink`."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 accepts sequences")
        with self._cond:
            if self.failure is not None:
                raise RuntimeError(f"engine failed: {self.failure!r}")
            self._pending.append(_Sequence(request.seq_id, list(request.prompt_ids), request.params, sink))
            self._cond.notify()

    def cancel(self, seq_id: str) -> None:
        with self._cond:
            self._cancelled.add(seq_id)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def has_work(self) -> bool:
        return bool(self._pending or self._active)

    def load(self) -> dict:
        return {"running": len(self._active), "waiting": len(self._pending), "steps": self.steps,
                "step_ms": self._timings.averages_ms()}

    # ---- the loop ----
    def _run(self) -> None:
        try:
            if self.rank == 0:
                self._lead()
            else:
                self._follow()
        except BaseException as exc:  # a dead peer surfaces here as a collective error
            logger.exception("engine loop of rank %d failed", self.rank)
            self.failure = exc
            self._fail_all(repr(exc))

    def _follow(self) -> None:
        while True:
            plan = self.broadcast(None)
            if plan.shutdown:
                return
            execute(self.batch, plan)
            self.last_step_at = time.monotonic()
            self.steps += 1

    def _lead(self) -> None:
        clock = time.perf_counter
        while True:
            plan = self._next_plan()
            t0 = clock()
            self.broadcast(plan)
            if plan.shutdown:
                return
            t1 = clock()
            decode_logits, admit_logits = execute(self.batch, plan)
            t2 = clock()
            self._sample(decode_logits, admit_logits)
            t3 = clock()
            if plan.decode_tokens or plan.admit:
                self._timings.add(t1 - t0, t2 - t1, t3 - t2)
            self.last_step_at = time.monotonic()
            self.steps += 1
            if self.on_step is not None:
                self.on_step(len(plan.decode_tokens) + len(plan.admit), len(self._pending), len(self._active))

    def _next_plan(self) -> StepPlan:
        with self._cond:
            if not (self._active or self._pending or self._stopping):
                self._cond.wait(timeout=HEARTBEAT_S)
                if self._pending and not self._active and self.batch_wait_s > 0:
                    # Idle until now: give concurrent arrivals a moment to join this batch.
                    deadline = time.monotonic() + self.batch_wait_s
                    while len(self._pending) < self.max_batch_size and not self._stopping:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(timeout=left)
            if self._stopping:
                return StepPlan(shutdown=True)
            evict = self._take_evictions()
            room = self.max_batch_size - len(self._active)
            admitted = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
        for seq in admitted:
            seq.generator = make_generator(seq.params)
            self._active[seq.seq_id] = seq
        decode_tokens = [self._active[sid].next_token for sid in self.batch.rows_after_evict(evict)]
        return StepPlan(
            evict=evict,
            decode_tokens=decode_tokens,
            admit=[(s.seq_id, s.prompt_ids) for s in admitted],
        )

    def _take_evictions(self) -> list[str]:
        """Finished rows plus cancelled ones; cancelled waiting sequences just leave the queue."""
        evict, self._to_evict = self._to_evict, []
        if self._cancelled:
            for seq in [s for s in self._pending if s.seq_id in self._cancelled]:
                self._pending.remove(seq)
                seq.sink(SequenceOutput([], finish_reason="cancelled"))
            for sid in self._cancelled & self._active.keys():
                if sid not in evict:
                    evict.append(sid)
                    self._active[sid].sink(SequenceOutput([], finish_reason="cancelled"))
            self._cancelled.clear()
        for sid in evict:
            self._active.pop(sid, None)
        return evict

    def _sample(self, decode_logits, admit_logits) -> None:
        """One token per batch row: decoded rows first, then the admitted ones (row order)."""
        logits = [t for t in (decode_logits, admit_logits) if t is not None]
        if not logits:
            return
        seqs = [self._active[sid] for sid in self.batch.seq_ids]
        all_logits = torch.cat(logits)
        try:
            tokens = sample_tokens(all_logits, [s.params for s in seqs], [s.generator for s in seqs])
        except Exception:  # one sequence's params must not take the whole group down
            tokens = [self._sample_one(all_logits[i:i + 1], seq) for i, seq in enumerate(seqs)]
        for seq, token in zip(seqs, tokens):
            if token is None:
                self._to_evict.append(seq.seq_id)
                seq.sink(SequenceOutput([], finish_reason="error", error="sampling failed for this sequence"))
                continue
            seq.generated += 1
            finish = None
            if token == self.eos_token_id and not seq.params.ignore_eos:
                finish = "stop"
            elif seq.generated >= seq.params.max_tokens:
                finish = "length"
            elif len(seq.prompt_ids) + seq.generated >= self.max_context:
                finish = "length"
            if finish is None:
                seq.next_token = token
                seq.sink(SequenceOutput([token]))
            else:
                self._to_evict.append(seq.seq_id)
                # EOS counts as a completion token (as vLLM and OpenAI count it); the
                # detokenizer skips it as a special token.
                seq.sink(SequenceOutput([token], finish_reason=finish))

    def _sample_one(self, logits: torch.Tensor, seq: _Sequence) -> Optional[int]:
        try:
            return sample_tokens(logits, [seq.params], [seq.generator])[0]
        except Exception:
            logger.exception("sampling failed for sequence %s", seq.seq_id)
            return None

    def _fail_all(self, message: str) -> None:
        with self._cond:
            doomed = list(self._active.values()) + list(self._pending)
            self._active.clear()
            self._pending.clear()
        for seq in doomed:
            try:
                seq.sink(SequenceOutput([], finish_reason="error", error=message))
            except Exception:  # a sink whose caller is gone
                pass
