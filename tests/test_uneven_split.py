"""Our sharded forward on every GPT-2 size's head layout, TP 1..8, against Hugging Face.

The ranks run as threads of this process, joined by an in-memory all-reduce, in float64:
no rounding to argue about, so the shards, recombined by the forward, must give the
unsharded model's logits to 1e-9. Each model keeps its size's head count (25 for gpt2-xl)
with two-wide heads, so all 32 layouts run in seconds; gloo ranks run the real group in
test_tp_equivalence.py.
"""

import threading

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from serve_tp.engine.batch import SequenceBatch
from serve_tp.model.forward import GPT2Forward
from serve_tp.model.shard import shard_gpt2

HEADS = {"gpt2": 12, "gpt2-medium": 16, "gpt2-large": 20, "gpt2-xl": 25}
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7], [1, 8, 2, 8, 1, 8, 2, 8, 4]]


class ThreadGroup:
    """An all-reduce among `world_size` threads: every rank sums the parts in rank order."""

    def __init__(self, world_size: int):
        self.parts = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=60)

    def all_reduce_for(self, rank: int):
        def all_reduce(tensor: torch.Tensor) -> None:
            self.parts[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.parts[1:], self.parts[0].clone())
            self.barrier.wait()  # nobody overwrites a part before every rank has summed
            tensor.copy_(total)
        return all_reduce


def run_threads(model, world_size: int, steps: int = 4):
    """Each rank's (heads, prefill logits, decode logits per step, greedy tokens)."""
    group, out, errors = ThreadGroup(world_size), {}, []

    def rank_main(rank):
        try:
            shard = shard_gpt2(model, world_size, rank).double()
            batch = SequenceBatch(GPT2Forward(shard, group.all_reduce_for(rank)), len(PROMPTS),
                                  model.config.n_positions)
            logits = [batch.admit([str(i) for i in range(len(PROMPTS))], PROMPTS)[0]]
            for _ in range(steps):
                logits.append(batch.decode(logits[-1].argmax(-1).tolist()))
            out[rank] = (batch.cache.kv.shape[3], torch.stack(logits))
        except Exception as exc:  # noqa: BLE001 - reported in the main thread
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


@pytest.fixture(scope="module", params=list(HEADS))
def model(request):
    heads = HEADS[request.param]
    config = GPT2Config(n_layer=2, n_head=heads, n_embd=2 * heads, n_positions=32, vocab_size=64)
    torch.manual_seed(heads)
    return GPT2LMHeadModel(config).double().eval()


def hf_greedy_logits(model, steps: int = 4) -> torch.Tensor:
    """[steps + 1, prompts, V]: HF's logits along its own greedy continuation of each prompt."""
    rows = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            seq = list(prompt)
            for _ in range(steps):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            rows.append(model(torch.tensor([seq])).logits[0, len(prompt) - 1:])
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("world_size", range(1, 9))
def test_every_gpt2_head_layout_on_tp_1_to_8_matches_hf(model, world_size):
    out = run_threads(model, world_size)
    heads = [out[r][0] for r in range(world_size)]
    assert sum(heads) == model.config.n_head and max(heads) - min(heads) <= 1  # each cache: its own heads
    expected = hf_greedy_logits(model)
    for rank in range(world_size):  # every rank holds the same, exact logits
        torch.testing.assert_close(out[rank][1], expected, rtol=0, atol=1e-9)
