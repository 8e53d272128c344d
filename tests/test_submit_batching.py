"""Submissions that arrive in one event-loop tick reach rank 0 in one call (TPGroup._queue_submission).

The replica side is the real TPGroup and rank 0 the real InferenceWorker with a real
EngineLoop on the tiny model, in one process: only Ray's transport between them is left
out (`_Remote` calls the method where Ray would send it), so what is checked is what
each end does with a batch: its order, a refusal that fails only its own sequence, and
a cancellation before or after the batch went out.
"""

import asyncio
import time

import pytest
import ray

from serve_tp.config import ServeTPConfig
from serve_tp.engine.scheduler import Scheduler
from serve_tp.engine.worker import InferenceWorker
from serve_tp.messages import SamplingParams, SequenceRequest, pack, unpack
from serve_tp.tp_group import RankFailure, SequenceRefused, TPGroup
from tests.test_engine import alone, greedy, model_and_tokenizer, start_engine  # noqa: F401 (fixture)


class _Remote:
    """`actor.method.remote(...)` answered in this process, recording each call's arguments."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def remote(self, *args):
        self.calls.append(args)
        return self.fn(*args)


class Rank0:
    """A real InferenceWorker (rank 0 of one) behind the names TPGroup calls."""

    def __init__(self, engine):
        self.worker = InferenceWorker(0, 1, None)
        self.worker.engine = engine
        self.submit = _Remote(self.worker.submit)
        self.poll = _Remote(self.worker.poll)
        self.cancel = _Remote(self.worker.cancel)

    def batches(self) -> list[list[str]]:
        """The seq_ids of each submit call, in the order they were sent."""
        return [[r.seq_id for r in unpack(packed)] for (packed, *_client) in self.submit.calls]


def group_with(rank0, client: str = "") -> TPGroup:
    """The real TPGroup over rank 0 in this process, as the replica `client` (api_replicas)."""
    return TPGroup(ServeTPConfig(model="unused"), [rank0], client=client)


async def collect(group, request) -> list[int]:
    tokens = []
    async for out in group.generate(request):
        tokens += out.token_ids
    return tokens


@pytest.fixture
def rank0(model_and_tokenizer):  # noqa: F811
    model_dir, tokenizer = model_and_tokenizer
    engine = start_engine(model_dir, tokenizer.eos_token_id)
    yield Rank0(engine)
    engine.stop()


def test_one_tick_one_call_in_arrival_order_and_a_refusal_fails_only_itself(rank0, model_and_tokenizer):  # noqa: F811
    model_dir, tokenizer = model_and_tokenizer
    prompt = tuple(tokenizer.encode("Once upon a time"))
    context = rank0.worker.engine.outputs.max_context
    good = {name: SequenceRequest(name, prompt, greedy(n)) for name, n in (("a", 6), ("c", 3), ("d", 5))}
    # a prompt that fills the context (no slot for the next token): the replica's check was skipped
    too_long = SequenceRequest("b", (prompt * context)[:context], greedy(1))

    async def main():
        group = group_with(rank0)
        runs = [asyncio.ensure_future(collect(group, r)) for r in (good["a"], too_long, good["c"], good["d"])]
        results = await asyncio.gather(*runs, return_exceptions=True)
        lone = await collect(group, SequenceRequest("e", prompt, greedy(2)))  # a later tick: its own call
        return results, lone

    (a, b, c, d), lone = asyncio.run(main())
    assert rank0.batches() == [["a", "b", "c", "d"], ["e"]]
    assert (rank0.worker.submit_calls, rank0.worker.submitted) == (2, 5)  # as /health reports them
    assert isinstance(b, SequenceRefused) and "context" in str(b)
    for name, tokens in (("a", a), ("c", c), ("d", d)):
        assert tokens == alone(model_dir, list(prompt), good[name].params.max_tokens), name
    assert lone == alone(model_dir, list(prompt), 2)
    assert rank0.cancel.calls == []  # every sequence finished: nothing to cancel


def test_cancelled_before_its_tick_ends_it_is_never_sent_after_it_is_cancelled_on_rank_0(rank0, model_and_tokenizer):  # noqa: F811
    model_dir, tokenizer = model_and_tokenizer
    prompt = tuple(tokenizer.encode("Once upon a time"))

    async def main():
        group = group_with(rank0)
        kept = asyncio.ensure_future(collect(group, SequenceRequest("kept", prompt, greedy(4))))
        await asyncio.sleep(0)  # "kept" runs up to its first wait: queued, the tick's send scheduled
        # "dropped" is cancelled within the same tick, as a task is: CancelledError at its wait.
        step = group.generate(SequenceRequest("dropped", prompt, greedy(4))).__anext__()
        step.send(None)
        queued = list(group._unsent)
        with pytest.raises(asyncio.CancelledError):
            step.throw(asyncio.CancelledError())
        long = group.generate(SequenceRequest("long", prompt, greedy(200)))
        first = await long.__anext__()  # sent with "kept", and running on rank 0
        await long.aclose()  # the client left mid-stream
        return queued, await kept, first

    queued, kept, first = asyncio.run(main())
    assert queued == ["kept", "dropped"]
    assert rank0.batches() == [["kept", "long"]]  # "dropped" never reached rank 0 ...
    assert rank0.cancel.calls == [("long",)]  # ... so only "long" needed cancelling there
    assert kept == alone(model_dir, list(prompt), 4) and first.token_ids
    assert _drains(rank0.worker.engine)  # the cancelled one's slot is free again


def _drains(engine, timeout_s=30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while engine.load()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.load()["running"] == 0


def test_a_failed_call_fails_every_sequence_of_its_batch():
    class DeadRank0:
        def __init__(self):
            async def submit(packed, client):
                raise ray.exceptions.RayActorError()

            async def poll(timeout_s, client):
                await asyncio.sleep(timeout_s)
                return pack({})

            self.submit, self.poll = _Remote(submit), _Remote(poll)
            self.cancel = _Remote(lambda seq_id: None)

    async def main():
        group = group_with(DeadRank0())
        params = SamplingParams(max_tokens=2)
        runs = [collect(group, SequenceRequest(f"s{i}", (1, 2), params)) for i in range(3)]
        return await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 10)

    results = asyncio.run(main())
    assert all(isinstance(r, RankFailure) and "RayActorError" in str(r) for r in results), results


def test_the_scheduler_queues_a_batch_in_its_order():
    sched = Scheduler(lambda leaving: [], 8, 0, max_prefill_tokens=100)
    sched.submit(SequenceRequest("first", (1, 2), SamplingParams(max_tokens=1)), lambda out: None)
    sched.submit_many([(SequenceRequest(s, (1, 2, 3), SamplingParams(max_tokens=1)), lambda out: None)
                       for s in ("x", "y", "z")])
    plan, _ = sched.next_plan()
    assert [c.seq_id for c in plan.prefill] == ["first", "x", "y", "z"]
    sched.fail_all("boom")
    with pytest.raises(RuntimeError, match="boom"):  # a failed engine refuses a whole batch
        sched.submit_many([(SequenceRequest("late", (1,), SamplingParams(max_tokens=1)), lambda out: None)])


def test_two_clients_of_one_rank_0_each_get_only_their_own_sequences(rank0, model_and_tokenizer):  # noqa: F811
    """api_replicas: two HTTP replicas share rank 0, each polling its own outbox there."""
    model_dir, tokenizer = model_and_tokenizer
    prompt = tuple(tokenizer.encode("Once upon a time"))
    lengths = {"a1": 7, "b1": 3, "a2": 5, "b2": 9}

    async def main():
        groups = {"a": group_with(rank0, "replica-a"), "b": group_with(rank0, "replica-b")}
        runs = {seq_id: asyncio.ensure_future(collect(groups[seq_id[0]], SequenceRequest(seq_id, prompt, greedy(n))))
                for seq_id, n in lengths.items()}
        return {seq_id: await run for seq_id, run in runs.items()}

    tokens = asyncio.run(asyncio.wait_for(main(), 60))  # a token polled by the wrong client: a short stream
    assert {client for (_, client) in rank0.poll.calls} == {"replica-a", "replica-b"}
    assert sorted(c for (_, c) in rank0.submit.calls) == ["replica-a", "replica-b"]  # one call each, one tick
    for seq_id, n in lengths.items():  # each whole, in order: no token went to the other client
        assert tokens[seq_id] == alone(model_dir, list(prompt), n), seq_id
    assert set(rank0.worker._outboxes) == {"replica-a", "replica-b"}


def test_a_client_that_stops_polling_has_its_sequences_cancelled(rank0, model_and_tokenizer, monkeypatch):  # noqa: F811
    """An API replica that died mid-stream: rank 0 frees its slots instead of decoding to max_tokens."""
    from serve_tp.engine import worker as worker_module

    monkeypatch.setattr(worker_module, "ABANDONED_AFTER_S", 0.05)
    model_dir, tokenizer = model_and_tokenizer
    prompt = tuple(tokenizer.encode("Once upon a time"))
    engine = rank0.worker.engine
    long = engine.max_context - len(prompt) - 1  # the orphan would decode to the context's end
    cancelled = []  # (seq_id, sequences running when it was cancelled)
    cancel = rank0.worker.cancel
    monkeypatch.setattr(rank0.worker, "cancel",
                        lambda seq_id: (cancelled.append((seq_id, engine.load()["running"])), cancel(seq_id)))

    async def main():
        gone = group_with(rank0, "gone")
        await gone._submit({"orphan": SequenceRequest("orphan", prompt, greedy(long))})  # then stops polling
        deadline = time.monotonic() + 30
        while not cancelled and time.monotonic() < deadline:
            await rank0.worker.poll(0.01, "live")  # a live client's polls run the sweep
        await asyncio.sleep(0.1)
        await rank0.worker.poll(0.0, "live")  # a second sweep: the box stays for its ends, none re-cancelled
        late = {}  # had "gone" only been slow, its next polls bring the orphan's end: it fails, not hangs
        while "orphan" not in late or late["orphan"].finish_reason is None:
            late.update(unpack(await rank0.worker.poll(1.0, "gone")))
        await asyncio.sleep(0.1)  # "gone" idle again, nothing of it running: dropped at the next sweep
        return late["orphan"], await collect(group_with(rank0, "live"), SequenceRequest("live", prompt, greedy(3)))

    end, live = asyncio.run(asyncio.wait_for(main(), 60))
    assert cancelled == [("orphan", 1)]  # by the sweep, while it was still decoding
    assert end.finish_reason == "cancelled"
    assert _drains(engine) and "gone" not in rank0.worker._outboxes
    assert live == alone(model_dir, list(prompt), 3)  # the group serves on


def test_a_client_that_left_with_nothing_running_is_dropped_without_a_cancel(rank0, model_and_tokenizer,  # noqa: F811
                                                                            monkeypatch):
    """A client whose last stream ended (or was closed) stops polling; the finished outputs left
    in its box are not sequences to cancel: the sweep drops the box quietly."""
    from serve_tp.engine import worker as worker_module

    monkeypatch.setattr(worker_module, "ABANDONED_AFTER_S", 0.05)
    model_dir, tokenizer = model_and_tokenizer
    prompt = tuple(tokenizer.encode("Once upon a time"))
    cancelled = []
    monkeypatch.setattr(rank0.worker, "cancel", cancelled.append)

    async def main():
        idle = group_with(rank0, "idle")
        stream = idle.generate(SequenceRequest("closed", prompt, greedy(50)))
        await stream.__anext__()
        await stream.aclose()  # the client left mid-stream: its group cancels it (tp_group.cancel)
        box = rank0.worker._outboxes["idle"]
        deadline = time.monotonic() + 30
        while box.running and time.monotonic() < deadline:  # until the 'cancelled' end lands in its box
            await asyncio.sleep(0.01)
        assert not box.running
        await asyncio.sleep(0.1)  # "idle" polls no more: idle past ABANDONED_AFTER_S
        await rank0.worker.poll(0.01, "other")  # its poll sweeps

    asyncio.run(asyncio.wait_for(main(), 60))
    assert "idle" not in rank0.worker._outboxes
    assert cancelled == []  # the worker's sweep cancelled nothing (the group's own cancel went by rank0.cancel)
    assert rank0.cancel.calls == [("closed",)]


def test_no_client_is_judged_right_after_a_gap_that_may_have_been_a_stall(rank0, model_and_tokenizer,  # noqa: F811
                                                                            monkeypatch):
    """After the actor's calls stop for LOOP_STALL_S (a stalled loop queues every client's polls),
    the first poll to run must not cancel a client whose own poll is still queued."""
    from serve_tp.engine import worker as worker_module

    monkeypatch.setattr(worker_module, "ABANDONED_AFTER_S", 0.05)
    monkeypatch.setattr(worker_module, "LOOP_STALL_S", 0.3)
    model_dir, tokenizer = model_and_tokenizer
    prompt = tuple(tokenizer.encode("Once upon a time"))
    engine = rank0.worker.engine
    cancelled = []
    cancel = rank0.worker.cancel
    monkeypatch.setattr(rank0.worker, "cancel", lambda seq_id: (cancelled.append(seq_id), cancel(seq_id)))

    async def main():
        await group_with(rank0, "a")._submit({"a-long": SequenceRequest("a-long", prompt, greedy(200))})
        await asyncio.sleep(0.5)  # no call reaches the actor: as if its loop had stalled
        await rank0.worker.poll(0.0, "b")  # first after the gap: judges no one
        judged_early = list(cancelled)
        await rank0.worker.poll(0.0, "a")  # "a"'s queued poll: alive
        cancel("a-long")
        return judged_early

    judged_early = asyncio.run(asyncio.wait_for(main(), 60))
    assert judged_early == [] and cancelled == []
    assert _drains(engine)
