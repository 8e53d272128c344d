"""The streamed chunks and the packed rank messages: byte-identical to what they replace."""

import json
import random

import pytest

from serve_tp.api.sse import DONE, CompletionChunks, event
from serve_tp.messages import (
    SamplingParams, SequenceOutput, SequenceRequest, TokenLogprob, pack, unpack,
)

TEXTS = ["", " hello", 'quote " backslash \\ slash /', "tab\tnew\nline\r\x00\x1f\x7f", "é中文🙂",
         "\ud800 lone surrogate", "\u2028\u2029", "</script>"]


def _reference(request_id, created, model, index, text, finish, logprobs):
    """The chunk as serving.py wrote it before: json.dumps of the whole body."""
    body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish", [None, "stop", "length"])
def test_chunk_is_json_dumps_of_the_body(text, finish):
    chunks = CompletionChunks("cmpl-0123abcd", 1764300000, "gpt2-\"odd\"/é")
    for index in (0, 7):
        got = chunks.text(index, text, finish)
        assert got == _reference("cmpl-0123abcd", 1764300000, "gpt2-\"odd\"/é", index, text, finish, None)
        assert json.loads(got[len("data: "):])["choices"][0]["text"] == text or "\ud800" in text


def test_chunk_with_logprobs_matches_and_random_texts_match():
    logprobs = {"tokens": [" a", "bytes:\\xe2"], "token_logprobs": [-0.5, -9999.0],
                "top_logprobs": [{" a": -0.5, " b": -1.25}, None], "text_offset": [0, 2]}
    chunks = CompletionChunks("cmpl-x", 1, "m")
    assert chunks.text(3, " a", "stop", logprobs) == _reference("cmpl-x", 1, "m", 3, " a", "stop", logprobs)
    rng = random.Random(0)
    for _ in range(500):  # any code point, any length: the control for the hand-picked ones
        text = "".join(chr(rng.randrange(0, 0x11000)) for _ in range(rng.randrange(0, 12)))
        assert chunks.text(0, text, None) == _reference("cmpl-x", 1, "m", 0, text, None, None)


def test_event_and_done():
    body = {"error": {"message": "x", "type": "invalid_request_error", "param": None, "code": None}}
    assert event(body) == f"data: {json.dumps(body)}\n\n"
    assert DONE == "data: [DONE]\n\n"


@pytest.mark.parametrize("output", [
    SequenceOutput(),
    SequenceOutput(token_ids=[5]),
    SequenceOutput(token_ids=[5, 6], finish_reason="length"),
    SequenceOutput(token_ids=[7], logprobs=[TokenLogprob(7, -0.25, ((7, -0.25), (8, -2.0)))]),
    SequenceOutput(prompt_logprobs=[None, TokenLogprob(1, -3.0)], finish_reason="length"),
    SequenceOutput(finish_reason="error", error="boom", group_failed=True),
    SequenceOutput(finish_reason="error", error="alone"),
])
def test_packed_outputs_come_back_equal(output):
    polled = {"cmpl-a-0": output, "cmpl-b-1": SequenceOutput(token_ids=[1])}
    back = unpack(pack(polled))
    assert back == polled and all(type(v) is SequenceOutput for v in back.values())


def test_packed_request_comes_back_equal():
    request = SequenceRequest("cmpl-z-0", (1, 2, 3), SamplingParams(
        max_tokens=3, temperature=0.5, seed=2**64 - 1, logit_bias=((3, -100.0),), stop_token_ids=(2,),
        logprobs=2, prompt_logprobs=1))
    assert unpack(pack(request)) == request
