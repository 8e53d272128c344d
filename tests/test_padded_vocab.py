"""A checkpoint whose embedding has more rows than its tokenizer (nanoGPT exports 50304 for
GPT-2's 50257) serves: rank 0 never samples an id the tokenizer cannot decode.

The padded rows are made adversarial (each a scaled copy of the row the model would pick
next), so without the guard the greedy answer would be a padded id: the control below
shows it, so this test can fail.
"""

import shutil
from pathlib import Path

import httpx
import pytest
import torch
from ray import serve

from tests import reference
from tests.conftest import deploy

PROMPT = "The engine"
PADDED = 64  # rows past the tokenizer's


@pytest.fixture(scope="module")
def padded_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    from transformers import GPT2LMHeadModel

    out = tmp_path_factory.mktemp("models") / "tiny-gpt2-padded"
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    real = model.config.vocab_size
    ids = reference.tokenizer(tiny_model_dir).encode(PROMPT)
    with torch.no_grad():
        favourite = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        model.resize_token_embeddings(real + PADDED)
        wte = model.transformer.wte.weight  # tied with lm_head
        wte[real:] = 4.0 * wte[favourite]
    model.save_pretrained(out, safe_serialization=True)
    for name in Path(tiny_model_dir).iterdir():
        if name.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            shutil.copy(name, out / name.name)
    return str(out)


def masked_greedy(model_dir: str, prompt_ids: list[int], n: int, limit: int) -> tuple[list[int], list[int]]:
    """(greedy over ids below `limit`, plain greedy): the reference and the control."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.float64).eval()
    runs = []
    for cut in (limit, None):
        seq = list(prompt_ids)
        for _ in range(n):
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0, -1]
            if cut is not None:
                logits[cut:] = float("-inf")
            seq.append(int(logits.argmax()))
        runs.append(seq[len(prompt_ids):])
    return runs[0], runs[1]


@pytest.fixture(scope="module")
def padded_url(serve_app, padded_model_dir):
    url = deploy("padded", "/padded", model=padded_model_dir, tensor_parallel_size=2, device="cpu",
                 max_batch_size=4, replica_cpus=0.5, cpus_per_rank=0.5)
    yield url
    serve.delete("padded")


def test_padded_ids_are_never_sampled(padded_url, padded_model_dir):
    tok = reference.tokenizer(padded_model_dir)
    limit = len(tok)
    ids = tok.encode(PROMPT)
    expected, unguarded = masked_greedy(padded_model_dir, ids, 8, limit)
    assert any(t >= limit for t in unguarded), "control: unguarded greedy would emit a padded id"
    assert all(t < limit for t in expected)
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    r = httpx.post(f"{padded_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == tok.decode(expected)
    assert r.json()["usage"]["completion_tokens"] == 8
    # sampled requests too: many draws, none past the tokenizer (a padded id has no text)
    sampled = {"prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "ignore_eos": True, "n": 4, "logprobs": 0}
    r = httpx.post(f"{padded_url}/v1/completions", json=sampled, timeout=60)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert len(choice["logprobs"]["tokens"]) == 16
        assert all(name is not None for name in choice["logprobs"]["tokens"])
