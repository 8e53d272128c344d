"""The tutorial baseline's Hugging Face module over serve_tp's shards decodes as the unsharded model.

Ranks are threads joined by tests/test_uneven_split.py's in-memory all-reduce, in float64,
on 5 heads (uneven on 2 and 3 ranks): the baseline's own row-parallel layer and the head
resizing are what is checked, not rounding.
"""

import threading

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.tutorial_app import hf_module_from_shard
from serve_tp.model.shard import shard_gpt2
from tests.test_uneven_split import ThreadGroup

PROMPT = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_generate_on_the_shards_matches_the_unsharded_model(world_size):
    config = GPT2Config(n_layer=2, n_head=5, n_embd=20, n_positions=32, vocab_size=64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).double().eval()
    with torch.inference_mode():
        expected = model.generate(PROMPT, max_new_tokens=10, do_sample=False, pad_token_id=0)
        expected_logits = model(expected).logits
    group, out = ThreadGroup(world_size), {}

    def rank_main(rank):
        hf = hf_module_from_shard(shard_gpt2(model, world_size, rank).double(), group.all_reduce_for(rank))
        with torch.inference_mode():
            tokens = hf.generate(PROMPT, max_new_tokens=10, do_sample=False, pad_token_id=0)
            out[rank] = (tokens, hf(tokens).logits)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(out) == list(range(world_size))
    for tokens, logits in out.values():
        assert torch.equal(tokens, expected)
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-9)
