"""Response shaping over scripted engine outputs (no Ray): text, logprobs, offsets, echo,
stop strings, streaming chunks and per-sequence failures.

The TP group is replaced by `ScriptedGroup`, which replays SequenceOutputs as rank 0 would
send them, so every case here is exact and decided by the HTTP side's code alone.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from serve_tp.api.detokenize import TokenPieces
from serve_tp.api.errors import APIError
from serve_tp.api.logprobs import CharOffsets
from serve_tp.api.protocol import CompletionRequest, CompletionResponse
from serve_tp.api.serving import CompletionService
from serve_tp.config import ServeTPConfig
from serve_tp.messages import SequenceOutput, SequenceRequest, TokenLogprob


class ScriptedGroup:
    """Stands in for the TP group: `script(request)` gives the outputs rank 0 would send."""

    def __init__(self, script):
        self.script = script
        self.requests: list[SequenceRequest] = []

    async def generate(self, request: SequenceRequest):
        self.requests.append(request)
        for output in self.script(request):
            await asyncio.sleep(0)
            yield output


def scored(token_id: int, top_n: int = 2) -> TokenLogprob:
    """A deterministic fake distribution: the chosen token and top_n others, best first."""
    top = tuple((token_id + k + 1, -0.5 * (k + 1)) for k in range(top_n))
    return TokenLogprob(token_id, -0.25 - token_id / 1000, top)


def outputs_for(generated: list[int], split: int = 1, finish: str = "length", prompt_scored=True):
    """A script that sends `generated` `split` tokens at a time, then finishes."""

    def script(request: SequenceRequest):
        params = request.params
        with_lp = params.logprobs is not None
        outs = []
        for i in range(0, max(len(generated), 1), split):
            ids = generated[i:i + split]
            outs.append(SequenceOutput(list(ids), [scored(t, params.logprobs) for t in ids] if with_lp else None))
        if params.prompt_logprobs is not None and prompt_scored:
            outs[0].prompt_logprobs = [None] + [scored(t, params.prompt_logprobs) for t in request.prompt_ids[1:]]
        outs[-1].finish_reason = finish
        return outs

    return script


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_file(str(Path(tiny_model_dir) / "tokenizer.json"))


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return ServeTPConfig(model=tiny_model_dir, device="cpu", tensor_parallel_size=2)


def service_for(config, tokenizer, script) -> CompletionService:
    return CompletionService(config, tokenizer, 256, ScriptedGroup(script))


def complete(service: CompletionService, body: dict) -> dict:
    req = CompletionRequest.model_validate(body)
    result = asyncio.run(service.complete(req, service.plan(req)))
    CompletionResponse.model_validate(result)  # the documented response model holds it
    json.dumps(result, allow_nan=False)  # and it is strict JSON
    return result


def stream(service: CompletionService, body: dict) -> list[dict]:
    req = CompletionRequest.model_validate({**body, "stream": True})

    async def collect():
        return [event async for event in service.stream(req, service.plan(req))]

    events = asyncio.run(collect())
    assert events[-1] == "data: [DONE]\n\n"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def joined(chunks: list[dict], index: int = 0) -> tuple[str, dict]:
    """One choice's text and logprobs, joined over the stream's chunks."""
    text, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["index"] == index:
                text += choice["text"]
                for key in lp:
                    lp[key] += (choice["logprobs"] or {}).get(key, [])
    return text, lp


def test_logprobs_name_score_and_place_every_token(config, tokenizer):
    generated = tokenizer.encode(" quick brown fox").ids
    service = service_for(config, tokenizer, outputs_for(generated, split=2))
    choice = complete(service, {"prompt": "The", "max_tokens": len(generated), "logprobs": 2})["choices"][0]
    assert choice["text"] == " quick brown fox"
    lp = choice["logprobs"]
    pieces = TokenPieces(tokenizer)
    assert lp["tokens"] == [pieces.text_of(t) for t in generated]
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["token_logprobs"] == [scored(t).logprob for t in generated]
    for token_id, top in zip(generated, lp["top_logprobs"]):
        expected = {pieces.text_of(a): v for a, v in scored(token_id).top}
        expected[pieces.text_of(token_id)] = scored(token_id).logprob
        assert top == expected  # the top 2 and the chosen one
    starts = [0]
    for token in lp["tokens"][:-1]:
        starts.append(starts[-1] + len(token))
    assert lp["text_offset"] == starts
    assert service.group.requests[0].params.logprobs == 2


def test_no_logprobs_asked_gives_null(config, tokenizer):
    service = service_for(config, tokenizer, outputs_for(tokenizer.encode(" fox").ids))
    choice = complete(service, {"prompt": "The", "max_tokens": 1})["choices"][0]
    assert choice["logprobs"] is None
    assert service.group.requests[0].params.logprobs is None


def test_minus_infinity_and_nan_become_the_floor(config, tokenizer):
    token = tokenizer.encode(" fox").ids[0]

    def script(request):
        lp = TokenLogprob(token, float("-inf"), ((token + 1, float("nan")), (token + 2, -3.0)))
        return [SequenceOutput([token], [lp], finish_reason="length")]

    lp = complete(service_for(config, tokenizer, script), {"prompt": "a", "max_tokens": 1, "logprobs": 2})
    lp = lp["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [-9999.0]
    assert sorted(lp["top_logprobs"][0].values()) == [-9999.0, -9999.0, -3.0]


def test_echo_with_logprobs_on_token_id_prompts(config, tokenizer):
    prompts = [tokenizer.encode("Hello world.").ids, [0] + tokenizer.encode("The quick").ids]
    generated = tokenizer.encode(" fox").ids
    service = service_for(config, tokenizer, outputs_for(generated))
    res = complete(service, {"prompt": prompts, "max_tokens": len(generated), "logprobs": 1, "echo": True, "n": 2})
    assert [c["index"] for c in res["choices"]] == [0, 1, 2, 3]
    for choice in res["choices"]:
        ids = prompts[choice["index"] // 2]
        prompt_text = tokenizer.decode(ids, skip_special_tokens=False)  # "<|endoftext|>" spelled out
        assert choice["text"] == prompt_text + " fox"
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + len(generated)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:len(ids)] == [scored(t).logprob for t in ids[1:]]
        assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])
        assert lp["text_offset"][0] == 0 and lp["text_offset"][len(ids)] == len(prompt_text)
        for token, offset in zip(lp["tokens"], lp["text_offset"]):
            assert choice["text"][offset:offset + len(token)] == token
    sent = {tuple(r.prompt_ids) for r in service.group.requests}
    assert sent == {tuple(p) for p in prompts}
    assert all(r.params.prompt_logprobs == 1 for r in service.group.requests)
    assert res["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)


def test_max_tokens_zero_with_echo_returns_the_scored_prompt(config, tokenizer):
    ids = tokenizer.encode("Hello world.").ids

    def prefill_only(request):
        assert request.params.max_tokens == 0
        return [SequenceOutput([], [], [None] + [scored(t, 0) for t in ids[1:]], finish_reason="length")]

    res = complete(service_for(config, tokenizer, prefill_only),
                   {"prompt": "Hello world.", "max_tokens": 0, "echo": True, "logprobs": 0})
    choice = res["choices"][0]
    assert choice["text"] == "Hello world." and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == [TokenPieces(tokenizer).text_of(t) for t in ids]
    assert choice["logprobs"]["token_logprobs"][1:] == [scored(t).logprob for t in ids[1:]]
    assert res["usage"]["completion_tokens"] == 0


def test_prompt_logprobs_may_come_alone_before_the_tokens(config, tokenizer):
    ids = tokenizer.encode("Hello world.").ids
    generated = tokenizer.encode(" fox").ids

    def script(request):
        return [SequenceOutput([], None, [None] + [scored(t, 1) for t in ids[1:]]),
                SequenceOutput(generated, [scored(t, 1) for t in generated]),
                SequenceOutput([], None, finish_reason="length")]

    service = service_for(config, tokenizer, script)
    body = {"prompt": "Hello world.", "max_tokens": len(generated), "echo": True, "logprobs": 1}
    choice = complete(service, body)["choices"][0]
    assert choice["text"] == "Hello world. fox"
    assert len(choice["logprobs"]["tokens"]) == len(ids) + len(generated)
    text, lp = joined(stream(service, body))
    assert (text, lp) == (choice["text"], choice["logprobs"])


def test_partial_characters_are_named_by_their_bytes_and_held_together(config, tokenizer):
    generated = tokenizer.encode("日本語 ok").ids
    service = service_for(config, tokenizer, outputs_for(generated))
    chunks = stream(service, {"prompt": "a", "max_tokens": len(generated), "logprobs": 0})
    text, lp = joined(chunks)
    assert text == "日本語 ok" and all("\ufffd" not in c["choices"][0]["text"] for c in chunks)
    # A token holding part of a character is named by its bytes; in order, the bytes of the
    # tokens before " ok" spell the three characters, and each offset is the character its
    # first byte falls in.
    names = lp["tokens"]
    cjk = [n for n in names if n.startswith("bytes:")]
    assert cjk, "the tokenizer splits these characters' bytes across tokens"
    spelled = b"".join(bytes.fromhex(n[len("bytes:"):].replace("\\x", "")) if n.startswith("bytes:")
                       else n.encode() for n in names[:len(names) - len(tokenizer.encode(" ok").ids)])
    assert spelled == "日本語".encode()
    assert lp["text_offset"] == sorted(lp["text_offset"]) and max(lp["text_offset"]) < len(text)


def token_starts(tokenizer, ids):
    """Character offset at which each token's text begins in the decoded whole (ASCII text)."""
    return [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]


def test_stop_string_drops_the_logprobs_of_cut_tokens(config, tokenizer):
    generated = tokenizer.encode(" quick brown fox jumps").ids
    service = service_for(config, tokenizer, outputs_for(generated))
    body = {"prompt": "The", "max_tokens": len(generated), "logprobs": 1, "stop": ["own f"]}
    choice = complete(service, body)["choices"][0]
    assert choice["text"] == " quick br" and choice["finish_reason"] == "stop"
    # Kept: every token whose text begins before the cut (one straddling it too); gone: the rest.
    starts = token_starts(tokenizer, generated)
    kept = [i for i, start in enumerate(starts) if start < len(" quick br")]
    assert choice["logprobs"]["tokens"] == [tokenizer.decode([generated[i]]) for i in kept]
    assert choice["logprobs"]["text_offset"] == [starts[i] for i in kept]
    text, lp = joined(stream(service, body))
    assert (text, lp) == (choice["text"], choice["logprobs"])


def test_stop_strings_wait_for_min_tokens(config, tokenizer):
    generated = tokenizer.encode(" quick brown fox quick brown").ids  # " qu", "ick", " b", "ro", "wn", ...
    service = service_for(config, tokenizer, outputs_for(generated))
    body = {"prompt": "The", "max_tokens": len(generated), "stop": ["quick"]}
    assert complete(service, body)["choices"][0]["text"] == " "
    choice = complete(service, {**body, "min_tokens": 2})["choices"][0]
    assert choice["text"] == " quick brown fox " and choice["finish_reason"] == "stop"


def test_stop_token_id_ends_without_its_text_but_with_its_logprob(config, tokenizer):
    generated = tokenizer.encode(" quick brown").ids
    n = len(tokenizer.encode(" quick").ids)  # generated[n] begins " brown"
    stop_id = generated[n]
    service = service_for(config, tokenizer, outputs_for(generated[:n + 1], finish="stop"))
    body = {"prompt": "The", "max_tokens": 8, "logprobs": 0, "stop_token_ids": [stop_id]}
    choice = complete(service, body)["choices"][0]
    assert choice["text"] == " quick" and choice["finish_reason"] == "stop"
    assert choice["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in generated[:n + 1]]
    assert choice["logprobs"]["text_offset"] == token_starts(tokenizer, generated[:n + 1])
    assert service.group.requests[0].params.stop_token_ids == (stop_id,)
    # The same token ending by length (min_tokens, or a token that is no stop id) keeps its text.
    service = service_for(config, tokenizer, outputs_for(generated[:n + 1], finish="length"))
    assert complete(service, body)["choices"][0]["text"] == tokenizer.decode(generated[:n + 1])


def test_sequence_failure_is_500_for_that_request_not_503(config, tokenizer):
    def fails(request):
        return [SequenceOutput([5]), SequenceOutput([], finish_reason="error", error="sampling failed")]

    service = service_for(config, tokenizer, fails)
    with pytest.raises(APIError) as caught:
        complete(service, {"prompt": "a", "max_tokens": 4})
    assert caught.value.status == 500 and caught.value.code == "generation_failed"
    assert "sampling failed" in caught.value.message
    chunks = stream(service, {"prompt": "a", "max_tokens": 4})
    assert chunks[-1]["error"]["code"] == "generation_failed"


def test_missing_engine_logprobs_is_a_clear_500(config, tokenizer):
    service = service_for(config, tokenizer, lambda r: [SequenceOutput([5], None, finish_reason="length")])
    with pytest.raises(APIError) as caught:
        complete(service, {"prompt": "a", "max_tokens": 1, "logprobs": 1})
    assert caught.value.status == 500 and "logprobs" in caught.value.message


# ---------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_streamed_logprobs_join_to_the_unstreamed_ones(config, tokenizer, data):
    """Any tokens, any split into outputs, any stop string: the chunks' texts and logprobs
    join to the unstreamed choice; offsets place each token's text in it; a stop string
    keeps exactly the tokens with text before the cut."""
    vocab = tokenizer.get_vocab_size()
    generated = data.draw(st.lists(st.integers(1, vocab - 1), min_size=1, max_size=24))
    split = data.draw(st.integers(1, 4))
    full = tokenizer.decode(generated)
    stop = data.draw(st.none() | st.just(full[2:4]) | st.text(min_size=1, max_size=3))
    echo = data.draw(st.booleans())
    body = {"prompt": "Hi", "max_tokens": len(generated), "logprobs": 1, "echo": echo, "stop": stop}
    service = service_for(config, tokenizer, outputs_for(generated, split=split))
    choice = complete(service, body)["choices"][0]
    text, lp = joined(stream(service, body))
    assert (text, lp) == (choice["text"], choice["logprobs"])
    prompt_len = len(tokenizer.encode("Hi").ids) if echo else 0
    base = 2 if echo else 0
    assert len(lp["tokens"]) >= prompt_len
    generated_offsets = lp["text_offset"][prompt_len:]
    offsets, pieces = CharOffsets(), TokenPieces(tokenizer)
    starts = [offsets.add(pieces.bytes_of(t))[0] for t in generated]
    event(f"finish {choice['finish_reason']}")
    if choice["finish_reason"] == "stop":
        cut = len(text) - base
        assert generated_offsets == [base + s for s in starts if s < cut]
    else:
        assert generated_offsets == [base + s for s in starts]
    assert all(base <= offset <= len(text) for offset in generated_offsets)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_token_bytes_rebuild_the_tokenizers_decode(tokenizer, data):
    """What TokenPieces says each token adds is what the tokenizer's own decode makes of it."""
    vocab = tokenizer.get_vocab_size()
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=30))
    pieces = TokenPieces(tokenizer)
    for skip in (True, False):
        rebuilt = b"".join(pieces.bytes_of(t, skip_special=skip) for t in ids).decode("utf-8", errors="replace")
        assert rebuilt == tokenizer.decode(ids, skip_special_tokens=skip)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(max_size=40))
def test_offsets_point_at_each_tokens_text(tokenizer, text):
    ids = tokenizer.encode(text).ids
    pieces, offsets = TokenPieces(tokenizer), CharOffsets()
    for token_id in ids:
        start, end = offsets.add(pieces.bytes_of(token_id, skip_special=False))
        name = pieces.text_of(token_id)
        if not name.startswith("bytes:"):
            assert text[start:end] == name
        else:  # part of a character: it touches the character its bytes are in
            assert 0 <= start < end <= len(text)
    assert offsets.chars == len(text)
