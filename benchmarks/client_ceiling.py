"""How many streamed chunks a second the load generator itself can take: its ceiling.

A stand-in server (benchmarks/sse_server.py, its own process) streams serve_tp-shaped
completion chunks as fast as it can, one chunk per token; the load generator runs closed-loop
users against it, exactly as bench_serving does, and this prints a table: chunks (events)
per second, and the client's CPU per event (user+sys of this process and its client
processes, over the level). A benchmark whose server streams more tokens a second than
the client's ceiling measures the client.

    python -m benchmarks.client_ceiling --users 128 --max-tokens 64 --clients httpx,aiohttp \\
        --processes 1,2 --port 8221

`httpx` is the client loadgen used before (httpx, one connection pool per user, the same
per-chunk timing); `aiohttp` is loadgen's client now. With several processes on a machine
with fewer free cores than client processes + the server, events/s stops growing while CPU
per event stays: read CPU per event for what a core can do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from benchmarks import client_procs, loadgen  # noqa: E402

CLIENTS = ("httpx", "aiohttp")


async def httpx_level(url: str, body: dict, users: int, requests_per_user: int) -> tuple[list, float]:
    """The load generator as it was: one httpx client (pool of one connection) per user."""
    limits, ssl_context = httpx.Limits(max_connections=1, max_keepalive_connections=1), httpx.create_ssl_context()
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=60, verify=ssl_context))
                   for _ in range(users)]
        start = time.perf_counter()

        async def user(client):
            return [await loadgen.stream_completion_httpx(client, url, body) for _ in range(requests_per_user)]

        per_user = await asyncio.gather(*(user(c) for c in clients))
        return [r for rs in per_user for r in rs], time.perf_counter() - start


async def measure(client: str, processes: int, url: str, body: dict, users: int, requests_per_user: int,
                  server: psutil.Process) -> dict:
    server_before = server.cpu_times()
    if client == "httpx":
        cpu = time.process_time()  # client setup included: cheap next to the level
        results, duration = await httpx_level(url, body, users, requests_per_user)
        cpu = time.process_time() - cpu
    else:
        results, duration, cpu = await client_procs.run_level(
            url, body, users, requests_per_user, processes=processes, request_timeout_s=60, level_timeout_s=1e9)
    server_after = server.cpu_times()
    ok = [r for r in results if r.ok]
    events = sum(r.text_chunks for r in ok)
    return {
        "client": client, "processes": processes if client == "aiohttp" else 1, "users": users,
        "tokens_per_request": body["max_tokens"], "requests": len(results), "errors": len(results) - len(ok),
        "events": events, "wall_s": duration, "events_per_s": events / duration,
        "client_cpu_s": cpu, "client_us_per_event": 1e6 * cpu / events if events else None,
        "client_cores": cpu / duration,
        "server_cores": ((server_after.user + server_after.system) - (server_before.user + server_before.system))
        / duration,
    }


def table(rows: list[dict]) -> str:
    head = ("| client | processes | users | tokens/req | requests | errors | events/s | client µs CPU/event "
            "| client cores busy | server cores busy |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['client']} | {r['processes']} | {r['users']} | {r['tokens_per_request']} | {r['requests']} "
             f"| {r['errors']} | {r['events_per_s']:,.0f} | {r['client_us_per_event']:.1f} | {r['client_cores']:.2f} "
             f"| {r['server_cores']:.2f} |" for r in rows]
    return "\n".join([head, *lines])


def _wait_for_port(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the SSE server did not listen on {port} within {timeout_s:.0f} s")


@contextlib.contextmanager
def sse_server_process(port: int, chunk_interval_s: float) -> Iterator[psutil.Process]:
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.sse_server", "--port", str(port),
                             "--chunk-interval-s", str(chunk_interval_s)], cwd=ROOT)
    try:
        _wait_for_port(port)
        yield psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", default="128", help="comma-separated closed-loop user counts")
    p.add_argument("--requests-per-user", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64, help="chunks (tokens) per request")
    p.add_argument("--clients", default="httpx,aiohttp", help=f"comma-separated, from {','.join(CLIENTS)}")
    p.add_argument("--processes", default="1", help="comma-separated client process counts (aiohttp)")
    p.add_argument("--chunk-interval-ms", type=float, default=0.0,
                   help="the server waits this long between a stream's chunks (0: as fast as it can). "
                        "Paced, the client reads about one chunk per socket read, as from a real server "
                        "whose engine step hands every stream one token; unpaced, a client that falls "
                        "behind finds several chunks per read and each costs it less")
    p.add_argument("--rounds", type=int, default=1, help="repeat every configuration, in turn")
    p.add_argument("--port", type=int, default=8221)
    args = p.parse_args(argv)
    url = f"http://127.0.0.1:{args.port}/v1/completions"
    body = loadgen.completion_body("gpt2", "hello", args.max_tokens)
    configs = [(c, k, u) for u in map(int, args.users.split(",")) for c in args.clients.split(",")
               for k in (map(int, args.processes.split(",")) if c == "aiohttp" else [1])]
    rows = []
    print(f"cpu_count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"server chunk interval {args.chunk_interval_ms:g} ms", flush=True)
    with sse_server_process(args.port, args.chunk_interval_ms / 1000) as server:
        asyncio.run(measure("aiohttp", 1, url, body, 4, 1, server))  # warm the server up
        for _ in range(args.rounds):
            for client, k, users in configs:
                row = asyncio.run(measure(client, k, url, body, users, args.requests_per_user, server))
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    print(f"\nload average after {os.getloadavg()[0]:.1f}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
