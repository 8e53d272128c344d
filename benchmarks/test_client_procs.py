"""The client split over processes: every requested request sent once, results merged on one clock.

Real spawned client processes against a real local SSE server (benchmarks/sse_server.py).

    python -m pytest benchmarks/test_client_procs.py
"""

from __future__ import annotations

import asyncio

import pytest

from benchmarks import client_procs, loadgen


def test_users_and_arrivals_split_evenly_and_completely():
    assert client_procs.split_users(5, 3) == [2, 2, 1]
    assert client_procs.split_users(2, 4) == [1, 1]  # no process without users
    assert client_procs.split_users(128, 1) == [128]
    shares = client_procs.split_arrivals([0.0, 0.1, 0.2, 0.3, 0.4], 2)
    assert shares == [([0, 2, 4], [0.0, 0.2, 0.4]), ([1, 3], [0.1, 0.3])]
    assert client_procs.default_processes(2) == 1 and client_procs.default_processes(16) == 2
    assert client_procs.default_processes(128) == 4


def distinct_bodies(n: int) -> list[dict]:
    """Body i asks for 2 + i tokens, so every result tells which body it sent."""
    return [loadgen.completion_body("gpt2", "hi", 2 + i) for i in range(n)]


def test_closed_loop_over_processes_sends_each_body_once(sse_url):
    bodies = distinct_bodies(10)
    run = asyncio.run(client_procs.run_level(sse_url, bodies, 5, 2, processes=3, request_timeout_s=30,
                                             level_timeout_s=60))
    assert len(run.results) == 10 and all(r.ok for r in run.results)
    assert sorted(r.index for r in run.results) == list(range(10))
    assert all(r.max_tokens == r.output_tokens == 2 + r.index for r in run.results)
    assert all(0 <= r.sent_at <= run.duration for r in run.results)
    assert run.client_cpu_s > 0
    # Control: one process, the same level, sends the same requests.
    one = asyncio.run(client_procs.run_level(sse_url, bodies, 5, 2, request_timeout_s=30, level_timeout_s=60))
    assert sorted(r.index for r in one.results) == list(range(10))


def test_closed_loop_with_fewer_bodies_cycles_them(sse_url):
    run = asyncio.run(client_procs.run_level(sse_url, distinct_bodies(1), 4, 3, processes=2, request_timeout_s=30,
                                             level_timeout_s=60))
    assert len(run.results) == 12 and {r.index for r in run.results} == {0}


def test_open_loop_over_processes_keeps_one_schedule(slow_sse_url):
    bodies = distinct_bodies(6)
    arrivals = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    run = asyncio.run(client_procs.run_open_loop(slow_sse_url, bodies, arrivals, processes=2, request_timeout_s=30,
                                                 level_timeout_s=60))
    assert sorted(r.index for r in run.results) == list(range(6)) and all(r.ok for r in run.results)
    assert all(r.scheduled_at == arrivals[r.index] for r in run.results)
    # Both processes count from one start: each request went out when due, on the merged clock.
    assert all(abs(r.sent_at - r.scheduled_at) < 0.05 for r in run.results)
    assert run.duration < 0.25 + 0.3 * 2  # overlapped: one at a time would take 1.8 s


def test_a_failing_client_process_raises_instead_of_hanging(sse_url):
    with pytest.raises(RuntimeError, match="client process failed: ZeroDivisionError"):
        asyncio.run(client_procs.run_level(sse_url, [], 2, 1, processes=2, request_timeout_s=5,
                                           level_timeout_s=10))
