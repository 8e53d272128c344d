"""One sequence's outputs between the replica's poller and the request that streams them.

Every chunk a stream sends costs CPU twice per token on the HTTP path: in the replica
(JSON, the ASGI send) and in Serve's proxy (a streamed object and a socket write), about
0.2 ms each. Under load that, not the engine, caps tokens/s (BENCHMARKS.md, "Where the
time goes on the HTTP path"). So, as Ray Serve LLM's LLMServer does with its
`stream_batching_interval_ms`, a busy replica sends each stream at most one chunk per
interval, carrying every token decoded meanwhile. Unlike LLMServer's Batcher it holds
nothing back when it need not: the first output and the finish go out at once, and below
`stream_batching_min_streams` sequences in flight every output goes out as it comes, so
one user's TTFT and token pace are what the engine gives.

Outputs are merged as they arrive (SequenceOutput.merge: tokens, logprobs), so a stream
that lags behind the engine always catches up in one chunk.
"""

from __future__ import annotations

import asyncio
import math
from typing import Callable, Optional, Union

from serve_tp.messages import SequenceOutput

Item = Union[SequenceOutput, BaseException]


class Outbox:
    """Filled by the poller (`put`), drained by one consumer (`get`); no task of its own.

    `interval_s` is asked on every decision, so pacing follows the replica's load as it
    changes: it returns the least time between two outputs handed out, 0 for none.
    """

    def __init__(self, interval_s: Callable[[], float]):
        self._interval_s = interval_s
        self._pending: Optional[Item] = None
        self._waiter: Optional[asyncio.Future] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._last_out = -math.inf

    def put(self, item: Item) -> None:
        pending = self._pending
        if pending is None or isinstance(item, BaseException):
            self._pending = item  # a failure replaces tokens not yet sent: the request fails anyway
        elif isinstance(pending, BaseException) or pending.finish_reason is not None:
            return  # nothing after a failure or a finish is delivered
        else:
            self._pending = pending.merge(item)
        self._wake_if_due()

    async def get(self) -> Item:
        """The outputs merged since the last get, once they are due; waits for the first one."""
        loop = asyncio.get_running_loop()
        if self._pending is None or self._delay(loop) > 0:
            # Resolved only once the pending output is due (`_wake_if_due`), so one wait does:
            # checking the delay again would cost a second look at the pacing per output.
            self._waiter = loop.create_future()
            self._wake_if_due()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item, self._pending = self._pending, None
        self._last_out = loop.time()
        return item

    def _delay(self, loop: asyncio.AbstractEventLoop) -> float:
        """Seconds until the pending output may go out."""
        pending = self._pending
        if isinstance(pending, BaseException) or pending.finish_reason is not None:
            return 0.0  # an end is never held back
        interval = self._interval_s()
        if interval <= 0:
            return 0.0  # unpaced: skip the clock
        return self._last_out + interval - loop.time()

    def _wake_if_due(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done() or self._pending is None:
            return
        loop = asyncio.get_running_loop()
        delay = self._delay(loop)
        if delay <= 0:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            waiter.set_result(None)
        elif self._timer is None:
            self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._wake_if_due()
