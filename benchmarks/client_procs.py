"""One benchmark level driven by several client processes, so the client is not the limit.

One Python process reads SSE chunks at a bounded rate (benchmarks/client_ceiling.py
measures it); a server faster than that would be measured at the client's speed. Here a
level's closed-loop users, or its open-loop arrivals, are split over K processes, each with
its own event loop (loadgen.run_level / run_open_loop), and the results come back as one
list, the same RequestResults one process would have made, with the CPU the client
processes spent on the level (their start-up excluded):

- closed loop: process p gets users[p] of the users (as even as possible) and the block of
  body indices its users would have sent, starting at `first_index`; a level's bodies are
  therefore each sent once, as with one process;
- open loop: arrival i goes to process i % K, keeping its index and its due time;
- one clock: every process starts its level at the same time.time() (handed out after all
  of them are ready), and `sent_at`/`scheduled_at` are seconds from that start on each
  process's perf_counter, so they merge as if one process had sent them. The level's
  duration is the latest process's.

Processes are spawned (not forked: the parent may run Ray's threads and an event loop) for
each level, before its clock starts.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from typing import NamedTuple, Optional, Sequence

from benchmarks import loadgen

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
START_MARGIN_S = 0.05  # between handing out the start time and the start: all must see it first


class LevelRun(NamedTuple):
    results: list[loadgen.RequestResult]
    duration: float  # seconds from the shared start to the last process's end
    client_cpu_s: float  # CPU (user+sys) the client processes spent on the level, start-up excluded


def split_users(concurrency: int, processes: int) -> list[int]:
    """Users per process, as even as possible; no process without users."""
    k = max(1, min(processes, concurrency))
    return [concurrency // k + (p < concurrency % k) for p in range(k)]


def split_arrivals(arrivals: Sequence[float], processes: int) -> list[tuple[list[int], list[float]]]:
    """(indices, due times) per process: arrival i to process i % K, in order."""
    k = max(1, min(processes, len(arrivals)))
    return [(list(range(p, len(arrivals), k)), list(arrivals[p::k])) for p in range(k)]


def _child(conn, kind: str, args: tuple, kwargs: dict) -> None:
    """A client process: say ready, wait for the shared start time, run its share, send the results."""
    try:
        conn.send("ready")
        kwargs["start_at"] = conn.recv()
        run = loadgen.run_level if kind == "closed" else loadgen.run_open_loop
        cpu = time.process_time()
        results, duration = asyncio.run(run(*args, **kwargs))
        conn.send(("ok", LevelRun(results, duration, time.process_time() - cpu)))
    except BaseException as exc:  # the parent must hear of it, not wait forever
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


async def _run_split(shares: list[tuple[str, tuple, dict]]) -> LevelRun:
    ctx = multiprocessing.get_context("spawn")
    procs, conns = [], []
    for kind, args, kwargs in shares:
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(child_end, kind, args, kwargs), daemon=True)
        proc.start()
        child_end.close()
        procs.append(proc)
        conns.append(parent_end)
    try:
        for conn in conns:
            if not await asyncio.to_thread(conn.poll, READY_TIMEOUT_S):
                raise RuntimeError(f"a client process was not ready within {READY_TIMEOUT_S:.0f} s")
            conn.recv()
        start_at = time.time() + START_MARGIN_S
        for conn in conns:
            conn.send(start_at)
        results, duration, cpu = [], 0.0, 0.0
        for conn in conns:
            status, payload = await asyncio.to_thread(conn.recv)
            if status != "ok":
                raise RuntimeError(f"a client process failed: {payload}")
            results += payload.results
            duration, cpu = max(duration, payload.duration), cpu + payload.client_cpu_s
        return LevelRun(results, duration, cpu)
    finally:
        for conn in conns:
            conn.close()
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()


async def _in_process(level) -> LevelRun:
    cpu = time.process_time()
    results, duration = await level
    return LevelRun(results, duration, time.process_time() - cpu)


async def run_level(url: str, bodies: "dict | Sequence[dict]", concurrency: int, requests_per_client: int, *,
                    processes: int = 1, **kwargs) -> LevelRun:
    """loadgen.run_level over `processes` client processes (in this process when 1)."""
    if processes <= 1:
        return await _in_process(loadgen.run_level(url, bodies, concurrency, requests_per_client, **kwargs))
    shares, first = [], 0
    for users in split_users(concurrency, processes):
        shares.append(("closed", (url, bodies, users, requests_per_client), {**kwargs, "first_index": first}))
        first += users * requests_per_client
    return await _run_split(shares)


async def run_open_loop(url: str, bodies: Sequence[dict], arrivals: Sequence[float], *, processes: int = 1,
                        **kwargs) -> LevelRun:
    """loadgen.run_open_loop over `processes` client processes (in this process when 1)."""
    if processes <= 1:
        return await _in_process(loadgen.run_open_loop(url, bodies, arrivals, **kwargs))
    return await _run_split([("open", (url, bodies, due), {**kwargs, "indices": indices})
                             for indices, due in split_arrivals(arrivals, processes)])


def default_processes(cpu_count: Optional[int]) -> int:
    """`--client-processes auto`: a process per 8 cores, 1 to 4.

    One process takes 35-75k chunks/s (BENCHMARKS.md, the load generator's ceiling); the
    GPU hosts (16-32 cores) get 2-4, several times #10's 30k tokens/s, and most cores stay
    with the server's proxy, replica and ranks. A 2-core box gets 1.
    """
    return max(1, min(4, (cpu_count or 1) // 8))
