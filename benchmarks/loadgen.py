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
import json
import re
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import aiohttp
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


# A JSON string escapes every quote inside it, so these byte patterns match only keys.
_CHOICES_OPEN = re.compile(rb'"choices"\s*:\s*\[\s*\{')  # a non-empty choices list
_TEXT_NON_EMPTY = re.compile(rb'"text"\s*:\s*"[^"]')


class StreamTimer:
    """Times one response's SSE lines into its RequestResult; the same for every HTTP client.

    Per chunk it needs only: is it [DONE], an error, does it carry choices, is any choice's
    text non-empty, does it carry usage. A chunk that names neither `usage` nor `error` (every
    token's chunk) is read by two byte searches instead of json.loads (1.5 vs 5.4 us a chunk on the CPU box);
    the rest are parsed in full. The clock is read once per chunk.
    """

    __slots__ = ("res", "start", "done", "first_choice")

    def __init__(self, res: RequestResult, start: float):
        self.res, self.start, self.done, self.first_choice = res, start, False, None

    def line(self, line: bytes) -> bool:
        """Take one line of the body; False once an error chunk ended the request."""
        if not line.startswith(b"data:"):
            return True  # blank separators, comments, `event:` lines
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True  # read on to the end: closing early looks like a disconnect
            return True
        if b'"usage"' in data or b'"error"' in data:
            return self._parsed(data)
        now = time.perf_counter() - self.start
        if self.first_choice is None and _CHOICES_OPEN.search(data):
            self.first_choice = now
        if _TEXT_NON_EMPTY.search(data):
            self._text(now)
        return True

    def _text(self, now: float) -> None:
        res = self.res
        res.text_chunks += 1
        res.last_token = now
        if res.ttft is None:
            res.ttft = now

    def _parsed(self, data: bytes) -> bool:
        chunk = json.loads(data)
        res = self.res
        if "error" in chunk:
            res.error = f"error chunk: {json.dumps(chunk['error'])[:300]}"
            return False
        now = time.perf_counter() - self.start
        choices = chunk.get("choices")
        if choices:
            if self.first_choice is None:
                self.first_choice = now
            if any(c.get("text") for c in choices):
                self._text(now)
        usage = chunk.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            res.output_tokens = int(usage["completion_tokens"])
            res.prompt_tokens = usage.get("prompt_tokens")
            res.tokens_from_usage = True
        return True

    def finish(self) -> None:
        """The stream ended: settle ok, output tokens and TTFT."""
        res = self.res
        res.latency = time.perf_counter() - self.start
        if not self.done:
            res.error = "stream ended without [DONE]"
            return
        if not res.tokens_from_usage:
            res.output_tokens = res.text_chunks  # one token per chunk, as servers stream by default
        if res.ttft is None and self.first_choice is not None:
            # Tokens that decode to "" (special tokens; a random model past EOS) are not
            # streamed, so the first choice that came is the first the client could see.
            res.ttft = res.last_token = self.first_choice
            res.no_visible_text = True
        res.ok = res.ttft is not None
        if not res.ok:
            res.error = "no choices in the stream"


def _new_result(body: dict) -> RequestResult:
    return RequestResult(ok=False, greedy=body.get("temperature") == 0, max_tokens=body.get("max_tokens"))


async def stream_completion(session: aiohttp.ClientSession, url: str, body: dict) -> RequestResult:
    """Send one streamed completion and time its SSE chunks; never raises.

    aiohttp, as vLLM's benchmark client streams (`benchmarks/backend_request_func.py`): its
    C HTTP parser and line reader cost a fraction of httpx's per chunk
    (`benchmarks/client_ceiling.py`, BENCHMARKS.md "The load generator's own ceiling").
    """
    start = time.perf_counter()
    res = _new_result(body)
    try:
        async with session.post(url, json=body) as resp:
            res.status = resp.status
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.read())[:300].decode(errors='replace')}"
                return res
            timer = StreamTimer(res, start)
            async for line in resp.content:  # one line at a time, however the bytes arrived
                if not timer.line(line):
                    return res
            timer.finish()
    except Exception as exc:  # timeouts, refused connections, broken streams: all count as errors
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    return res


async def stream_completion_httpx(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    """`stream_completion` over an httpx client (benchmarks/soak.py's); the same timing."""
    start = time.perf_counter()
    res = _new_result(body)
    try:
        async with client.stream("POST", url, json=body) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300].decode(errors='replace')}"
                return res
            timer = StreamTimer(res, start)
            async for line in resp.aiter_lines():
                if not timer.line(line.encode()):
                    return res
            timer.finish()
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    return res


def session(request_timeout_s: float, headers: Optional[dict] = None) -> aiohttp.ClientSession:
    """One session (one connection pool) for every user of this process.

    aiohttp's pool looks a free connection up by host, so sharing it costs nothing per
    request (httpx's pool matched every queued request against every connection: O(users^2),
    which is why the httpx client used one pool per user). The read timeout is per read,
    as httpx's was: a long stream is fine as long as chunks keep coming.
    """
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(30.0, request_timeout_s),
                                    sock_read=request_timeout_s)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers,
                                 read_bufsize=1 << 20)  # a chunk with logprobs can be long


def level_start(start_at: Optional[float]) -> float:
    """The level's start on this process's perf_counter, from a wall-clock time shared by processes.

    Several client processes get the same `start_at` (time.time()); each turns it into its
    own perf_counter once, so their schedules and `sent_at`s share one clock.
    """
    now = time.perf_counter()
    return now if start_at is None else now + (start_at - time.time())


async def _wait_until(start: float) -> None:
    wait = start - time.perf_counter()
    if wait > 0:
        await asyncio.sleep(wait)


async def _send(session_: aiohttp.ClientSession, url: str, bodies: Sequence[dict], index: int, start: float,
                scheduled_at: Optional[float] = None) -> RequestResult:
    sent_at = time.perf_counter() - start
    res = await stream_completion(session_, url, bodies[index])
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
    first_index: int = 0,
    start_at: Optional[float] = None,
) -> tuple[list[RequestResult], float]:
    """`concurrency` clients, each sending up to `requests_per_client` requests in turn.

    Request k of the level (in the order they are sent) is `bodies[(first_index + k) % len(bodies)]`.
    A client sends no new request once `level_timeout_s` has passed, so the level ends by
    itself even against a slow server. Returns the results and the level's wall time.
    `first_index` and `start_at` (a time.time() to start at) let several processes share
    one level (benchmarks/client_procs.py).
    """
    bodies = [bodies] if isinstance(bodies, dict) else list(bodies)
    results: list[RequestResult] = []
    next_index = first_index
    async with session(request_timeout_s, headers) as http:  # made before the clock starts
        start = level_start(start_at)
        await _wait_until(start)
        deadline = start + level_timeout_s

        async def one_client() -> None:
            nonlocal next_index
            for _ in range(requests_per_client):
                if time.perf_counter() > deadline:
                    return
                index, next_index = next_index % len(bodies), next_index + 1
                results.append(await _send(http, url, bodies, index, start))

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
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
    indices: Optional[Sequence[int]] = None,
    start_at: Optional[float] = None,
) -> tuple[list[RequestResult], float]:
    """Send request i at `arrivals[i]` seconds from the start, finished or not the ones before.

    Request i is `bodies[indices[i] % len(bodies)]` (indices default to 0, 1, ...; one fixed
    body serves every arrival). No request is sent after `level_timeout_s`. Every result
    records when it was due and when it was sent, so a client that fell behind its schedule
    shows in the results. Returns the results and the wall time from the start to the last
    response. `indices` and `start_at` (a time.time() to start at) let several processes
    share one level's arrivals (benchmarks/client_procs.py).
    """
    indices = range(len(arrivals)) if indices is None else indices
    results: list[RequestResult] = []

    async def one_request(http: aiohttp.ClientSession, index: int, due: float) -> None:
        results.append(await _send(http, url, bodies, index % len(bodies), start, scheduled_at=due))

    async with session(request_timeout_s, headers) as http:
        start = level_start(start_at)
        tasks = []
        for index, due in zip(indices, arrivals):
            if due > level_timeout_s:
                break
            await _wait_until(start + due)
            tasks.append(asyncio.create_task(one_request(http, index, due)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return results, duration
