"""A mixed workload driven through a real EngineLoop, for comparing two engines' outputs.

Jobs join at fixed points of other sequences' streams (when one has received n tokens)
and cancel themselves after n tokens of their own, from their sinks on the engine thread:
the points are the same whatever the step order, so two engines (synchronous and async
scheduling) must hand every sequence the same outputs. Picklable, for spawned TP ranks.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from serve_tp.messages import SamplingParams, SequenceOutput, SequenceRequest


@dataclass(frozen=True)
class Job:
    seq_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    after: Optional[tuple[str, int]] = None  # submitted once that sequence has this many tokens
    cancel_after: int = 0  # > 0: cancels itself once it has this many tokens


@dataclass
class Outcome:
    """What one sequence's client saw."""

    tokens: list[int] = field(default_factory=list)
    finish: Optional[str] = None
    logprobs: list = field(default_factory=list)
    prompt_logprobs: Optional[list] = None
    after_finish: int = 0  # outputs that came after the finishing one (must stay 0)


def drive(engine, jobs: list[Job], timeout_s: float = 120) -> dict[str, Outcome]:
    """Submit `jobs` to a started rank-0 engine; every sequence's outcome once all have finished."""
    outcomes = {job.seq_id: Outcome() for job in jobs}
    waiting_on = {}
    for job in jobs:
        if job.after is not None:
            waiting_on.setdefault(job.after[0], []).append(job)
    done = threading.Event()
    lock = threading.Lock()
    finished: set[str] = set()

    def submit(job: Job) -> None:
        engine.submit(SequenceRequest(job.seq_id, job.prompt, job.params), sink_for(job))

    def sink_for(job: Job):
        def sink(out: SequenceOutput) -> None:
            seen = outcomes[job.seq_id]
            if seen.finish is not None:
                seen.after_finish += 1
                return
            seen.tokens += out.token_ids
            seen.logprobs += out.logprobs or []
            if out.prompt_logprobs is not None:
                seen.prompt_logprobs = out.prompt_logprobs
            for later in [j for j in waiting_on.get(job.seq_id, ()) if len(seen.tokens) >= j.after[1]]:
                waiting_on[job.seq_id].remove(later)
                submit(later)
            if job.cancel_after and len(seen.tokens) == job.cancel_after and out.finish_reason is None:
                engine.cancel(job.seq_id)
            if out.finish_reason is not None:
                seen.finish = out.finish_reason
                for orphan in waiting_on.pop(job.seq_id, []):  # it ended before their point
                    submit(orphan)
                with lock:
                    finished.add(job.seq_id)
                    if len(finished) == len(jobs):
                        done.set()
        return sink

    for job in jobs:
        if job.after is None:
            submit(job)
    if not done.wait(timeout_s):
        raise TimeoutError(f"unfinished after {timeout_s}s: {sorted(set(outcomes) - finished)}")
    deadline = time.monotonic() + timeout_s
    # Every slot freed and the loop between steps: any output a finished sequence should
    # not get (async scheduling's extra token) would have reached its sink by now.
    while (engine.load()["running"] or engine.steps < engine.plans_sent) and time.monotonic() < deadline:
        time.sleep(0.01)
    return outcomes
