"""Admission control of one replica: run a bounded number of requests, queue a bounded
number more, refuse the rest at once with a Retry-After in the one error shape.

Why here and not only in Serve's router: Serve 2.60 does bound its queue
(`max_queued_requests`) and can add Retry-After (`BackpressureConfig`), but its proxy
answers with a text/plain body ("Request dropped due to backpressure ..."), not the
OpenAI error object every other failure of this API returns. So the replica keeps the
queue itself and Serve's router queue stays as a backstop (see `app.backpressure_options`).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from serve_tp.api.errors import APIError


def serve_routing_limit(max_running: int, max_waiting: int) -> int:
    """Requests Serve may route to one replica (its `max_ongoing_requests`): what the
    replica holds, +16 so /health, /v1/models and requests on their way to a refusal never
    wait behind queued completions."""
    return max_running + max_waiting + 16


class Admission:
    """At most `max_running` requests generate at once; at most `max_waiting` wait for a
    turn (-1: no bound); beyond that `check` raises `overloaded`."""

    def __init__(self, max_running: int, max_waiting: int, status: int, retry_after_s: int, sharers: int = 1):
        """`sharers`: HTTP replicas splitting one group's limits (api_replicas); these are one share."""
        if max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {max_running}")
        self.max_running, self.max_waiting = max_running, max_waiting
        self.status, self.retry_after_s = status, retry_after_s
        self.sharers = sharers
        self.running = 0
        self.waiting = 0
        self.refused = 0
        self._turns = asyncio.Semaphore(max_running)

    def full(self) -> bool:
        return (self.max_waiting >= 0 and self.running >= self.max_running
                and self.waiting >= self.max_waiting)

    def check(self) -> None:
        """Refuse now, before any response has started, if there is no room to wait."""
        if self.full():
            self.refused += 1
            raise APIError(
                self.status,
                f"the server is overloaded: {self.running} requests running (max_ongoing_requests="
                f"{self.max_running}) and {self.waiting} waiting (max_queued_requests={self.max_waiting})"
                f"{self._share_note()}; retry after {self.retry_after_s}s",
                code="overloaded", headers={"Retry-After": str(self.retry_after_s)},
            )

    def _share_note(self) -> str:
        if self.sharers == 1:
            return ""
        return f", this HTTP replica's share: 1/{self.sharers} of the group's limits (api_replicas)"

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait (FIFO) for a running slot and hold it for the body; cancellation-safe."""
        self.waiting += 1
        try:
            await self._turns.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._turns.release()

    async def wrap_stream(self, body: AsyncIterator[str]) -> AsyncIterator[str]:
        """A streamed response holds its turn until its last chunk."""
        try:
            async with self.turn():
                async for chunk in body:
                    yield chunk
        finally:
            await body.aclose()  # a client that left frees its batch slots now, not at GC

    def load(self) -> dict:
        """Now, and the limits (this replica's share of its group's, under api_replicas)."""
        return {"running": self.running, "waiting": self.waiting, "refused": self.refused,
                "max_running": self.max_running, "max_waiting": self.max_waiting}
