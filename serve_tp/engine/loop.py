"""The per-rank engine thread: rank 0 leads (schedule, broadcast, execute, sample, deliver),
every other rank follows (receive, execute).

The jobs live in their own modules: `scheduler` (rank 0's queue and plans), `executor`
(a plan on this rank's batch), `sampling` (rank 0's tokens), `output` (finish and
delivery). This module only puts them in order and times them.

Two orders for rank 0 (`async_scheduling`: async by default on cuda, synchronous on cpu).
Synchronous: plan n, run it, sample, read the tokens
(waiting for the device), deliver, then plan n+1. Async scheduling: plan, broadcast and
launch step n+1 first, then read and deliver step n's tokens, so the host's work overlaps
the device's (`_lead_async` says what changes, and why the outputs do not).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from serve_tp.engine.batch import SequenceBatch
from serve_tp.engine.executor import Executor, StepLogits
from serve_tp.engine.output import OutputProcessor
from serve_tp.engine.plan import StepPlan
from serve_tp.engine.sampled_step import SampledStep
from serve_tp.engine.sampling import Sampler, prompt_logprobs
from serve_tp.engine.scheduler import Scheduler, Sink
from serve_tp.messages import SamplingParams, SequenceRequest

logger = logging.getLogger(__name__)

Broadcast = Callable[[Optional[StepPlan]], StepPlan]
PLACEHOLDER_PARAMS = SamplingParams(temperature=0, max_tokens=1)


class StepTimings:
    """Where rank 0's working steps spend their time, averaged over the last window.

    On GPU the forward only launches kernels (or replays a graph); waiting for them to
    finish falls in `sample_and_emit`, where the sampled tokens are first read back. With
    async scheduling `sample_and_emit` is this step's sampling (launched) plus the wait for
    and delivery of the previous step's tokens, while this step runs on the device.
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
    """Runs on a background thread of every rank actor.

    `share_sampled` (more than one rank) broadcasts rank 0's sampled tokens on the device;
    async scheduling needs it, since its plans carry no tokens (see Executor).
    """

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
        async_scheduling: bool = False,
        share_sampled: Optional[Callable] = None,
    ):
        if rank == 0 and sampler is None:
            raise ValueError("rank 0 samples: it needs a Sampler")
        self.batch = batch
        self.broadcast = broadcast
        self.rank = rank
        self.async_scheduling = async_scheduling
        self.executor = Executor(batch, keep_prompt_logits=rank == 0, share_sampled=share_sampled)
        self.scheduler = Scheduler(batch.rows_after_evict, max_batch_size, batch_wait_s, max_prefill_tokens,
                                   prefill_share_tokens, async_scheduling=async_scheduling)
        self.outputs = OutputProcessor(self.scheduler, eos_token_id, max_context)
        self.sampler = sampler
        self.on_step = on_step  # rank 0's metrics: (batch size, waiting, running) after each step
        self.failure: Optional[BaseException] = None
        self.last_step_at = time.monotonic()
        self.steps = 0
        self.plans_sent = 0  # rank 0: plans broadcast so far
        self.sampled_steps = 0  # rank 0: steps whose tokens were read back and delivered
        self.overlapped_steps = 0  # of those, read only after the next step's plan was broadcast
        self._timings = StepTimings()
        self._thread = threading.Thread(target=self._run, name=f"engine-rank{rank}", daemon=True)

    # ---- called from the actor's threads ----
    def start(self) -> None:
        self._thread.start()

    @property
    def max_context(self) -> int:
        """Positions a sequence may fill: the OutputProcessor's, which ends sequences there."""
        return self.outputs.max_context

    def submit(self, request: SequenceRequest, sink: Sink) -> None:
        """Queue a sequence (rank 0 only); its outputs arrive through `sink`."""
        refused = self.submit_many([(request, sink)])
        if refused:
            raise ValueError(refused[request.seq_id])

    def submit_many(self, arrivals: list[tuple[SequenceRequest, Sink]]) -> dict[str, str]:
        """Queue sequences in order (rank 0 only), under one lock; returns seq_id -> why, for
        each refused one (`_refusal`). The replica checks these limits first; one that reaches
        here past them would make every rank refuse its plan, so it is refused alone, not run."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 accepts sequences")
        refused, accepted = {}, []
        for request, sink in arrivals:
            reason = self._refusal(request)
            if reason is None:
                accepted.append((request, sink))
            else:
                refused[request.seq_id] = reason
        if accepted:
            self.scheduler.submit_many(accepted)
        return refused

    def _refusal(self, request: SequenceRequest) -> Optional[str]:
        """Why every rank would refuse to place this sequence (so the whole group would fail
        with its plan), or None. The slot after the prompt is always written (the next
        token's logits, and async scheduling's extra step), even with max_tokens 0; a
        max_tokens past the context is not refused here: the sequence ends at the context
        ("length"), as the API's own limit says it would."""
        prompt = len(request.prompt_ids)
        if prompt == 0:
            return "empty prompt"
        if prompt >= self.max_context:
            return (f"a prompt of {prompt} tokens leaves no position of the {self.max_context}-token context "
                    f"for the next token")
        return None

    def cancel(self, seq_id: str) -> None:
        self.scheduler.cancel(seq_id)

    def stop(self) -> None:
        self.scheduler.stop()

    def join(self, timeout_s: float) -> None:
        """Wait for the loop to end: after `stop` on rank 0, after its shutdown plan elsewhere."""
        self._thread.join(timeout_s)

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
        if self.async_scheduling:
            return self._lead_async()
        clock = time.perf_counter
        while True:
            plan, joining = self.scheduler.next_plan()
            t0 = clock()
            self._send(plan)
            if plan.shutdown:
                return
            t1 = clock()
            step = self._execute(plan, joining)
            t2 = clock()
            if step.logits is not None:
                self._deliver(self._sample(step))
            self._stepped(plan, t0, t1, t2, clock())

    def _lead_async(self) -> None:
        """Async scheduling: broadcast and launch step n+1, then read and deliver step n.

        While the device computes step n+1 the host waits for step n's tokens, checks their
        finishes, delivers them and plans step n+2. What differs from the synchronous loop,
        and why a client sees the same outputs:
        - decoding rows take their input tokens from `batch.sampled` (the previous step's,
          written by `_sample`, broadcast to the other ranks before the step), never from
          the host, so no plan waits for a read;
        - a finish found in step n's tokens is evicted by plan n+2, not n+1: the row
          computes one extra token in step n+1, which `deliver` drops (the sequence has
          ended); cancellations mark their sequences ended as they are evicted, so a
          token computed before reaches no one after its "cancelled";
        - the sampler's per-row state (seeded positions, penalty history and counts, the
          min_tokens ban) advances on the device and on its host table without the
          tokens' values, so it is the same as in the synchronous order.
        No case falls back to a synchronous step. The host still waits on the device in
        a step that ends an echo prompt's prefill (prompt_logprobs are read as they are
        scored): that step loses its overlap, not its correctness. (Host-to-device copies
        go through pinned memory without blocking: serve_tp/model/host_copy.py.)
        """
        clock = time.perf_counter
        pending: Optional[SampledStep] = None
        while True:
            plan, joining = self.scheduler.next_plan()
            t0 = clock()
            self._send(plan)
            if plan.shutdown:
                if pending is not None:
                    self._deliver(pending)
                return
            t1 = clock()
            step = self._execute(plan, joining)
            t2 = clock()
            launched = self._sample(step, copy_ahead=True) if step.logits is not None else None
            if pending is not None:
                self._deliver(pending)
            pending = launched
            self._stepped(plan, t0, t1, t2, clock())

    def _send(self, plan: StepPlan) -> None:
        self.broadcast(plan)
        self.plans_sent += 1

    def _execute(self, plan: StepPlan, joining) -> StepLogits:
        """Run the plan here; the sampler's slots follow the batch's moves and joins."""
        step = self.executor.run(plan)
        for source, target in step.moves:
            self.sampler.move(source, target)
        first_new = len(self.batch) - len(joining)  # they decode from the next step on
        for offset, seq in enumerate(joining):
            self._admit_to_sampler(first_new + offset, seq)
        return step

    def _stepped(self, plan: StepPlan, t0: float, t1: float, t2: float, t3: float) -> None:
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

    def _sample(self, step: StepLogits, copy_ahead: bool = False) -> SampledStep:
        """Sample the step's rows; their tokens stay on the device (`batch.sampled` keeps them
        for async scheduling's next step). A failed sampling ends the step's sequences with an
        error when the step is delivered (after the step before it, as a delivery would)."""
        rows = [self.scheduler.sequence(sid) for sid in self.batch.seq_ids]
        try:
            result = self.sampler.sample(step.logits)
        except Exception as exc:  # confined to this step's sequences: the group keeps serving
            logger.exception("sampling failed for a batch of %d sequences", len(rows))
            # async: the next step decodes stale tokens for these rows; they have ended by then
            return SampledStep.failed(rows, f"sampling failed: {type(exc).__name__}", self.plans_sent)
        if self.async_scheduling:
            self.batch.keep_sampled(result.tokens)
        scored = {}
        for sid, logits in step.prompt_logits.items():
            request = self.scheduler.sequence(sid).request
            scored[sid] = prompt_logprobs(logits, request.prompt_ids, request.params.prompt_logprobs)
        return SampledStep(rows, result, scored, self.plans_sent, copy_ahead)

    def _deliver(self, sampled: SampledStep) -> None:
        if sampled.error is not None:
            for seq in sampled.rows:
                if not seq.ended:  # async: some finished in the step before
                    self.outputs.fail(seq, sampled.error)
            return
        tokens, logprobs = sampled.read()  # the step's one device-to-host wait
        self.sampled_steps += 1
        if self.plans_sent > sampled.plan_index:
            self.overlapped_steps += 1
        self.outputs.deliver(sampled.rows, tokens, logprobs, sampled.prompt_logprobs)
