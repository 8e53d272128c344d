"""The replica's admission control on its own: bounds, refusal shape, release on cancel."""

import asyncio

import pytest

from serve_tp.api.admission import Admission, serve_routing_limit
from serve_tp.api.errors import APIError


async def hold(admission: Admission, release: asyncio.Event):
    async with admission.turn():
        await release.wait()


def test_refuses_only_when_running_and_waiting_are_full():
    async def scenario():
        admission = Admission(max_running=2, max_waiting=1, status=503, retry_after_s=3)
        release = asyncio.Event()
        tasks = [asyncio.create_task(hold(admission, release)) for _ in range(3)]
        await asyncio.sleep(0)
        assert admission.load() == {"running": 2, "waiting": 1, "refused": 0, "max_running": 2, "max_waiting": 1}
        with pytest.raises(APIError) as refused:
            admission.check()
        release.set()
        await asyncio.gather(*tasks)
        admission.check()  # room again
        return refused.value, admission.load()

    err, load = asyncio.run(scenario())
    assert err.status == 503 and err.code == "overloaded" and err.headers == {"Retry-After": "3"}
    assert "2 requests running (max_ongoing_requests=2)" in err.message
    assert "1 waiting (max_queued_requests=1)" in err.message
    assert load == {"running": 0, "waiting": 0, "refused": 1, "max_running": 2, "max_waiting": 1}


def test_a_cancelled_waiter_or_stream_gives_its_place_back():
    async def scenario():
        admission = Admission(max_running=1, max_waiting=1, status=429, retry_after_s=1)
        release = asyncio.Event()
        running = asyncio.create_task(hold(admission, release))
        waiter = asyncio.create_task(hold(admission, release))
        await asyncio.sleep(0)
        waiter.cancel()  # client gone while queued
        running.cancel()  # client gone mid-generation
        await asyncio.gather(running, waiter, return_exceptions=True)
        after_cancel = admission.load()

        async def body():
            yield "a"
            await asyncio.sleep(3600)
            yield "b"

        stream = admission.wrap_stream(body())
        assert await stream.__anext__() == "a"
        during_stream = admission.load()
        await stream.aclose()
        return after_cancel, during_stream, admission.load()

    after_cancel, during_stream, after_stream = asyncio.run(scenario())
    idle = {"running": 0, "waiting": 0, "refused": 0}
    assert {k: after_cancel[k] for k in idle} == idle
    assert during_stream["running"] == 1
    assert {k: after_stream[k] for k in idle} == idle


def test_unbounded_queue_never_refuses():
    admission = Admission(max_running=1, max_waiting=-1, status=503, retry_after_s=1)
    admission.running = 1
    admission.waiting = 10_000
    admission.check()


def test_serve_routes_what_the_replica_holds_plus_headroom():
    assert serve_routing_limit(8, 16) == 40


def test_serve_backstop_answers_with_the_same_status_and_retry_after():
    from serve_tp.api.app import backpressure_options, parse_config

    options = backpressure_options(parse_config({"max_ongoing_requests": 8, "max_queued_requests": 16,
                                                 "overload_status_code": "429", "overload_retry_after_s": "2"}))
    assert options["max_ongoing_requests"] == 40 and options["max_queued_requests"] == 16
    assert options["backpressure_config"].status_code == 429
    assert options["backpressure_config"].retry_after_s == 2
    assert backpressure_options(parse_config({"max_ongoing_requests": 8, "max_queued_requests": -1})) == {
        "max_ongoing_requests": 8, "max_queued_requests": -1}


def test_a_shared_limit_says_it_is_a_share():
    """api_replicas: each HTTP replica holds 1/N of the group's limits, and its refusal says so."""
    async def scenario():
        admission = Admission(max_running=1, max_waiting=0, status=503, retry_after_s=1, sharers=4)
        release = asyncio.Event()
        task = asyncio.create_task(hold(admission, release))
        await asyncio.sleep(0)
        with pytest.raises(APIError) as refused:
            admission.check()
        release.set()
        await task
        return refused.value

    err = asyncio.run(scenario())
    assert "max_ongoing_requests=1" in err.message and "1/4 of the group's limits" in err.message
