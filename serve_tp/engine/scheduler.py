"""Rank 0's scheduler: the waiting queue, admission, eviction, and each step's plan.

Threads: `submit`, `cancel` and `stop` come from the actor's threads and touch only the
state behind `_cond` (waiting queue, cancellations, counters). The running sequences
(`_running`) belong to the engine thread alone. The row order of a plan is not decided
here: the batch defines it (`rows_after_evict`), and the scheduler asks.

Chunked prefill: each step prefills at most `max_prefill_tokens` prompt tokens. A long
prompt thus spreads over several steps while the running streams decode in every one of
them, and a step's cost stays bounded however long the prompts that arrive. (vLLM's
chunked prefill, with its max_num_batched_tokens.)

The budget is handed out in two rounds (`allot`), both in turn order (the prompts already
part-way through, then newly admitted ones): first a share of at most
`prefill_share_tokens` to each, then what is left to each unfinished one. Purely first come,
first served, a short prompt behind long ones waited for their chunks (issue #10: TTFT p99
doubled under 32 users with prompts of 16-900 tokens); with shares it finishes in the step
it is admitted unless budget/share prompts are ahead of it. vLLM caps a prompt's tokens per
step outright (long_prefill_token_threshold); here the share is a cap only while the budget
is contended, so an uncontended step plans what plain first come, first served would, and
a lone long prompt is not stretched over more steps than the budget needs. A prompt may now
finish before one admitted earlier: the batch brings finishers to the front of its
prefilling slots (SequenceBatch.prefill).

Async scheduling (`async_scheduling`): the loop plans step n+1 before it has read step
n's tokens, so a plan names how many rows decode, not their tokens (they stay on the
device), and a finish seen in step n's tokens is evicted by plan n+2: evictions lag a
step, and a finished row computes one extra token that nobody sees. Cancelled sequences
are marked ended when they are evicted, so no token computed before reaches them after
their "cancelled".
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence as Seq

from serve_tp.engine.plan import PrefillChunk, StepPlan
from serve_tp.engine.sampling import random_seed
from serve_tp.messages import SequenceOutput, SequenceRequest

HEARTBEAT_S = 1.0  # an idle rank 0 still sends an empty plan this often

Sink = Callable[[SequenceOutput], None]


@dataclass
class Sequence:
    """Rank 0's record of one sequence, from submission to its finish."""

    request: SequenceRequest
    sink: Sink
    seed: int  # the request's seed, or one drawn for it: its noise depends on nothing else
    generated: list[int] = field(default_factory=list)
    ended: bool = False  # its finish was delivered; its row leaves with the next plan
    prefilled: int = 0  # prompt tokens in its slot's cache (planned so far)

    @property
    def seq_id(self) -> str:
        return self.request.seq_id

    @property
    def params(self):
        return self.request.params

    @property
    def remaining(self) -> int:
        """Prompt tokens not yet planned."""
        return len(self.request.prompt_ids) - self.prefilled


def default_prefill_share(max_prefill_tokens: int) -> int:
    """A quarter of the budget: under contention four prompts progress in every step, so a
    short prompt waits only behind four or more long ones, while the chunks a step runs one
    by one (a part-way prompt is its own forward pass) stay few. 512 of the default 2048:
    most prompts of the realistic workload (86% of 16-900 tokens, log-uniform) fit one share."""
    return max(1, max_prefill_tokens // 4)


def allot(remaining: Seq[int], budget: int, share: int) -> list[int]:
    """Prompt tokens for each prompt, in turn order, within `budget`: first a share of at
    most `share` each, then what is left to each in turn until it runs out."""
    grants, left = [], budget
    for need in remaining:
        grants.append(min(need, share, left))
        left -= grants[-1]
    for i, need in enumerate(remaining):
        more = min(need - grants[i], left)
        grants[i] += more
        left -= more
    return grants


class Scheduler:
    def __init__(self, rows_after_evict: Callable[[Seq[str]], list[str]], max_batch_size: int,
                 batch_wait_s: float, max_prefill_tokens: int = 2048,
                 prefill_share_tokens: Optional[int] = None, async_scheduling: bool = False):
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be at least 1, not {max_prefill_tokens}")
        if prefill_share_tokens is not None and prefill_share_tokens < 1:
            raise ValueError(f"prefill_share_tokens must be at least 1, not {prefill_share_tokens}")
        self._rows_after_evict = rows_after_evict
        self.async_scheduling = async_scheduling
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_share_tokens = prefill_share_tokens or default_prefill_share(max_prefill_tokens)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._cancelled: set[str] = set()
        self._stopping = False
        self._failure: Optional[str] = None
        self._running_count = 0  # len(_running), readable from any thread
        # engine thread only:
        self._running: dict[str, Sequence] = {}  # every sequence holding a slot
        self._prefilling: list[Sequence] = []  # of those, the ones whose prompt is not all in, in turn order
        self._finished: list[str] = []

    # ---- any thread ----
    def submit(self, request: SequenceRequest, sink: Sink) -> None:
        self.submit_many([(request, sink)])

    def submit_many(self, arrivals: Seq[tuple[SequenceRequest, Sink]]) -> None:
        """Queue sequences in the order given, under one lock (the replica sends a tick's
        arrivals in one call); all or none: only a failed engine refuses, and it refuses all."""
        queued = [Sequence(request, sink, request.params.seed if request.params.seed is not None else random_seed())
                  for request, sink in arrivals]
        with self._cond:
            if self._failure is not None:
                raise RuntimeError(f"engine failed: {self._failure}")
            self._waiting.extend(queued)
            self._cond.notify()

    def cancel(self, seq_id: str) -> None:
        with self._cond:
            self._cancelled.add(seq_id)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def has_work(self) -> bool:
        with self._cond:
            return bool(self._waiting) or self._running_count > 0

    def load(self) -> dict:
        with self._cond:
            return {"running": self._running_count, "waiting": len(self._waiting)}

    # ---- engine thread ----
    def sequence(self, seq_id: str) -> Sequence:
        return self._running[seq_id]

    def finish(self, seq_id: str) -> None:
        """The output processor ended this sequence; its row leaves with the next plan."""
        self._finished.append(seq_id)

    def next_plan(self) -> tuple[StepPlan, list[Sequence]]:
        """The next step's plan and the sequences that start decoding after it (their
        prompts' last chunks are in it), in row order. Waits while idle."""
        with self._cond:
            if not (self._running or self._waiting or self._stopping):
                self._cond.wait(timeout=HEARTBEAT_S)
                self._gather_arrivals()
            if self._stopping:
                return StepPlan(shutdown=True), []
            evict, cancelled = self._take_evictions()
            for sid in evict:
                self._running.pop(sid, None)
            if evict:
                self._prefilling = [s for s in self._prefilling if s.seq_id in self._running]
            turn = self._admit()
            self._running_count = len(self._running)
        for seq in cancelled:  # outside the lock: a sink may take its own locks
            seq.sink(SequenceOutput([], finish_reason="cancelled"))
        grants = allot([s.remaining for s in turn], self.max_prefill_tokens, self.prefill_share_tokens)
        chunks = [self._chunk(seq, n) for seq, n in zip(turn, grants) if n]
        joining = [seq for seq in turn if seq.remaining == 0]  # in plan order: the batch's row order
        if joining:
            self._prefilling = [s for s in self._prefilling if s.remaining]
        rows = self._rows_after_evict(evict)
        if self.async_scheduling:
            return StepPlan(evict=evict, prefill=chunks, decode_from_device=len(rows)), joining
        plan = StepPlan(
            evict=evict,
            decode_tokens=[self._running[sid].generated[-1] for sid in rows],
            prefill=chunks,
        )
        return plan, joining

    def _admit(self) -> list[Sequence]:
        """The prompts this step's budget goes to, in turn order: every one part-way
        through, then waiting ones while slots are free and the shares claimed so far
        leave some of the budget (called under the lock)."""
        turn = list(self._prefilling)
        claimed = sum(min(s.remaining, self.prefill_share_tokens) for s in turn)
        while claimed < self.max_prefill_tokens and self._waiting and len(self._running) < self.max_batch_size:
            seq = self._waiting.popleft()
            self._running[seq.seq_id] = seq
            self._prefilling.append(seq)
            turn.append(seq)
            claimed += min(seq.remaining, self.prefill_share_tokens)
        return turn

    @staticmethod
    def _chunk(seq: Sequence, n: int) -> PrefillChunk:
        """The next `n` tokens of `seq`'s prompt, marked planned."""
        prompt = seq.request.prompt_ids
        start, end = seq.prefilled, seq.prefilled + n
        seq.prefilled = end
        return PrefillChunk(seq.seq_id, tuple(prompt[start:end]), start, end == len(prompt),
                            seq.params.prompt_logprobs is not None)

    def _gather_arrivals(self) -> None:
        """Idle until now: give concurrent arrivals a moment to join this batch."""
        if not self._waiting or self._running or self.batch_wait_s <= 0:
            return
        deadline = time.monotonic() + self.batch_wait_s
        while len(self._waiting) < self.max_batch_size and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(timeout=left)

    def _take_evictions(self) -> tuple[list[str], list[Sequence]]:
        """Finished rows plus cancelled ones (called under the lock); cancelled waiting
        sequences just leave the queue. Returns the evictions and whom to tell 'cancelled'."""
        evict, self._finished = self._finished, []
        told: list[Sequence] = []
        if self._cancelled:
            for seq in [s for s in self._waiting if s.seq_id in self._cancelled]:
                self._waiting.remove(seq)
                told.append(seq)
            for sid in self._cancelled & self._running.keys():
                if sid not in evict:
                    evict.append(sid)
                    told.append(self._running[sid])
                    self._running[sid].ended = True  # async: its last step's token is still to come
            self._cancelled.clear()
        return evict, told

    def fail_all(self, message: str) -> None:
        """The group failed: every sequence, running or waiting, ends with an error."""
        with self._cond:
            self._failure = message
            doomed = list(self._running.values()) + list(self._waiting)
            self._running.clear()
            self._prefilling.clear()
            self._waiting.clear()
            self._running_count = 0
        for seq in doomed:
            try:
                seq.sink(SequenceOutput([], finish_reason="error", error=message, group_failed=True))
            except Exception:  # a sink whose caller is gone
                pass
