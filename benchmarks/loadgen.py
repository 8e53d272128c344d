"""Closed-loop HTTP load against an OpenAI `/v1/completions` endpoint, and its statistics.

Each of `concurrency` clients sends its requests one after another (a new one as soon as
the last one ends), so `concurrency` requests are in flight for the whole level. Every
request streams, so time to first token and time per output token come from the client's
own clock, the way a user would see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import httpx


@dataclass
class RequestResult:
    """What one request measured; times in seconds from the moment it was sent."""

    ok: bool
    status: Optional[int] = None
    error: Optional[str] = None
    ttft: Optional[float] = None  # first chunk with non-empty text
    last_token: Optional[float] = None  # last chunk with non-empty text
    latency: Optional[float] = None  # until the stream ended
    output_tokens: int = 0
    prompt_tokens: Optional[int] = None
    text_chunks: int = 0
    tokens_from_usage: bool = False
    no_visible_text: bool = False  # every token decoded to "" (e.g. EOS past ignore_eos)

    @property
    def tpot(self) -> Optional[float]:
        """(last - first token) / (n - 1); None when the text came in one chunk (no spacing to see)."""
        if not self.ok or self.output_tokens < 2 or self.text_chunks < 2:
            return None
        return (self.last_token - self.ttft) / (self.output_tokens - 1)


def completion_body(model: str, prompt: str, max_tokens: int) -> dict:
    """Greedy, fixed length: ignore_eos makes every request produce exactly max_tokens."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    """Send one streamed completion and time its SSE chunks; never raises."""
    start = time.perf_counter()
    res = RequestResult(ok=False)
    try:
        async with client.stream("POST", url, json=body) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300].decode(errors='replace')}"
                return res
            done, first_choice = False, None
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True  # read on to the end: closing early looks like a disconnect
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"error chunk: {json.dumps(chunk['error'])[:300]}"
                    return res
                now = time.perf_counter() - start
                if chunk.get("choices") and first_choice is None:
                    first_choice = now
                if any(c.get("text") for c in chunk.get("choices") or []):
                    res.text_chunks += 1
                    res.last_token = now
                    if res.ttft is None:
                        res.ttft = now
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    res.output_tokens = int(usage["completion_tokens"])
                    res.prompt_tokens = usage.get("prompt_tokens")
                    res.tokens_from_usage = True
            res.latency = time.perf_counter() - start
            if not done:
                res.error = "stream ended without [DONE]"
                return res
            if not res.tokens_from_usage:
                res.output_tokens = res.text_chunks  # one token per chunk, as servers stream by default
            if res.ttft is None and first_choice is not None:
                # Tokens that decode to "" (special tokens; a random model past EOS) are not
                # streamed, so the first choice that came is the first the client could see.
                res.ttft = res.last_token = first_choice
                res.no_visible_text = True
            res.ok = res.ttft is not None
            if not res.ok:
                res.error = "no choices in the stream"
    except Exception as exc:  # timeouts, refused connections, broken streams: all count as errors
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    return res


async def run_level(
    url: str,
    body: dict,
    concurrency: int,
    requests_per_client: int,
    *,
    request_timeout_s: float,
    level_timeout_s: float,
    headers: Optional[dict] = None,
) -> tuple[list[RequestResult], float]:
    """`concurrency` clients, each sending up to `requests_per_client` requests in turn.

    A client sends no new request once `level_timeout_s` has passed, so the level ends by
    itself even against a slow server. Returns the results and the level's wall time.
    """
    # One connection pool per client, not one shared pool of `concurrency` connections:
    # httpcore matches every queued request against every pooled connection on each
    # request and response, so a shared pool costs O(concurrency^2) per request. At 128
    # clients that made this (single-threaded) load generator the bottleneck: stalls of
    # 1-6 s before a request was even sent, charged to the server's TTFT. The clients are
    # made before the clock starts: each one loads its own TLS context (~20 ms).
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(request_timeout_s, connect=min(30.0, request_timeout_s))
    results: list[RequestResult] = []
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers))
                   for _ in range(concurrency)]
        start = time.perf_counter()
        deadline = start + level_timeout_s

        async def one_client(client: httpx.AsyncClient) -> None:
            for _ in range(requests_per_client):
                if time.perf_counter() > deadline:
                    return
                results.append(await stream_completion(client, url, body))

        await asyncio.gather(*(one_client(client) for client in clients))
        duration = time.perf_counter() - start
    return results, duration


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (q in 0..100), as numpy's default; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(target: str, concurrency: int, results: list[RequestResult], duration: float) -> dict:
    """One row of the report: throughput over the level's wall time, latency percentiles."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    latency = [r.latency for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    errors = [r.error for r in results if not r.ok]
    return {
        "target": target,
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration > 0 else None,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "prompt_tokens": next((r.prompt_tokens for r in ok if r.prompt_tokens is not None), None),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
        "single_chunk": bool(ok) and all(r.text_chunks == 1 for r in ok),
        "no_visible_text": sum(r.no_visible_text for r in ok),
        "tokens_counted_by": "usage" if ok and all(r.tokens_from_usage for r in ok) else "chunks",
        "error_samples": sorted(set(errors))[:5],
        "per_request": [{**asdict(r), "tpot": r.tpot} for r in results],
    }
