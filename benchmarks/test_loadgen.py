"""The benchmark's own arithmetic and SSE parsing, against canned streams (no server, no Ray).

    python -m pytest benchmarks/test_loadgen.py
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from benchmarks import loadgen, report, stats


def sse(*chunks) -> bytes:
    lines = [f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks]
    return "".join(lines).encode()


def text_chunk(text: str, finish=None) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def run_stream(body: bytes, status: int = 200) -> loadgen.RequestResult:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))

    async def go():
        async with httpx.AsyncClient(transport=transport) as client:
            return await loadgen.stream_completion(client, "http://test/v1/completions", {})

    return asyncio.run(go())


def test_percentile_interpolates_like_numpy():
    assert stats.percentile([], 50) is None
    assert stats.percentile([3.0], 99) == 3.0
    assert stats.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert stats.percentile(list(range(101)), 99) == pytest.approx(99)


def test_usage_counts_tokens_over_chunks():
    res = run_stream(sse(text_chunk("a"), text_chunk("bc", "length"),
                         {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}, "[DONE]"))
    assert res.ok and res.tokens_from_usage
    assert (res.output_tokens, res.prompt_tokens, res.text_chunks) == (3, 5, 2)
    assert res.tpot == pytest.approx((res.last_token - res.ttft) / 2)


def test_without_usage_each_text_chunk_is_a_token():
    res = run_stream(sse(text_chunk(""), text_chunk("a"), text_chunk("b"), text_chunk("c"), "[DONE]"))
    assert res.ok and not res.tokens_from_usage and res.output_tokens == 3


def test_one_chunk_has_no_tpot():
    res = run_stream(sse(text_chunk("all at once", "length"),
                         {"choices": [], "usage": {"completion_tokens": 8}}, "[DONE]"))
    assert res.ok and res.output_tokens == 8 and res.tpot is None


def test_invisible_tokens_succeed_without_tpot():
    res = run_stream(sse(text_chunk("", "length"), {"choices": [], "usage": {"completion_tokens": 4}}, "[DONE]"))
    assert res.ok and res.no_visible_text and res.tpot is None


@pytest.mark.parametrize(
    "status, body, fragment",
    [
        (404, b'{"error": {"message": "no such model"}}', "HTTP 404"),
        (200, sse(text_chunk("a")), "without [DONE]"),
        (200, sse({"error": {"message": "boom"}}), "error chunk"),
    ],
)
def test_failures_are_errors_not_exceptions(status, body, fragment):
    res = run_stream(body, status)
    assert not res.ok and fragment in res.error


def test_summary_and_table():
    ok = loadgen.RequestResult(ok=True, ttft=0.1, last_token=0.5, latency=0.6, output_tokens=5,
                               text_chunks=5, tokens_from_usage=True)
    bad = loadgen.RequestResult(ok=False, error="HTTP 503: busy")
    row = stats.summarize("serve_tp", 4, [ok, ok, bad], duration=2.0, workload="fixed", sampling="greedy")
    assert (row["requests"], row["errors"]) == (3, 1)
    assert row["requests_per_s"] == pytest.approx(1.0)
    assert row["output_tokens_per_s"] == pytest.approx(5.0)
    assert row["tpot_p50_s"] == pytest.approx(0.1)
    assert row["error_samples"] == ["HTTP 503: busy"]
    # TPOT 100 ms misses the default 20 ms SLO: no goodput; a 150 ms TPOT SLO takes both.
    assert (row["slo_met"], row["goodput"]) == (0, 0)
    loose = stats.summarize("serve_tp", 4, [ok, ok, bad], duration=2.0, slo=stats.SLO(0.2, 0.15))
    assert (loose["slo_met"], loose["goodput"]) == (2, pytest.approx(1.0))
    table = report.markdown_table([row])
    assert ("| serve_tp | fixed | greedy | 4 users | 3 | 1 | 1.00 | 5.0 | 0.00 | 100.0 | 100.0 | 100.0 | 100.0 "
            "| 0.60 |") in table
    assert "TTFT ≤ 200 ms and TPOT ≤ 20 ms" in table
