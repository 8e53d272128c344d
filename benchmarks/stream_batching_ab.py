"""Stream batching A/B in ONE Ray cluster: the same app twice, pacing off (/a) and on (/b),
levels alternating a-b-a / b-a-b, so both see the same machine load.

Separate clusters per variant (ingress_compare.sh) showed the paced app slower even at
1 user, where it does not pace; on a shared 2-core machine that was the order of runs,
not the code. This script measures only the pacing, on Serve's default proxy.

    python -m benchmarks.stream_batching_ab --model /tmp/bench-tiny-1k --users 1,16,32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time

import httpx


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--interval-ms", type=float, default=50, help="app b's stream_batching_interval_ms")
    p.add_argument("--users", default="1,16,32")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--port", type=int, default=8000)
    return p.parse_args(argv)


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float, int]:
    """(time to the first chunk with text, latency, chunks with text) of one streamed request."""
    start, ttft, chunks = time.perf_counter(), None, 0
    async with client.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                chunks += 1
                ttft = ttft if ttft is not None else time.perf_counter() - start
    return ttft, time.perf_counter() - start, chunks


async def level(client, url, body, users: int, per_user: int):
    async def user():
        return [await one(client, url, body) for _ in range(per_user)]

    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*[user() for _ in range(users)]) for r in rs]
    return results, time.perf_counter() - start


async def measure(a: argparse.Namespace, base: str) -> list[dict]:
    body = {"model": "ab", "prompt": "The quick brown fox jumps over the lazy dog. " * 3,
            "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    rows = []
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=512)) as client:
        for name in "ab":
            await one(client, f"{base}/{name}/v1/completions", body)  # warm-up
        for users in [int(u) for u in a.users.split(",")]:
            runs = {"a": [], "b": []}
            for rnd in range(a.rounds):
                for name in ("ab" if rnd % 2 == 0 else "ba"):
                    runs[name].append(await level(client, f"{base}/{name}/v1/completions", body, users,
                                                  8 if users == 1 else 3))
            for name in "ab":
                res = [r for rs, _ in runs[name] for r in rs]
                row = {"users": users, "app": name, "interval_ms": a.interval_ms if name == "b" else 0,
                       "ttft_p50_ms": round(1000 * statistics.median(r[0] for r in res), 1),
                       "latency_p50_ms": round(1000 * statistics.median(r[1] for r in res), 1),
                       "chunks_per_request": round(statistics.mean(r[2] for r in res), 1),
                       "out_tok_s": round(len(res) * a.max_tokens / sum(d for _, d in runs[name]))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> None:
    import ray
    from ray import serve

    from serve_tp.api.app import build_app

    a = parse_args(argv)
    ray.init(address="local", num_cpus=4 * (a.tensor_parallel_size + 1), include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": a.port})
        for name, ms in (("a", 0), ("b", a.interval_ms)):
            serve.run(build_app({"model": a.model, "served_model_name": "ab", "device": a.device,
                                 "tensor_parallel_size": a.tensor_parallel_size,
                                 "stream_batching_interval_ms": ms}), name=name, route_prefix=f"/{name}")
        asyncio.run(measure(a, f"http://127.0.0.1:{a.port}"))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
