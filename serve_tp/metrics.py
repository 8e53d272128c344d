"""Prometheus metrics of serve_tp, defined once, through `ray.util.metrics`.

Ray exports them from every node's metrics agent (`ray_` prefix; counters also get
`_total`), next to Serve's own `ray_serve_*` metrics, so one scrape config sees all of them.
Imports no torch: the replica records HTTP and token metrics, rank 0 the engine's.
Tag values are few and fixed (route names, status codes, ranks), never prompt text.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from ray.util.metrics import Counter, Gauge, Histogram

ROUTES = frozenset({"/v1/completions", "/v1/models", "/infer", "/health"})
OTHER_ROUTE = "other"  # unknown paths (404s) share one series: a scanner must not grow the registry

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300]
_TOKEN_GAP_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5]
_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]

REQUESTS = Counter(
    "serve_tp_requests", "HTTP requests answered by a replica, by route and status code.",
    tag_keys=("model", "route", "status"))
REQUEST_LATENCY = Histogram(
    "serve_tp_request_latency_seconds", "Replica time from request to last byte of the response.",
    boundaries=_LATENCY_S, tag_keys=("model", "route"))
PROMPT_TOKENS = Counter(
    "serve_tp_prompt_tokens", "Prompt tokens of accepted requests (as in `usage`).", tag_keys=("model",))
COMPLETION_TOKENS = Counter(
    "serve_tp_completion_tokens", "Tokens generated, EOS included (as in `usage`).", tag_keys=("model",))
TIME_TO_FIRST_TOKEN = Histogram(
    "serve_tp_time_to_first_token_seconds",
    "Per sequence: from submission to rank 0 until its first token reaches the replica.",
    boundaries=_LATENCY_S, tag_keys=("model",))
TIME_PER_OUTPUT_TOKEN = Histogram(
    "serve_tp_time_per_output_token_seconds",
    "Per sequence of 2+ tokens: (last token time - first token time) / (tokens - 1).",
    boundaries=_TOKEN_GAP_S, tag_keys=("model",))
BATCH_SIZE = Histogram(
    "serve_tp_engine_batch_size", "Sequences in one engine step (decoded plus admitted), rank 0.",
    boundaries=_BATCH_SIZES, tag_keys=("model",))
WAITING = Gauge(
    "serve_tp_engine_waiting_sequences", "Sequences queued on rank 0 for a batch slot.", tag_keys=("model",))
RUNNING = Gauge(
    "serve_tp_engine_running_sequences", "Sequences in rank 0's batch.", tag_keys=("model",))
RANK_HEALTHY = Gauge(
    "serve_tp_rank_healthy", "1 if the rank passed the replica's last health check, else 0.",
    tag_keys=("model", "replica", "rank"))


COUNTER_FLUSH_S = 1.0  # well inside Ray's export interval (10 s): a scrape sees the same totals


class SummedCounter:
    """A Counter whose increments are summed per tag set in this process and recorded at
    most once per COUNTER_FLUSH_S: the replica counts every request three times (requests,
    prompt tokens, completion tokens), each a Ray record of ~3 us on its one thread. The
    totals are the same; they reach Ray up to a second later (outside an event loop: at once).
    """

    def __init__(self, counter: Counter):
        self.counter = counter
        self._sums: dict[tuple, float] = {}
        self._flush_at: Optional[asyncio.TimerHandle] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None  # the loop _flush_at is on

    def inc(self, value: float, tags: dict[str, str]) -> None:
        key = tuple(tags.items())
        self._sums[key] = self._sums.get(key, 0) + value
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_at is None or loop is not self._loop:  # another loop's timer may never fire
            self._loop, self._flush_at = loop, loop.call_later(COUNTER_FLUSH_S, self.flush)

    def flush(self) -> None:
        self._flush_at = None
        sums, self._sums = self._sums, {}
        for key, value in sums.items():
            if value > 0:
                self.counter.inc(value, dict(key))


REQUEST_COUNT = SummedCounter(REQUESTS)
PROMPT_TOKEN_COUNT = SummedCounter(PROMPT_TOKENS)
COMPLETION_TOKEN_COUNT = SummedCounter(COMPLETION_TOKENS)


def model_tags(model: str) -> dict[str, str]:
    return {"model": model}


class SequenceTimer:
    """Time to first token and time per output token of one sequence, as its tokens arrive."""

    def __init__(self, tags: dict[str, str]):
        self.tags = tags
        self.started = time.monotonic()
        self.first_at: Optional[float] = None
        self.first_count = 0
        self.last_at: Optional[float] = None
        self.tokens = 0

    def tokens_arrived(self, count: int) -> None:
        if count <= 0:
            return
        now = time.monotonic()
        if self.first_at is None:
            self.first_at, self.first_count = now, count
            TIME_TO_FIRST_TOKEN.observe(now - self.started, self.tags)
        self.last_at = now
        self.tokens += count

    def finished(self) -> None:
        # Tokens that arrive coalesced with the first share its time, so they add no gap.
        if self.last_at is not None and self.tokens > self.first_count:
            TIME_PER_OUTPUT_TOKEN.observe((self.last_at - self.first_at) / (self.tokens - self.first_count),
                                          self.tags)
        if self.tokens:
            COMPLETION_TOKEN_COUNT.inc(self.tokens, self.tags)


class EngineMetrics:
    """Rank 0's per-step recorder; the EngineLoop calls `step` once per plan, heartbeats included."""

    def __init__(self, model: str):
        self.tags = model_tags(model)
        self._last: Optional[tuple[int, int]] = None

    def step(self, batch_size: int, waiting: int, running: int) -> None:
        if batch_size:  # an idle heartbeat is no batch
            BATCH_SIZE.observe(batch_size, self.tags)
        if (waiting, running) != self._last:  # gauges hold their value: record changes only
            WAITING.set(waiting, self.tags)
            RUNNING.set(running, self.tags)
            self._last = (waiting, running)


def record_rank_health(model: str, replica: str, healthy: list[bool]) -> None:
    for rank, ok in enumerate(healthy):
        RANK_HEALTHY.set(1 if ok else 0, {"model": model, "replica": replica, "rank": str(rank)})


def _route(scope) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]  # Serve mounts the app under its route_prefix
    return path if path in ROUTES else OTHER_ROUTE


class RequestMetricsMiddleware:
    """Pure ASGI: counts each response by its status and times it to the last body byte.

    Not BaseHTTPMiddleware, which returns once the headers are out and so would time a
    stream by its first byte. Errors raised as APIError reach here already turned into
    responses by the app's handlers; anything that escapes them is counted as a 500.
    The model tag comes from `app.state.served_model_name`, which the replica sets: the
    FastAPI app is built at import, before any replica knows its config.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        status = 500

        async def send_and_watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            app = scope.get("app")
            model = getattr(getattr(app, "state", None), "served_model_name", None) or "unknown"
            route = _route(scope)
            REQUEST_COUNT.inc(1, {"model": model, "route": route, "status": str(status)})
            REQUEST_LATENCY.observe(time.monotonic() - started, {"model": model, "route": route})
