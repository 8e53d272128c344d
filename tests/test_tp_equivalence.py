"""TP=N on real CPU ranks gives the unsharded model's greedy tokens and logits, with the
row-parallel sums in DeepSpeed's shared memory (the app's default on one node) or over gloo."""

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from tests.tp_ranks import run_tp

PROMPTS = ["Hello world.", "The quick brown fox jumps over the lazy", "Tensor", "café naïve 🙂"]
STEPS = 16


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """One unsharded process, one prompt at a time, no padding, no KV cache: argmax of a
    full forward pass per step (EOS included, as the TP path does here)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    tokens, logits = [], []
    with torch.inference_mode():
        for ids in prompts:
            seq = list(ids)
            for _ in range(STEPS):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            tokens.append(seq[len(ids):])
            logits.append(model(torch.tensor([ids])).logits[0, -1])
    return prompts, tokens, torch.stack(logits)


@pytest.mark.parametrize("world_size,all_reduce", [(2, "shm"), (3, "shm"), (2, "gloo")])
def test_tp_matches_unsharded_greedy_tokens_and_logits(tiny_model_dir, reference, world_size, all_reduce):
    prompts, ref_tokens, ref_logits = reference
    results = run_tp(tiny_model_dir, world_size, prompts, STEPS, cpu_all_reduce=all_reduce)
    tokens, logits, kind = results[0]
    assert kind == all_reduce
    assert tokens == ref_tokens
    torch.testing.assert_close(torch.from_numpy(logits), ref_logits, rtol=1e-4, atol=1e-4)
    for rank in range(1, world_size):  # every rank decoded the same sequence
        assert results[rank][0] == tokens


def test_tp_refuses_head_count_that_does_not_divide(tiny_model_dir):
    with pytest.raises(RuntimeError, match=r"attention heads \(6\) is not evenly divisible by tensor_parallel_size \(4\)"):
        run_tp(tiny_model_dir, 4, [[1, 2, 3]], 2)
