"""A sequence's outbox: a lagging stream takes everything ready in one chunk, never more, and
under load (stream batching) at most one chunk per interval, its first and last at once."""

import asyncio

import pytest

from serve_tp.messages import SequenceOutput, TokenLogprob
from serve_tp.outbox import Outbox
from serve_tp.tp_group import RankFailure


def out(tokens, finish=None, logprobs=None):
    return SequenceOutput(token_ids=tokens, finish_reason=finish, logprobs=logprobs)


def run(coro):
    return asyncio.run(coro)


def test_outputs_merge_until_the_finish_and_nothing_after_it():
    async def main():
        box = Outbox(lambda: 0.0)
        for item in (out([1]), out([2]), out([3, 4], "length"), out([9])):
            box.put(item)
        return await box.get()

    assert run(main()) == out([1, 2, 3, 4], "length")


def test_merged_logprobs_cover_every_token():
    lp = [TokenLogprob(token_id=t, logprob=-t / 10, top=()) for t in (1, 2, 3)]

    async def main():
        box = Outbox(lambda: 0.0)
        box.put(out([1], logprobs=lp[:1]))
        box.put(out([2, 3], logprobs=lp[1:]))
        return await box.get()

    item = run(main())
    assert item.token_ids == [1, 2, 3] and item.logprobs == lp


def test_a_failure_behind_the_tokens_wins():
    failure = RankFailure("rank 0 failed")

    async def main():
        box = Outbox(lambda: 0.0)
        box.put(out([1]))
        box.put(failure)
        box.put(out([2]))
        return await box.get()

    assert run(main()) is failure


def test_without_batching_each_output_goes_out_as_it_comes():
    async def main():
        box = Outbox(lambda: 0.0)
        got = []
        for tokens in ([1], [2], [3]):
            box.put(out(tokens))
            got.append(await asyncio.wait_for(box.get(), 0.05))
        return got

    assert run(main()) == [out([1]), out([2]), out([3])]


async def _feed(box, items, gap_s):
    for item in items:
        box.put(item)
        await asyncio.sleep(gap_s)


def test_batching_sends_the_first_output_at_once_then_one_chunk_per_interval():
    interval = 0.2

    async def main():
        loop = asyncio.get_running_loop()
        box = Outbox(lambda: interval)
        start = loop.time()
        feeder = asyncio.create_task(_feed(box, [out([t]) for t in range(1, 20)] + [out([20], "length")], 0.02))
        chunks = []
        while True:
            item = await box.get()
            chunks.append((loop.time() - start, item))
            if item.finish_reason:
                break
        await feeder
        return chunks

    chunks = run(main())
    tokens = [t for _, item in chunks for t in item.token_ids]
    assert tokens == list(range(1, 21))  # nothing lost, nothing reordered
    assert chunks[0][0] < 0.05 and chunks[0][1].token_ids == [1]  # the first token is not held back
    gaps = [b - a for (a, _), (b, _) in zip(chunks, chunks[1:-1])]
    assert all(g >= interval * 0.9 for g in gaps), gaps  # at most one chunk per interval
    assert len(chunks) <= 5  # 20 tokens over ~0.4 s: not 20 chunks
    # The control: the same feed without batching gives a chunk per token.
    async def control():
        box = Outbox(lambda: 0.0)
        feeder = asyncio.create_task(_feed(box, [out([t]) for t in range(1, 20)] + [out([20], "length")], 0.02))
        n = 0
        while not (await box.get()).finish_reason:
            n += 1
        await feeder
        return n + 1

    assert run(control()) >= 15


def test_batching_never_holds_back_the_finish():
    async def main():
        loop = asyncio.get_running_loop()
        box = Outbox(lambda: 10.0)  # an interval far longer than the test
        box.put(out([1]))
        await box.get()
        box.put(out([2]))
        asyncio.get_running_loop().call_later(0.05, box.put, out([3], "stop"))
        start = loop.time()
        item = await asyncio.wait_for(box.get(), 2)
        return item, loop.time() - start

    item, waited = run(main())
    assert item == out([2, 3], "stop") and waited < 1


def test_a_cancelled_reader_leaves_no_timer_that_fails():
    async def main():
        box = Outbox(lambda: 0.05)
        box.put(out([1]))
        await box.get()
        box.put(out([2]))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(box.get(), 0.01)
        await asyncio.sleep(0.1)  # the timer fires with no reader
        return await asyncio.wait_for(box.get(), 0.5)

    assert run(main()) == out([2])
