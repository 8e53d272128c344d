"""Load: a flood far past max_ongoing + max_queued is answered, never hung: each request is
served (200) or refused at once (503 + Retry-After), and the service is fine afterwards."""

import asyncio
import collections
import time

import httpx
import pytest
from ray import serve

from tests.conftest import deploy

FLOOD = 200
LIMITS = dict(max_ongoing_requests=8, max_queued_requests=16, overload_retry_after_s=2)
# Serve's proxy answers the surplus of a burst larger than what it routes to the replica
# (its backstop queue); same status and Retry-After, but Serve's own text body.
SERVE_BACKSTOP_TEXT = "Request dropped due to backpressure"


def completion(max_tokens=8, stream=False):
    return {"prompt": "Hello world.", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}


@pytest.fixture(scope="module")
def flood_url(serve_app):
    url = deploy("flood", "/flood", model=serve_app.model_dir, tensor_parallel_size=2, device="cpu",
                 replica_cpus=0.5, cpus_per_rank=0.5, request_timeout_s=60, **LIMITS)
    yield url
    serve.delete("flood")


async def flood(url: str, n: int, stream_every: int = 4) -> list[httpx.Response]:
    """n requests at once (every stream_every-th streamed), each bounded by a timeout."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(90), limits=limits) as client:
        async def one(i):
            return await client.post("/v1/completions", json=completion(stream=i % stream_every == 0))
        return await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(n)]), timeout=240)


def test_flood_is_served_or_refused_with_retry_after(flood_url):
    started = time.monotonic()
    responses = asyncio.run(flood(flood_url, FLOOD))
    elapsed = time.monotonic() - started
    statuses = collections.Counter(r.status_code for r in responses)
    print(f"\n{FLOOD} requests in {elapsed:.1f}s: {dict(statuses)}")

    assert set(statuses) <= {200, 503}, statuses  # no 500, no 504, no dropped connection
    refused = [r for r in responses if r.status_code == 503]
    served = [r for r in responses if r.status_code == 200]
    assert refused and served, statuses
    assert len(served) >= LIMITS["max_ongoing_requests"] + LIMITS["max_queued_requests"], statuses

    ours = [r for r in refused if r.headers.get("content-type", "").startswith("application/json")]
    print(f"refused by the replica (OpenAI error shape): {len(ours)}; by Serve's proxy: {len(refused) - len(ours)}")
    for r in refused:
        assert r.headers.get("retry-after") == "2", (r.headers, r.text)
    for r in ours:
        error = r.json()["error"]
        assert error["type"] == "service_unavailable" and error["code"] == "overloaded", r.text
        assert "max_queued_requests=16" in error["message"], r.text
    for r in set(refused) - set(ours):
        assert r.text.startswith(SERVE_BACKSTOP_TEXT), r.text
    assert ours, "no refusal came from the replica's admission control"

    for r in served:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text
        else:
            assert r.json()["usage"]["completion_tokens"] == 8, r.text


def test_after_the_flood_the_service_is_healthy(flood_url):
    asyncio.run(flood(flood_url, FLOOD // 2))
    health = httpx.get(f"{flood_url}/health", timeout=30)
    assert health.status_code == 200, health.text
    assert all(rank["healthy"] for rank in health.json()["ranks"])
    deadline = time.monotonic() + 30  # refused requests hold nothing: the queue drains at once
    while (admission := httpx.get(f"{flood_url}/health", timeout=30).json()["admission"])["running"]:
        assert time.monotonic() < deadline, admission
        time.sleep(0.5)
    assert admission["waiting"] == 0 and admission["refused"] > 0, admission
    r = httpx.post(f"{flood_url}/v1/completions", json=completion(), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
