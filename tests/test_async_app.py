"""The real app over HTTP with async_scheduling=true answers as the session's app (async off):
same text, finish reasons and usage, greedy and seeded sampled, with n=2, a stop string and
streaming; and its ranks did run ahead (their health says how many steps overlapped)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import deploy

REQUESTS = [
    dict(prompt="The quick brown fox", max_tokens=20, temperature=0, extra_body={"ignore_eos": True}),
    dict(prompt=["Once upon a time", "Hello world."], max_tokens=16, temperature=0.9, top_p=0.9, seed=42, n=2,
         extra_body={"ignore_eos": True}),
    dict(prompt="Tensor parallelism splits", max_tokens=12, temperature=0.7, seed=7, frequency_penalty=0.5),
]


@pytest.fixture(scope="module")
def async_url(serve_app):
    from ray import serve

    url = deploy("async_sched", "/async_sched", model=serve_app.model_dir, tensor_parallel_size=2, device="cpu",
                 max_batch_size=16, request_timeout_s=60, async_scheduling=True, replica_cpus=0.5, cpus_per_rank=0.5)
    yield url
    serve.delete("async_sched")


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def answer(base_url: str, model: str, request: dict) -> tuple:
    res = client(base_url).completions.create(model=model, **request)
    choices = sorted(res.choices, key=lambda c: c.index)
    return [(c.text, c.finish_reason) for c in choices], res.usage.model_dump()


def streamed(base_url: str, model: str, request: dict) -> tuple:
    texts, finish = {}, {}
    for chunk in client(base_url).completions.create(model=model, stream=True, **request):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return [(texts[i], finish[i]) for i in sorted(texts)]


def test_async_app_answers_as_the_synchronous_one(serve_app, async_url):
    model = serve_app.model_name
    for request in REQUESTS:
        assert answer(async_url, model, request) == answer(serve_app.base_url, model, request), request
    greedy = REQUESTS[0]
    (text, _), = answer(serve_app.base_url, model, greedy)[0]
    stop = {**greedy, "stop": [text[6:10]]}  # a stop string inside the greedy text
    stopped = answer(async_url, model, stop)
    assert stopped == answer(serve_app.base_url, model, stop) and stopped[0][0][1] == "stop"
    assert stopped[0][0][0] == text[: text.index(text[6:10])]
    assert streamed(async_url, model, REQUESTS[1]) == answer(async_url, model, REQUESTS[1])[0]

    health = httpx.get(f"{async_url}/health", timeout=30).json()["ranks"]
    assert [rank["async_scheduling"] for rank in health] == [True, True]
    assert health[0]["overlapped_steps"] > 0  # rank 0 read tokens after launching the next step
    control = httpx.get(f"{serve_app.base_url}/health", timeout=30).json()["ranks"]
    assert control[0]["async_scheduling"] is False and control[0]["overlapped_steps"] == 0
