"""Soak: steady closed-loop load against a running serve_tp for a bounded time, watching
for errors and for memory that grows.

`--concurrency` clients send completions one after another (every other one streamed) for
`--duration-s`. Every `--interval-s` a row is printed: requests finished, errors, p50/p99
latency, and the resident memory (RSS) of the replica process and of each rank. The rank
pids come from `/health` (ranks[].pid), the replica's by its process title
(`ray::ServeReplica:<app>:InferenceDeployment`), so the script must run on the service's
node. Verdict: PASS when no request failed, the pids never changed (no replica was
replaced) and no process grew more than `--max-rss-growth-mib` from the end of the first
interval (allocator warm-up) to the end; exit status 0 on PASS, 1 on FAIL.

    python -m serve_tp.model.tiny_model /tmp/soak-tiny
    python -m benchmarks.soak --start --model /tmp/soak-tiny --base-url http://127.0.0.1:8013
    python -m benchmarks.soak --base-url http://127.0.0.1:8000      # a service already up
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional
from urllib.parse import urlparse

import httpx
import psutil

from benchmarks.loadgen import completion_body, stream_completion_httpx
from benchmarks.stats import percentile

logger = logging.getLogger(__name__)
APP_NAME = "serve_tp"
MIB = 1 << 20


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the service (routes under /v1)")
    p.add_argument("--duration-s", type=float, default=180, help="how long to load it (at most 24 h)")
    p.add_argument("--interval-s", type=float, default=15, help="one row of the table per interval")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight, all the time")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per request (ignore_eos)")
    p.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog. " * 4)
    p.add_argument("--request-timeout-s", type=float, default=60)
    p.add_argument("--max-rss-growth-mib", type=float, default=64,
                   help="largest RSS growth of any process, first interval to last, for a PASS")
    p.add_argument("--app-name", default=APP_NAME, help="Serve app whose replica process is watched")
    p.add_argument("--api-key", default=os.environ.get("SERVE_TP_API_KEY"))
    p.add_argument("--json", default=None, help="also write the rows and verdict to this file")
    p.add_argument("--start", action="store_true",
                   help="start serve_tp here first (a fresh local Ray; Serve on --base-url's port)")
    p.add_argument("--model", default=None, help="with --start: model directory or Hub id")
    p.add_argument("--tensor-parallel-size", type=int, default=2, help="with --start")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="with --start")
    p.add_argument("--serve-tp-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="with --start: another build_app setting (repeatable)")
    args = p.parse_args(argv)
    if not 0 < args.duration_s <= 86400:
        p.error(f"--duration-s must be in (0, 86400], got {args.duration_s:g}")
    if not 0 < args.interval_s <= args.duration_s:
        p.error(f"--interval-s must be in (0, --duration-s], got {args.interval_s:g}")
    if args.concurrency < 1:
        p.error(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.start and not args.model:
        p.error("--start needs --model")
    return args


# ---- the service ----
def start_service(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    from serve_tp.api.app import build_app

    port = urlparse(args.base_url).port or 8000
    # address="local": a fresh instance even if another one (a test's, a `serve run`) is up.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.tensor_parallel_size + 1),
             include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {"model": args.model, "tensor_parallel_size": args.tensor_parallel_size, "device": args.device,
                **dict(kv.split("=", 1) for kv in args.serve_tp_arg)}
    logger.info("starting serve_tp %s", settings)
    serve.run(build_app(settings), name=args.app_name, route_prefix=urlparse(args.base_url).path or "/")


def stop_service() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def wait_healthy(client: httpx.Client, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = client.get("/health")
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{client.base_url} not healthy after {timeout:.0f}s")
        time.sleep(1)


# ---- the processes ----
def replica_pid(app_name: str, rank_pid: Optional[int]) -> Optional[int]:
    """The replica actor's process, by the title Ray gives it. Of several (another cluster
    on this node serving an app of the same name), the one whose raylet also runs rank 0."""
    title = f"ray::ServeReplica:{app_name}:"
    found = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        if " ".join(proc.info["cmdline"] or []).startswith(title):
            found.append(proc.info)
    if len(found) > 1 and rank_pid:
        try:
            raylet = psutil.Process(rank_pid).ppid()
        except psutil.Error:
            raylet = None
        found = [p for p in found if p["ppid"] == raylet]
    if len(found) != 1:
        logger.warning("%d processes titled %s* in this cluster: not watching the replica", len(found), title)
        return None
    return found[0]["pid"]


def watched_pids(health: dict, app_name: str) -> dict[str, Optional[int]]:
    ranks = {f"rank{r['rank']}": r.get("pid") for r in sorted(health.get("ranks", []), key=lambda r: r["rank"])}
    return {"replica": replica_pid(app_name, ranks.get("rank0")), **ranks}


def rss_mib(pid: Optional[int]) -> Optional[float]:
    try:
        return psutil.Process(pid).memory_info().rss / MIB if pid else None
    except psutil.Error:
        return None


# ---- the load ----
@dataclass
class Done:
    at: float  # monotonic time it finished
    ok: bool
    latency: float
    error: Optional[str] = None


@dataclass
class Soak:
    rows: list[dict] = field(default_factory=list)
    done: list[Done] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def plain_completion(client: httpx.AsyncClient, body: dict, max_tokens: int) -> Done:
    start = time.perf_counter()
    try:
        r = await client.post("/v1/completions", json={**body, "stream": False})
        latency = time.perf_counter() - start
        if r.status_code != 200:
            return Done(time.monotonic(), False, latency, f"HTTP {r.status_code}: {r.text[:300]}")
        tokens = r.json()["usage"]["completion_tokens"]
        if tokens != max_tokens:
            return Done(time.monotonic(), False, latency, f"{tokens} tokens, asked {max_tokens}")
        return Done(time.monotonic(), True, latency)
    except Exception as exc:  # timeouts, refused connections: all count as errors
        return Done(time.monotonic(), False, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"[:300])


async def client_loop(client: httpx.AsyncClient, body: dict, args, deadline: float, soak: Soak, turn: int):
    while time.monotonic() < deadline:
        turn += 1
        if turn % 2:
            res = await stream_completion_httpx(client, "/v1/completions", body)
            done = Done(time.monotonic(), res.ok and res.output_tokens == args.max_tokens,
                        res.latency or 0.0, res.error)
            if res.ok and res.output_tokens != args.max_tokens:
                done.error = f"stream: {res.output_tokens} tokens, asked {args.max_tokens}"
        else:
            done = await plain_completion(client, body, args.max_tokens)
        soak.done.append(done)
        if done.error and len(soak.errors) < 10:
            soak.errors.append(done.error)


def interval_row(soak: Soak, since: float, until: float, started: float, pids: dict, health_ok: bool) -> dict:
    window = [d for d in soak.done if since <= d.at < until]
    latencies = [d.latency for d in window if d.ok]
    row = {"t_s": round(until - started), "requests": len(window), "errors": sum(not d.ok for d in window),
           "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "health": health_ok}
    for name, pid in pids.items():
        row[f"{name}_rss_mib"] = rss_mib(pid)
    for key in ("p50_ms", "p99_ms"):
        row[key] = None if row[key] is None else round(row[key] * 1000, 1)
    return row


def print_row(row: dict, names: list[str], header: bool) -> None:
    cols = ["t_s", "requests", "errors", "p50_ms", "p99_ms", "health"] + [f"{n}_rss_mib" for n in names]
    widths = [max(len(c), 8) for c in cols]
    if header:
        print(" | ".join(f"{c:>{w}}" for c, w in zip(cols, widths)), flush=True)
    cells = []
    for c, w in zip(cols, widths):
        v = row.get(c)
        if isinstance(v, bool):
            v = "200" if v else "not 200"
        cells.append(f"{'-' if v is None else (f'{v:.1f}' if isinstance(v, float) else v):>{w}}")
    print(" | ".join(cells), flush=True)


async def soak_run(args: argparse.Namespace, pids: dict[str, Optional[int]], headers: dict) -> Soak:
    soak = Soak()
    body = completion_body(None, args.prompt, args.max_tokens)
    body.pop("model")
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    timeout = httpx.Timeout(args.request_timeout_s, connect=10)
    async with httpx.AsyncClient(base_url=args.base_url, limits=limits, timeout=timeout, headers=headers) as client:
        started = time.monotonic()
        deadline = started + args.duration_s
        loops = [asyncio.create_task(client_loop(client, body, args, deadline, soak, i))
                 for i in range(args.concurrency)]
        since, names = started, list(pids)
        while since < deadline:
            until = min(since + args.interval_s, deadline)
            await asyncio.sleep(max(0.0, until - time.monotonic()))
            try:
                health = await client.get("/health")
                health_ok = health.status_code == 200
                now_pids = watched_pids(health.json(), args.app_name) if health_ok else pids
            except httpx.HTTPError:
                health_ok, now_pids = False, pids
            row = interval_row(soak, since, until, started, pids, health_ok)
            row["pids_changed"] = now_pids != pids
            soak.rows.append(row)
            print_row(row, names, header=len(soak.rows) == 1)
            since = until
        # Requests still in flight at the deadline finish (within their timeout) and count.
        await asyncio.gather(*loops)
        if soak.done and soak.done[-1].at >= since:
            tail = interval_row(soak, since, time.monotonic() + 1, started, pids, True)
            soak.rows[-1]["requests"] += tail["requests"]
            soak.rows[-1]["errors"] += tail["errors"]
    return soak


def verdict(soak: Soak, args: argparse.Namespace, names: list[str]) -> tuple[bool, list[str]]:
    lines = []
    total = sum(r["requests"] for r in soak.rows)
    errors = sum(r["errors"] for r in soak.rows)
    lines.append(f"requests {total}, errors {errors}" + (f" (first: {soak.errors[0]})" if soak.errors else ""))
    ok = errors == 0 and total > 0
    if any(r["pids_changed"] for r in soak.rows):
        ok = False
        lines.append("a watched pid changed: the replica or a rank was replaced during the soak")
    if not all(r["health"] for r in soak.rows):
        ok = False
        lines.append("/health was not 200 at every interval")
    for name in names:
        series = [r[f"{name}_rss_mib"] for r in soak.rows if r.get(f"{name}_rss_mib") is not None]
        if len(series) < 2:
            lines.append(f"{name}: RSS not watched (process not found on this node)")
            continue
        growth = series[-1] - series[0]
        within = growth <= args.max_rss_growth_mib
        ok &= within
        lines.append(f"{name}: RSS {series[0]:.1f} -> {series[-1]:.1f} MiB ({growth:+.1f} MiB, peak "
                     f"{max(series):.1f}; bound {args.max_rss_growth_mib:g}) {'ok' if within else 'GREW'}")
    return ok, lines


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    args = parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.start:
        start_service(args)
    try:
        with httpx.Client(base_url=args.base_url, timeout=30, headers=headers) as client:
            health = wait_healthy(client)
        pids = watched_pids(health, args.app_name)
        info = {"command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.soak", *sys.argv[1:]]),
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
                "cpus": os.cpu_count(), "pids": pids}
        print(f"soak: {args.base_url}, {args.concurrency} in flight, {args.max_tokens} tokens each, "
              f"{args.duration_s:g}s in {args.interval_s:g}s intervals; watching {pids}", flush=True)
        soak = asyncio.run(soak_run(args, pids, headers))
    finally:
        if args.start:
            stop_service()
    ok, lines = verdict(soak, args, list(pids))
    for line in lines:
        print(line)
    print(f"VERDICT: {'PASS' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "rows": soak.rows, "verdict": "PASS" if ok else "FAIL", "notes": lines,
                       "errors": soak.errors}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
