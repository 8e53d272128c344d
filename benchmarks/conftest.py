"""Fixtures of the benchmark tests: a real local SSE server (benchmarks/sse_server.py)."""

from __future__ import annotations

import pytest

from benchmarks import sse_server


@pytest.fixture(scope="module")
def sse_url():
    """A stand-in /v1/completions server on a free port; its completions URL."""
    with sse_server.serve_in_thread() as base:
        yield base + "/v1/completions"


@pytest.fixture(scope="module")
def slow_sse_url():
    """The same server, 0.3 s before each response starts (a slow prefill)."""
    with sse_server.serve_in_thread(delay_s=0.3) as base:
        yield base + "/v1/completions"


@pytest.fixture(scope="module")
def paced_sse_url():
    """The same server, 10 ms between a stream's chunks (a token every engine step)."""
    with sse_server.serve_in_thread(chunk_interval_s=0.01) as base:
        yield base + "/v1/completions"
