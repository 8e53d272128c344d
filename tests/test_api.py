"""The real app over HTTP (TP=2 on CPU, gloo), through the official openai client and raw HTTP."""

import asyncio
import json

import httpx
import openai
import pytest

from tests import reference

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(serve_app):
    return openai.OpenAI(base_url=f"{serve_app.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def unsharded(tiny_model_dir):
    """(text, finish_reason, tokens) of a greedy completion by one unsharded process."""
    return lambda prompt, max_tokens: reference.greedy_text(tiny_model_dir, prompt, max_tokens)


def test_greedy_completion_equals_unsharded_model(client, serve_app, unsharded):
    res = client.completions.create(model=serve_app.model_name, prompt=PROMPT, max_tokens=20, temperature=0)
    text, finish, n = unsharded(PROMPT, 20)
    assert res.object == "text_completion" and res.id.startswith("cmpl-")
    assert res.choices[0].text == text
    assert res.choices[0].finish_reason == finish
    assert res.usage.completion_tokens == n
    assert res.usage.prompt_tokens == len(reference.tokenizer(serve_app.model_dir).encode(PROMPT))


def test_streamed_chunks_join_to_the_unstreamed_text(client, serve_app):
    full = client.completions.create(model=serve_app.model_name, prompt=PROMPT, max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model=serve_app.model_name, prompt=PROMPT, max_tokens=24,
                                            temperature=0, stream=True))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_raw_sse_ends_with_done_and_reports_usage(serve_app):
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{serve_app.base_url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 5


def test_list_prompts_n_and_echo(client, serve_app, unsharded):
    prompts = ["Hello world.", "Tensor parallelism"]
    res = client.completions.create(model=serve_app.model_name, prompt=prompts, max_tokens=6,
                                    temperature=0, n=2, echo=True)
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    for choice in res.choices:
        prompt = prompts[choice.index // 2]
        assert choice.text == prompt + unsharded(prompt, 6)[0]


def test_seeded_sampling_is_reproducible_and_seed_changes_it(client, serve_app):
    def sample(seed):
        return client.completions.create(model=serve_app.model_name, prompt=PROMPT, max_tokens=16,
                                         temperature=1.0, top_p=0.95, seed=seed,
                                         extra_body={"top_k": 50, "ignore_eos": True}).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


def test_stop_string_cuts_the_text(client, serve_app):
    full = client.completions.create(model=serve_app.model_name, prompt=PROMPT, max_tokens=30,
                                     temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    stop = full[5:8]
    assert len(stop) == 3
    res = client.completions.create(model=serve_app.model_name, prompt=PROMPT, max_tokens=30,
                                    temperature=0, extra_body={"ignore_eos": True}, stop=[stop])
    assert res.choices[0].text == full[: full.index(stop)]
    assert res.choices[0].finish_reason == "stop"


def test_max_tokens_and_ignore_eos_give_exact_length(client, serve_app):
    res = client.completions.create(model=serve_app.model_name, prompt=PROMPT, max_tokens=9,
                                    temperature=0.9, extra_body={"ignore_eos": True})
    assert res.usage.completion_tokens == 9
    assert res.choices[0].finish_reason == "length"


def test_concurrent_requests_equal_sequential(serve_app):
    """Many clients at once: batched on the same TP group, the same greedy answers."""
    prompts = [f"{word} number {i}" for i, word in enumerate(["Hello", "The", "café", "Tensor"] * 6)]

    async def one(http, prompt, max_tokens):
        r = await http.post(f"{serve_app.base_url}/v1/completions",
                            json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    async def run():
        async with httpx.AsyncClient(timeout=120) as http:
            sequential = [await one(http, p, 8 + i % 5) for i, p in enumerate(prompts)]
            concurrent = await asyncio.gather(*[one(http, p, 8 + i % 5) for i, p in enumerate(prompts)])
        return sequential, concurrent

    sequential, concurrent = asyncio.run(run())
    assert concurrent == sequential


def test_models_lists_the_served_name(client, serve_app):
    models = client.models.list()
    assert [m.id for m in models.data] == [serve_app.model_name]


def test_infer_route_returns_prompt_and_continuation(serve_app, unsharded):
    r = httpx.get(f"{serve_app.base_url}/infer", params={"text": PROMPT}, timeout=60)
    assert r.status_code == 200
    assert r.json() == PROMPT + unsharded(PROMPT, 16)[0]


def test_health_reports_every_rank(serve_app):
    r = httpx.get(f"{serve_app.base_url}/health", timeout=30)
    assert r.status_code == 200
    assert [rank["rank"] for rank in r.json()["ranks"]] == [0, 1]
