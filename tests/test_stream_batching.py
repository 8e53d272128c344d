"""Stream batching over real HTTP: chunks that carry several tokens join to the same text and
logprobs as the unstreamed answer and as the unbatched stream (serve_tp/outbox.py).

A second app paces every stream (stream_batching_min_streams=1, so one request is enough
to batch it); the session's app, at the defaults, sends a lone stream's tokens as they come
and is the control.
"""

import json

import httpx
import openai
import pytest

from tests.conftest import deploy

PROMPT = "The quick brown fox"
INTERVAL_MS = 60


@pytest.fixture(scope="module")
def batched(serve_app, tiny_model_dir):
    return deploy("batched", "/batched", model=tiny_model_dir, tensor_parallel_size=2, device="cpu",
                  max_batch_size=16, request_timeout_s=60,
                  stream_batching_interval_ms=INTERVAL_MS, stream_batching_min_streams=1)


def stream_choices(base_url: str, body: dict) -> tuple[dict, int]:
    """Each choice's joined text, logprobs and finish reason from a raw SSE stream; text chunks."""
    joined, chunks = {}, 0
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            for choice in event["choices"]:
                got = joined.setdefault(choice["index"], {"text": "", "finish_reason": None, "logprobs": None})
                got["text"] += choice["text"]
                chunks += bool(choice["text"])
                if choice["logprobs"] is not None:
                    lp = got["logprobs"] = got["logprobs"] or {k: [] for k in choice["logprobs"]}
                    for key, values in choice["logprobs"].items():
                        lp[key] += values
                if choice["finish_reason"]:
                    got["finish_reason"] = choice["finish_reason"]
    return joined, chunks


def unstreamed(base_url: str, body: dict) -> dict:
    res = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)
    assert res.status_code == 200, res.text
    return {c["index"]: {"text": c["text"], "finish_reason": c["finish_reason"], "logprobs": c["logprobs"]}
            for c in res.json()["choices"]}


TOLERANCE = 1e-4  # the same fp32 model over a batch of another shape (n=2 rows joining a step apart)


def assert_same_answer(got: dict, want: dict) -> None:
    """Text, tokens, offsets and finish exactly; logprob values to rounding (TOLERANCE)."""
    assert got.keys() == want.keys()
    for index, choice in want.items():
        other = got[index]
        assert (other["text"], other["finish_reason"]) == (choice["text"], choice["finish_reason"])
        if choice["logprobs"] is None:
            assert other["logprobs"] is None
            continue
        lp, olp = choice["logprobs"], other["logprobs"]
        assert (olp["tokens"], olp["text_offset"]) == (lp["tokens"], lp["text_offset"])
        for a, b in zip(olp["token_logprobs"], lp["token_logprobs"]):
            assert (a is None and b is None) or abs(a - b) < TOLERANCE
        for a, b in zip(olp["top_logprobs"], lp["top_logprobs"]):
            assert (a is None and b is None) or (a.keys() == b.keys() and all(abs(a[k] - b[k]) < TOLERANCE for k in a))


BODIES = {
    "greedy": {"max_tokens": 32, "temperature": 0, "ignore_eos": True},
    "logprobs": {"max_tokens": 24, "temperature": 0, "logprobs": 2},
    "echo_logprobs": {"max_tokens": 16, "temperature": 0, "logprobs": 1, "echo": True},
    "n2_seeded": {"max_tokens": 24, "temperature": 1.0, "top_p": 0.9, "seed": 7, "n": 2, "logprobs": 1},
    "stop": {"max_tokens": 32, "temperature": 0},  # stop: cut from the plain answer's middle (below)
    "two_prompts": {"prompt": ["Hello world.", PROMPT], "max_tokens": 12, "temperature": 0},
}


@pytest.mark.parametrize("name", list(BODIES))
def test_batched_stream_joins_to_the_unstreamed_answer_and_the_unbatched_stream(serve_app, batched, name):
    body = {"model": serve_app.model_name, "prompt": PROMPT, **BODIES[name]}
    if name == "stop":  # text that the answer holds past its first chunks, so it stops mid-stream
        plain = unstreamed(batched, body)[0]["text"]
        body["stop"] = [plain[len(plain) // 2: len(plain) // 2 + 3]]
    full = unstreamed(batched, body)
    streamed, _ = stream_choices(batched, body)
    control, _ = stream_choices(serve_app.base_url, body)
    assert_same_answer(streamed, full)
    assert_same_answer(control, full)  # the same answer without batching: batching changed only the chunking
    if name == "stop":
        assert any(c["finish_reason"] == "stop" for c in full.values())


def test_batching_sends_fewer_chunks_than_tokens(serve_app, batched):
    body = {"model": serve_app.model_name, "prompt": PROMPT, **BODIES["greedy"]}
    _, batched_chunks = stream_choices(batched, body)
    _, control_chunks = stream_choices(serve_app.base_url, body)
    # 32 tokens at one per engine step (~10 ms on CPU) within 60 ms windows: a few tokens a chunk.
    assert batched_chunks < 32 / 2, batched_chunks
    assert control_chunks > batched_chunks, (control_chunks, batched_chunks)


def test_openai_client_reads_multi_token_chunks(serve_app, batched):
    client = openai.OpenAI(base_url=f"{batched}/v1", api_key="unused", max_retries=0)
    kwargs = {"model": serve_app.model_name, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
