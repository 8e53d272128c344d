"""The sampling surface end to end: the real app (TP=2 on CPU) against Hugging Face's
unsharded GPT2LMHeadModel on the same tiny weights, fp32.

Logprobs are checked against HF's log_softmax; penalties, logit_bias, min_tokens and
stop_token_ids against a greedy reference that applies vLLM's semantics to HF's logits.
"""

from __future__ import annotations

import asyncio
import copy

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel

from serve_tp.api.detokenize import TokenPieces

PROMPT = "The quick brown fox"
TOLERANCE = 1e-4  # TP=2 fp32 sums in another order than HF's unsharded fp32


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_file(f"{tiny_model_dir}/tokenizer.json")


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return GPT2LMHeadModel.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def client(serve_app):
    return openai.OpenAI(base_url=f"{serve_app.base_url}/v1", api_key="unused", max_retries=0)


def post(serve_app, body: dict) -> dict:
    r = httpx.post(f"{serve_app.base_url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row t is the log-distribution of the token after ids[:t + 1]."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def reference_greedy(model, prompt_ids, max_tokens, eos=0, presence=0.0, frequency=0.0, repetition=1.0,
                     bias=None, min_tokens=0, stop_ids=()):
    """Greedy decoding over HF's logits with vLLM's adjustments, and the smallest margin
    between the best and second-best adjusted logit (a near tie would make the test flaky)."""
    out, margin = [], float("inf")
    for _ in range(max_tokens):
        with torch.inference_mode():
            logits = model(torch.tensor([prompt_ids + out])).logits[0, -1].double()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[prompt_ids + out] = True
        logits = torch.where(seen & (logits > 0), logits / repetition, torch.where(seen, logits * repetition, logits))
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).double()
        logits = logits - frequency * counts - presence * (counts > 0).double()
        for token_id, value in (bias or {}).items():
            logits[token_id] += value
        if len(out) < min_tokens:
            logits[[eos, *stop_ids]] = float("-inf")
        top2 = torch.topk(logits, 2).values
        margin = min(margin, float(top2[0] - top2[1]))
        out.append(int(torch.argmax(logits)))
        if out[-1] == eos or out[-1] in stop_ids:
            break
    return out, margin


def names(tokenizer, ids):
    pieces = TokenPieces(tokenizer)
    return [pieces.text_of(i) for i in ids]


# ---------------------------------------------------------------- logprobs


def test_logprobs_equal_hf_log_softmax(serve_app, tokenizer, hf):
    prompt_ids = tokenizer.encode(PROMPT).ids
    res = post(serve_app, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 5, "ignore_eos": True})
    lp = res["choices"][0]["logprobs"]
    generated, _ = reference_greedy(hf, prompt_ids, 8, eos=-1)
    assert lp["tokens"] == names(tokenizer, generated)
    ref = hf_logprobs(hf, prompt_ids + generated)
    ref64 = hf_logprobs(copy.deepcopy(hf).double(), prompt_ids + generated)
    pieces = TokenPieces(tokenizer)
    for i, token_id in enumerate(generated):
        row = ref[len(prompt_ids) - 1 + i]
        assert abs(lp["token_logprobs"][i] - float(row[token_id])) < TOLERANCE
        values, ids = torch.topk(row, 5)
        expected = {pieces.text_of(int(t)): float(v) for v, t in zip(values, ids)}
        expected.setdefault(pieces.text_of(token_id), float(row[token_id]))
        assert set(lp["top_logprobs"][i]) == set(expected)
        assert all(abs(lp["top_logprobs"][i][k] - v) < TOLERANCE for k, v in expected.items())
    # Controls: rounding alone (HF fp32 vs fp64) is far inside the tolerance, while reading
    # the neighbouring position, an off-by-one, is far outside it.
    rounding = (ref - ref64).abs().max().item()
    assert rounding < TOLERANCE / 10
    shifted = [abs(lp["token_logprobs"][i] - float(ref[len(prompt_ids) + i][t])) for i, t in enumerate(generated[:-1])]
    assert max(shifted) > 100 * TOLERANCE


def test_echo_scores_token_id_prompts_as_hf(serve_app, tokenizer, hf):
    """lm-eval's loglikelihood request: token-id prompts, one token, echo, logprobs=1."""
    prompts = [tokenizer.encode("Hello world. The quick").ids, [0] + tokenizer.encode("café naïve").ids]
    res = post(serve_app, {"prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True,
                           "temperature": 0, "seed": 1234})
    assert [c["index"] for c in res["choices"]] == [0, 1]
    for choice, ids in zip(res["choices"], prompts):
        lp = choice["logprobs"]
        generated, _ = reference_greedy(hf, ids, 1, eos=-1)
        assert choice["text"].startswith(tokenizer.decode(ids, skip_special_tokens=False))
        assert lp["tokens"] == names(tokenizer, ids + generated)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = hf_logprobs(hf, ids + generated)
        for t in range(1, len(ids) + 1):
            token_id = (ids + generated)[t]
            assert abs(lp["token_logprobs"][t] - float(ref[t - 1][token_id])) < TOLERANCE
            assert abs(max(lp["top_logprobs"][t].values()) - float(ref[t - 1].max())) < TOLERANCE
            assert len(lp["top_logprobs"][t]) <= 2
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_max_tokens_zero_with_echo_returns_only_the_prompt(serve_app, tokenizer, hf):
    ids = tokenizer.encode(PROMPT).ids
    res = post(serve_app, {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0})
    choice = res["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert res["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    ref = hf_logprobs(hf, ids)
    assert choice["logprobs"]["tokens"] == names(tokenizer, ids)
    for t in range(1, len(ids)):
        assert abs(choice["logprobs"]["token_logprobs"][t] - float(ref[t - 1][ids[t]])) < TOLERANCE
    plain = post(serve_app, {"prompt": PROMPT, "max_tokens": 0, "echo": True})["choices"][0]
    assert plain["text"] == PROMPT and plain["logprobs"] is None


@pytest.mark.parametrize("extra", [{}, {"stop": [" "]}, {"echo": True}])
def test_streamed_logprobs_join_to_the_unstreamed_ones(serve_app, extra):
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "logprobs": 2, **extra}
    full = post(serve_app, body)["choices"][0]
    text, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with httpx.stream("POST", f"{serve_app.base_url}/v1/completions", json={**body, "stream": True},
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = httpx.Response(200, content=line[6:]).json()["choices"][0]
                text += choice["text"]
                for key in lp:
                    lp[key] += (choice["logprobs"] or {}).get(key, [])
    assert text == full["text"]
    assert lp == full["logprobs"]
    assert all(offset <= len(text) for offset in lp["text_offset"])


# ---------------------------------------------------------------- what changes the tokens


@pytest.mark.parametrize("penalty", [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                                     {"repetition_penalty": 3.0}, {"presence_penalty": -2.0}])
def test_penalties_change_greedy_text_as_the_reference_predicts(serve_app, tokenizer, hf, penalty):
    prompt = "Hello world."
    prompt_ids = tokenizer.encode(prompt).ids
    plain, _ = reference_greedy(hf, prompt_ids, 24, eos=-1)
    assert len(set(plain)) < len(plain), "plain greedy repeats tokens here, so penalties have work to do"
    expected, margin = reference_greedy(
        hf, prompt_ids, 24, eos=-1, presence=penalty.get("presence_penalty", 0.0),
        frequency=penalty.get("frequency_penalty", 0.0), repetition=penalty.get("repetition_penalty", 1.0))
    assert margin > 1e-3 and expected != plain
    res = post(serve_app, {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, **penalty})
    assert res["choices"][0]["text"] == tokenizer.decode(expected)


def test_logit_bias_forces_and_bans_tokens(serve_app, tokenizer, hf):
    prompt_ids = tokenizer.encode(PROMPT).ids
    plain, _ = reference_greedy(hf, prompt_ids, 6, eos=-1)
    forced = next(t for t in range(1, 600) if t not in plain and tokenizer.decode([t]).isalpha())
    res = post(serve_app, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                           "logit_bias": {str(forced): 100}})
    assert res["choices"][0]["text"] == tokenizer.decode([forced] * 4)
    banned = {str(plain[0]): -100}
    expected, margin = reference_greedy(hf, prompt_ids, 6, eos=-1, bias={plain[0]: -100})
    assert margin > 1e-3 and expected[0] != plain[0]
    res = post(serve_app, {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                           "logit_bias": banned})
    assert res["choices"][0]["text"] == tokenizer.decode(expected)


def test_min_tokens_delays_eos(serve_app, tokenizer, hf):
    """A +100 bias makes EOS the greedy choice at once; min_tokens holds it off until then.
    (The trained test model seldom picks EOS by itself, so the bias makes the case certain.)"""
    prompt_ids = tokenizer.encode(PROMPT).ids
    eos = tokenizer.token_to_id("<|endoftext|>")
    forced = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logit_bias": {str(eos): 100}}
    res = post(serve_app, forced)
    assert res["choices"][0]["finish_reason"] == "stop" and res["usage"]["completion_tokens"] == 1
    expected, margin = reference_greedy(hf, prompt_ids, 12, eos=eos, bias={eos: 100}, min_tokens=5)
    assert margin > 1e-3 and len(expected) == 6 and expected[-1] == eos
    res = post(serve_app, {**forced, "min_tokens": 5})
    assert res["choices"][0]["finish_reason"] == "stop"
    assert res["usage"]["completion_tokens"] == len(expected)
    assert res["choices"][0]["text"] == tokenizer.decode(expected[:-1])


def test_min_tokens_delays_stop_token_ids(serve_app, tokenizer, hf):
    prompt_ids = tokenizer.encode(PROMPT).ids
    plain, _ = reference_greedy(hf, prompt_ids, 12, eos=-1)
    k = next(i for i in range(1, len(plain)) if plain[i] not in plain[:i])
    stop = plain[k]
    expected, margin = reference_greedy(hf, prompt_ids, 12, eos=-1, min_tokens=k + 3, stop_ids=(stop,))
    assert margin > 1e-3 and len(expected) > k + 1
    res = post(serve_app, {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                           "stop_token_ids": [stop], "min_tokens": k + 3})
    assert res["usage"]["completion_tokens"] == len(expected)
    shown = expected[:-1] if expected[-1] == stop else expected
    assert res["choices"][0]["text"] == tokenizer.decode(shown)


def test_stop_token_ids_stop_and_leave_their_text_out(serve_app, tokenizer, hf):
    prompt_ids = tokenizer.encode(PROMPT).ids
    plain, _ = reference_greedy(hf, prompt_ids, 10, eos=-1)
    k = next(i for i in range(2, len(plain)) if plain[i] not in plain[:i])
    res = post(serve_app, {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                           "stop_token_ids": [plain[k]], "logprobs": 0})
    choice = res["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert res["usage"]["completion_tokens"] == k + 1
    assert choice["text"] == tokenizer.decode(plain[:k])  # as vLLM: the stop token's text is not output
    assert choice["logprobs"]["tokens"] == names(tokenizer, plain[:k + 1])


def test_seeded_sampling_is_the_same_alone_twice_and_among_others(serve_app):
    seeded = {"prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "seed": 4321, "ignore_eos": True}
    others = [{"prompt": f"Hello number {i}", "max_tokens": 12 + i, "temperature": 1.0, "ignore_eos": True,
               **({"seed": i} if i % 2 else {})} for i in range(6)]

    async def run():
        async with httpx.AsyncClient(timeout=120) as http:
            async def one(body):
                r = await http.post(f"{serve_app.base_url}/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]

            alone = [await one(seeded), await one(seeded)]
            crowd = await asyncio.gather(*[one(b) for b in others[:3]], one(seeded), *[one(b) for b in others[3:]])
        return alone, crowd[3]

    (first, second), among = asyncio.run(run())
    assert first["text"] == second["text"] == among["text"]
    different = post(serve_app, {**seeded, "seed": 4322})["choices"][0]["text"]
    assert different != first["text"]


def test_openai_client_reads_logprobs(client, serve_app):
    res = client.completions.create(model=serve_app.model_name, prompt=PROMPT, max_tokens=3, temperature=0,
                                    logprobs=2, echo=True)
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
