"""max_model_len sizes each rank's KV cache: the API enforces it, and a sequence may fill it."""

import httpx
import pytest
from ray import serve

from tests.conftest import deploy

LIMIT = 40


@pytest.fixture(scope="module")
def short_url(serve_app):
    url = deploy("short", "/short", model=serve_app.model_dir, tensor_parallel_size=2, device="cpu",
                 max_model_len=LIMIT, max_batch_size=4, replica_cpus=0.5, cpus_per_rank=0.5)
    yield url
    serve.delete("short")


def complete(url, **body):
    return httpx.post(f"{url}/v1/completions", timeout=60, json={"temperature": 0, "ignore_eos": True, **body})


def test_models_reports_the_limit(short_url):
    assert httpx.get(f"{short_url}/v1/models", timeout=30).json()["data"][0]["max_model_len"] == LIMIT


def test_a_request_past_the_limit_is_400_naming_it(short_url):
    r = complete(short_url, prompt="Hello", max_tokens=LIMIT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert str(LIMIT) in r.json()["error"]["message"]


def test_sequences_that_fill_the_cache_exactly_finish_and_agree(short_url, serve_app):
    """Up to the last cache position, with the same tokens as the full-size app."""
    prompt = "Hello world."
    n_prompt = complete(short_url, prompt=prompt, max_tokens=1).json()["usage"]["prompt_tokens"]
    fill = LIMIT - n_prompt
    short = [complete(short_url, prompt=prompt, max_tokens=fill) for _ in range(3)]
    full = complete(serve_app.base_url, prompt=prompt, max_tokens=fill).json()
    for r in short:
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == fill
        assert body["choices"][0]["text"] == full["choices"][0]["text"]


def test_scoring_a_prompt_that_fills_the_cache_is_400_and_the_group_serves_on(short_url):
    """echo + max_tokens=0 still needs the slot after the prompt (the engine computes the next
    token's logits there): a prompt of LIMIT tokens is refused, not sent to crash every rank."""
    full = complete(short_url, prompt=[5] * LIMIT, max_tokens=0, echo=True, logprobs=1)
    assert full.status_code == 400 and full.json()["error"]["code"] == "context_length_exceeded", full.text
    scored = complete(short_url, prompt=[5] * (LIMIT - 1), max_tokens=0, echo=True, logprobs=1)
    assert scored.status_code == 200, scored.text
    assert len(scored.json()["choices"][0]["logprobs"]["tokens"]) == LIMIT - 1
    assert complete(short_url, prompt="Hello", max_tokens=2).status_code == 200
