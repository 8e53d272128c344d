"""The benchmark's own arithmetic, and its SSE timing against a real local server (no Ray).

    python -m pytest benchmarks/test_loadgen.py
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from benchmarks import loadgen, report, sse_server, stats


def body(max_tokens: int, **script) -> dict:
    """A streamed completion body; `script` tells the stand-in server how to answer (sse_server.scripted_chunks)."""
    return {**loadgen.completion_body("gpt2", "hi", max_tokens), "sse_script": script}


def stream(url: str, request: dict, client: str = "aiohttp") -> loadgen.RequestResult:
    """One request through loadgen's aiohttp client, or its httpx one (soak.py's)."""

    async def go():
        if client == "aiohttp":
            async with loadgen.session(30) as http:
                return await loadgen.stream_completion(http, url, request)
        async with httpx.AsyncClient(timeout=30) as http:
            return await loadgen.stream_completion_httpx(http, url, request)

    return asyncio.run(go())


def reference(request: dict) -> dict:
    """What the load generator counted before its byte-search fast path: json.loads on every
    chunk (loadgen's parse up to commit 4795348), run over the exact bytes the server sends."""
    _, events = sse_server.scripted_chunks(request["sse_script"], request["max_tokens"])
    text_chunks, first_text, first_choice, usage, done = 0, None, None, None, False
    for i, ev in enumerate(events):
        data = ev.decode()[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            return {"error": True}
        if chunk.get("choices") and first_choice is None:
            first_choice = i
        if any(c.get("text") for c in chunk.get("choices") or []):
            text_chunks += 1
            first_text = i if first_text is None else first_text
        if (chunk.get("usage") or {}).get("completion_tokens") is not None:
            usage = chunk["usage"]
    return {"error": not done, "text_chunks": text_chunks, "visible": first_text is not None,
            "output_tokens": usage["completion_tokens"] if usage else text_chunks,
            "prompt_tokens": usage["prompt_tokens"] if usage else None}


SCRIPTS = {
    "usage": {},
    "no_usage": {"usage": False},
    "empty_chunks": {"empty": [0, 3, 4]},
    "all_empty": {"empty": list(range(8))},
    "usage_differs": {"usage_tokens": 11},
    "compact_json": {"compact": True, "empty": [1]},
    # Texts that look like the keys the fast path searches for: JSON escapes their quotes.
    "tricky_texts": {"texts": ['"', '"text": ""', ' "usage"', '\\', "é", '"error": 1', '{"choices": [{']},
    "in_band_error": {"error_after": 3},
    "cut_stream": {"cut_after": 5},
}


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_counts_match_a_full_json_parse_on_a_real_server(sse_url, name, client):
    request = body(8, **SCRIPTS[name])
    want, res = reference(request), stream(sse_url, request, client)
    assert res.ok is not want["error"], res.error
    if want["error"]:
        return
    assert res.status == 200 and res.error is None
    assert (res.text_chunks, res.output_tokens, res.prompt_tokens) == (
        want["text_chunks"], want["output_tokens"], want["prompt_tokens"])
    assert res.tokens_from_usage is (want["prompt_tokens"] is not None)
    assert res.no_visible_text is not want["visible"]
    assert 0 < res.ttft <= res.last_token <= res.latency
    if res.text_chunks >= 2:
        assert res.tpot == pytest.approx((res.last_token - res.ttft) / (res.output_tokens - 1))
    else:
        assert res.tpot is None


def test_reference_sees_what_the_scripts_say():
    # Control for the comparison above: the scripts do produce the cases they are named for.
    assert reference(body(8, **SCRIPTS["empty_chunks"]))["text_chunks"] == 5
    assert reference(body(8, **SCRIPTS["no_usage"]))["prompt_tokens"] is None
    assert reference(body(8, **SCRIPTS["usage_differs"]))["output_tokens"] == 11
    assert reference(body(8, **SCRIPTS["all_empty"]))["visible"] is False
    assert reference(body(8, **SCRIPTS["tricky_texts"]))["text_chunks"] == 8


def test_ttft_is_the_first_chunk_with_text(paced_sse_url):
    # A chunk every 10 ms; the first 20 have no text, so TTFT is ~200 ms, not the first chunk's ~10 ms.
    late = stream(paced_sse_url, body(30, empty=list(range(20))))
    assert late.ok and late.text_chunks == 10 and late.output_tokens == 30 and not late.no_visible_text
    assert late.ttft >= 0.19
    assert late.tpot == pytest.approx((late.last_token - late.ttft) / 29)
    # Control: the same stream with text from the first chunk.
    early = stream(paced_sse_url, body(30))
    assert early.ok and early.text_chunks == 30 and early.ttft < 0.1


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
@pytest.mark.parametrize(
    "script, fragment",
    [
        ({"status": 400, "message": "max_tokens must be positive"},
         'HTTP 400: {"error": {"message": "max_tokens must be positive", "type": "invalid_request_error"'),
        ({"status": 503, "message": "busy"}, 'HTTP 503: {"error": {"message": "busy", "type": "internal_error"'),
        ({"error_after": 2}, 'error chunk: {"message": "scripted in-band error"'),
        ({"cut_after": 3}, "stream ended without [DONE]"),
    ],
)
def test_failures_are_errors_with_status_and_body(sse_url, client, script, fragment):
    res = stream(sse_url, body(8, **script), client)
    assert not res.ok and res.error.startswith(fragment), res.error
    assert res.status == script.get("status", 200)


def test_refused_connection_is_an_error_not_an_exception():
    res = stream("http://127.0.0.1:9/v1/completions", body(4))  # port 9: discard, nothing listens
    assert not res.ok and res.status is None and res.error


def test_percentile_interpolates_like_numpy():
    assert stats.percentile([], 50) is None
    assert stats.percentile([3.0], 99) == 3.0
    assert stats.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert stats.percentile(list(range(101)), 99) == pytest.approx(99)


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
