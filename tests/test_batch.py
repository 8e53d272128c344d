"""The static-cache batch: slot bookkeeping, bucket maths, and the forward against HF's."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import GPT2LMHeadModel

from serve_tp.engine.batch import SequenceBatch, compact, prefill_chunks
from serve_tp.engine.decode_runner import attention_span, batch_buckets, bucket_for, span_buckets
from serve_tp.model.forward import GPT2Forward


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()


def hf_next_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1]


@given(st.lists(st.integers(0, 30), unique=True, max_size=12), st.data())
def test_compact_keeps_survivors_in_slots_0_to_n(rows, data):
    seq_ids = [str(r) for r in rows]
    leaving = data.draw(st.lists(st.sampled_from(seq_ids + ["absent"]), unique=True) if seq_ids else st.just([]))
    after, moves = compact(seq_ids, leaving)
    assert sorted(after) == sorted(set(seq_ids) - set(leaving))
    replay = list(seq_ids)  # applying the moves to the old rows gives the new order
    for source, target in moves:
        assert target < source
        replay[target] = replay[source]
    assert replay[: len(after)] == after


def test_prefill_chunks_cover_the_prompts_in_order_within_budget():
    prompts = [[1] * n for n in (10, 10, 5000, 3, 3, 9000, 1)]
    chunks = prefill_chunks(prompts, budget=8192)
    assert [i for start, end in chunks for i in range(start, end)] == list(range(len(prompts)))
    for start, end in chunks:
        widest = max(len(p) for p in prompts[start:end])
        assert end - start == 1 or widest * (end - start) <= 8192


def test_buckets_and_spans():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert span_buckets(1024) == [64, 128, 256, 512, 1024] and span_buckets(200) == [64, 128, 200]
    assert [bucket_for(n, batch_buckets(48)) for n in (1, 3, 33, 48)] == [1, 4, 48, 48]
    assert [attention_span(n, 1024) for n in (1, 64, 65, 1000)] == [64, 64, 128, 1024]
    assert attention_span(150, 200) == 200
    assert all(attention_span(n, 1000) in span_buckets(1000) for n in range(1, 1001))


def test_decode_matches_hf_after_slots_move(model):
    """Three sequences, the middle one leaves (the last moves into its slot), decoding goes on."""
    batch = SequenceBatch(GPT2Forward(model, 0, 1, None), slots=4, max_len=model.config.n_positions)
    prompts = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [3, 4], "c": [20, 21, 22, 23]}
    first, _ = batch.admit(list(prompts), list(prompts.values()))
    seqs = {sid: list(p) for sid, p in prompts.items()}
    for sid, row in zip(prompts, first):
        torch.testing.assert_close(row, hf_next_logits(model, seqs[sid]), rtol=1e-4, atol=1e-4)
        seqs[sid].append(int(row.argmax()))
    for step in range(6):
        if step == 2:
            batch.evict(["b"])
            assert batch.seq_ids == ["a", "c"]
        logits = batch.decode([seqs[sid][-1] for sid in batch.seq_ids])
        for sid, row in zip(batch.seq_ids, logits):
            torch.testing.assert_close(row, hf_next_logits(model, seqs[sid]), rtol=1e-4, atol=1e-4)
            seqs[sid].append(int(row.argmax()))


def test_padding_rows_of_a_bucket_do_not_touch_the_real_rows(model):
    """What a replayed graph does: rows past n decode a dummy token into free slots."""
    forward = GPT2Forward(model, 0, 1, None)
    batch = SequenceBatch(forward, slots=8, max_len=model.config.n_positions)
    batch.admit(["a", "b"], [[1, 2, 3], [4, 5, 6, 7, 8]])
    with torch.inference_mode():
        padded = forward.decode(batch.cache, torch.tensor([9, 9, 0, 0, 0]), torch.tensor([3, 5, 0, 0, 0]), 64)
        exact = forward.decode(batch.cache, torch.tensor([9, 9]), torch.tensor([3, 5]), 64)
    torch.testing.assert_close(padded[:2], exact)
    torch.testing.assert_close(exact[0], hf_next_logits(model, [1, 2, 3, 9]), rtol=1e-4, atol=1e-4)


def test_admit_refuses_what_the_cache_cannot_hold(model):
    batch = SequenceBatch(GPT2Forward(model, 0, 1, None), slots=2, max_len=16)
    with pytest.raises(ValueError, match="do not fit"):
        batch.admit(["a", "b", "c"], [[1], [2], [3]])
    with pytest.raises(ValueError, match="16"):
        batch.admit(["a"], [[1] * 16])
