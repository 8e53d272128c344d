"""The per-rank engine thread: rank 0 leads (schedule, broadcast, execute, sample, deliver),
every other rank follows (receive, execute).

The jobs live in their own modules: `scheduler` (rank 0's queue and plans), `executor`
(a plan on this rank's batch), `sampling` (rank 0's tokens), `output` (finish and
delivery). This module only puts them in order and times them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from serve_tp.engine.batch import SequenceBatch
from serve_tp.engine.executor import Executor
from serve_tp.engine.output import OutputProcessor
from serve_tp.engine.plan import StepPlan
from serve_tp.engine.sampling import Sampler, prompt_logprobs
from serve_tp.engine.scheduler import Scheduler, Sink
from serve_tp.messages import SamplingParams, SequenceRequest

logger = logging.getLogger(__name__)

Broadcast = Callable[[Optional[StepPlan]], StepPlan]
PLACEHOLDER_PARAMS = SamplingParams(temperature=0, max_tokens=1)


class StepTimings:
    """Where rank 0's working steps spend their time, averaged over the last window.

    On GPU the forward only launches kernels (or replays a graph); waiting for them to
    finish falls in `sample_and_emit`, where the sampled tokens are first read back.
    """

    WINDOW = 256
    NAMES = ("broadcast", "forward", "sample_and_emit")

    def __init__(self):
        self._sums = [0.0, 0.0, 0.0]
        self._count = 0
        self._lock = threading.Lock()

    def add(self, broadcast_s: float, forward_s: float, sample_s: float) -> None:
        with self._lock:
            if self._count >= self.WINDOW:
                self._sums, self._count = [0.0, 0.0, 0.0], 0
            for i, value in enumerate((broadcast_s, forward_s, sample_s)):
                self._sums[i] += value
            self._count += 1

    def averages_ms(self) -> dict:
        with self._lock:
            n = max(self._count, 1)
            return {name: round(1000 * total / n, 3) for name, total in zip(self.NAMES, self._sums)}


class EngineLoop:
    """Runs on a background thread of every rank actor."""

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
        max_prefill_tokens: int = 2048,
        prefill_share_tokens: Optional[int] = None,
        sampler: Optional[Sampler] = None,
        on_step: Optional[Callable[[int, int, int], None]] = None,
    ):
        if rank == 0 and sampler is None:
            raise ValueError("rank 0 samples: it needs a Sampler")
        self.batch = batch
        self.broadcast = broadcast
        self.rank = rank
        self.executor = Executor(batch, keep_prompt_logits=rank == 0)
        self.scheduler = Scheduler(batch.rows_after_evict, max_batch_size, batch_wait_s, max_prefill_tokens,
                                   prefill_share_tokens)
        self.outputs = OutputProcessor(self.scheduler, eos_token_id, max_context)
        self.sampler = sampler
        self.on_step = on_step  # rank 0's metrics: (batch size, waiting, running) after each step
        self.failure: Optional[BaseException] = None
        self.last_step_at = time.monotonic()
        self.steps = 0
        self._timings = StepTimings()
        self._thread = threading.Thread(target=self._run, name=f"engine-rank{rank}", daemon=True)

    # ---- called from the actor's threads ----
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: SequenceRequest, sink: Sink) -> None:
        """Queue a sequence (rank 0 only); its outputs arrive through `sink`."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 accepts sequences")
        self.scheduler.submit(request, sink)

    def cancel(self, seq_id: str) -> None:
        self.scheduler.cancel(seq_id)

    def stop(self) -> None:
        self.scheduler.stop()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def load(self) -> dict:
        return {**self.scheduler.load(), "steps": self.steps, "step_ms": self._timings.averages_ms()}

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
            self.scheduler.fail_all(repr(exc))

    def _follow(self) -> None:
        while True:
            plan = self.broadcast(None)
            if plan.shutdown:
                return
            self.executor.run(plan)
            self.last_step_at = time.monotonic()
            self.steps += 1

    def _lead(self) -> None:
        clock = time.perf_counter
        while True:
            plan, joining = self.scheduler.next_plan()
            t0 = clock()
            self.broadcast(plan)
            if plan.shutdown:
                return
            t1 = clock()
            step = self.executor.run(plan)
            for source, target in step.moves:
                self.sampler.move(source, target)
            first_new = len(self.batch) - len(joining)  # they decode from the next step on
            for offset, seq in enumerate(joining):
                self._admit_to_sampler(first_new + offset, seq)
            t2 = clock()
            if step.logits is not None:
                self._sample_and_deliver(step)
            t3 = clock()
            if plan.has_work:
                self._timings.add(t1 - t0, t2 - t1, t3 - t2)
            self.last_step_at = time.monotonic()
            self.steps += 1
            if self.on_step is not None:
                load = self.scheduler.load()
                self.on_step(plan.rows, load["waiting"], load["running"])

    def _admit_to_sampler(self, slot: int, seq) -> None:
        """Params the API let through but the sampler refuses end that sequence alone; its
        slot samples greedily until the next plan evicts it."""
        try:
            self.sampler.admit(slot, seq.params, seq.seed, seq.request.prompt_ids)
        except ValueError as exc:
            logger.warning("sequence %s refused by the sampler: %s", seq.seq_id, exc)
            self.sampler.admit(slot, PLACEHOLDER_PARAMS, seq.seed, ())
            self.outputs.fail(seq, f"invalid sampling parameters: {exc}")

    def _sample_and_deliver(self, step) -> None:
        rows = [self.scheduler.sequence(sid) for sid in self.batch.seq_ids]
        try:
            result = self.sampler.sample(step.logits)
        except Exception as exc:  # confined to this step's sequences: the group keeps serving
            logger.exception("sampling failed for a batch of %d sequences", len(rows))
            for seq in rows:
                self.outputs.fail(seq, f"sampling failed: {type(exc).__name__}")
            return
        tokens = result.tokens.tolist()  # the step's one device-to-host read
        logprobs = result.token_logprobs() if result.logprobs is not None else None
        scored = {}
        for sid, logits in step.prompt_logits.items():
            request = self.scheduler.sequence(sid).request
            scored[sid] = prompt_logprobs(logits, request.prompt_ids, request.params.prompt_logprobs)
        self.outputs.deliver(rows, tokens, logprobs, scored)
