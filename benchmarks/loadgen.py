"""HTTP load against an OpenAI `/v1/completions` endpoint: closed-loop users or open-loop arrivals.

Closed loop (`run_level`): each of `concurrency` clients sends its requests one after
another (a new one as soon as the last one ends), so `concurrency` requests are in flight
for the whole level. Open loop (`run_open_loop`): each request is sent at its scheduled
time whether or not earlier ones have finished, as independent users arrive; the server's
queue, not the client, absorbs a burst. Every request streams, so time to first token and
time per output token come from the client's own clock, the way a user would see them.
Statistics over the results: `benchmarks.stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
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
    index: Optional[int] = None  # which of the level's bodies was sent
    greedy: Optional[bool] = None  # temperature 0
    max_tokens: Optional[int] = None  # as sent
    sent_at: Optional[float] = None  # seconds from the level's start
    scheduled_at: Optional[float] = None  # open loop: when it was due (sent_at - this: the client's lag)

    @property
    def tpot(self) -> Optional[float]:
        """(last - first token) / (n - 1); None when the text came in one chunk (no spacing to see)."""
        if not self.ok or self.output_tokens < 2 or self.text_chunks < 2:
            return None
        return (self.last_token - self.ttft) / (self.output_tokens - 1)


def completion_body(model: Optional[str], prompt: str, max_tokens: int, temperature: float = 0,
                    top_p: Optional[float] = None, top_k: Optional[int] = None) -> dict:
    """A streamed completion of exactly max_tokens (ignore_eos); greedy unless temperature > 0.

    top_p and top_k are sent only when set (and only with temperature > 0: greedy ignores them).
    """
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if temperature > 0:
        if top_p is not None:
            body["top_p"] = top_p
        if top_k is not None:
            body["top_k"] = top_k
    return body


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    """Send one streamed completion and time its SSE chunks; never raises."""
    start = time.perf_counter()
    res = RequestResult(ok=False, greedy=body.get("temperature") == 0, max_tokens=body.get("max_tokens"))
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


def _client(limits: httpx.Limits, timeout: httpx.Timeout, headers: Optional[dict], ssl_context,
            transport: Optional[httpx.AsyncBaseTransport]) -> httpx.AsyncClient:
    return httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers, verify=ssl_context, transport=transport)


def _transport_settings(request_timeout_s: float):
    # One connection pool per client, not one shared pool: httpcore matches every queued
    # request against every pooled connection on each request and response, so a shared
    # pool costs O(clients^2) per request. At 128 clients that made this (single-threaded)
    # load generator the bottleneck: stalls of 1-6 s before a request was even sent,
    # charged to the server's TTFT. The clients share one TLS context: loading one per
    # client costs ~20 ms each.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(request_timeout_s, connect=min(30.0, request_timeout_s))
    return limits, timeout, httpx.create_ssl_context()


async def _send(client: httpx.AsyncClient, url: str, bodies: Sequence[dict], index: int, start: float,
                scheduled_at: Optional[float] = None) -> RequestResult:
    sent_at = time.perf_counter() - start
    res = await stream_completion(client, url, bodies[index])
    res.index, res.sent_at, res.scheduled_at = index, sent_at, scheduled_at
    return res


async def run_level(
    url: str,
    bodies: "dict | Sequence[dict]",
    concurrency: int,
    requests_per_client: int,
    *,
    request_timeout_s: float,
    level_timeout_s: float,
    headers: Optional[dict] = None,
    transport: Optional[httpx.AsyncBaseTransport] = None,
) -> tuple[list[RequestResult], float]:
    """`concurrency` clients, each sending up to `requests_per_client` requests in turn.

    Request k of the level (in the order they are sent) is `bodies[k % len(bodies)]`. A
    client sends no new request once `level_timeout_s` has passed, so the level ends by
    itself even against a slow server. Returns the results and the level's wall time.
    `transport` replaces the network (the unit tests' canned server).
    """
    bodies = [bodies] if isinstance(bodies, dict) else list(bodies)
    limits, timeout, ssl_context = _transport_settings(request_timeout_s)
    results: list[RequestResult] = []
    next_index = 0
    async with contextlib.AsyncExitStack() as stack:
        # Made before the clock starts.
        clients = [await stack.enter_async_context(_client(limits, timeout, headers, ssl_context, transport))
                   for _ in range(concurrency)]
        start = time.perf_counter()
        deadline = start + level_timeout_s

        async def one_client(client: httpx.AsyncClient) -> None:
            nonlocal next_index
            for _ in range(requests_per_client):
                if time.perf_counter() > deadline:
                    return
                index, next_index = next_index % len(bodies), next_index + 1
                results.append(await _send(client, url, bodies, index, start))

        await asyncio.gather(*(one_client(client) for client in clients))
        duration = time.perf_counter() - start
    return results, duration


async def run_open_loop(
    url: str,
    bodies: Sequence[dict],
    arrivals: Sequence[float],
    *,
    request_timeout_s: float,
    level_timeout_s: float,
    headers: Optional[dict] = None,
    clients_ready: int = 64,
    transport: Optional[httpx.AsyncBaseTransport] = None,
) -> tuple[list[RequestResult], float]:
    """Send request i at `arrivals[i]` seconds from the start, finished or not the ones before.

    Request i is `bodies[i % len(bodies)]` (one fixed body serves every arrival).
    No request is sent after `level_timeout_s`. Each request in flight has its own client
    (a free one, or a new one when all are busy; `clients_ready` are made before the clock
    starts). Every result records when it was due and when it was sent, so a client that
    fell behind its schedule shows in the results. Returns the results and the wall time
    from the start to the last response.
    """
    limits, timeout, ssl_context = _transport_settings(request_timeout_s)
    results: list[RequestResult] = []
    async with contextlib.AsyncExitStack() as stack:
        free = [await stack.enter_async_context(_client(limits, timeout, headers, ssl_context, transport))
                for _ in range(min(clients_ready, len(arrivals)))]

        async def one_request(index: int, due: float) -> None:
            client = free.pop() if free else await stack.enter_async_context(
                _client(limits, timeout, headers, ssl_context, transport))
            try:
                results.append(await _send(client, url, bodies, index % len(bodies), start, scheduled_at=due))
            finally:
                free.append(client)

        start = time.perf_counter()
        tasks = []
        for index, due in enumerate(arrivals):
            if due > level_timeout_s:
                break
            wait = start + due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one_request(index, due)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return results, duration
