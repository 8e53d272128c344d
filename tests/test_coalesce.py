"""A lagging stream takes what is already queued for it in one chunk, and never more."""

import asyncio

from serve_tp.messages import SequenceOutput
from serve_tp.tp_group import RankFailure, _coalesce


def out(tokens, finish=None):
    return SequenceOutput(token_ids=tokens, finish_reason=finish)


def queue_of(*items):
    queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    return queue


def test_queued_outputs_merge_until_the_finish():
    queue = queue_of(out([2]), out([3, 4], "length"), out([9]))
    assert _coalesce(out([1]), queue) == out([1, 2, 3, 4], "length")
    assert queue.qsize() == 1  # nothing past the finish is taken


def test_an_empty_queue_leaves_the_item_alone():
    assert _coalesce(out([1]), asyncio.Queue()) == out([1])


def test_a_failure_behind_the_tokens_wins():
    failure = RankFailure("rank 0 failed")
    assert _coalesce(out([1]), queue_of(out([2]), failure)) is failure
