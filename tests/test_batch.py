"""The static-cache batch: slot bookkeeping, bucket maths, and the forward against HF's."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from serve_tp.engine.batch import SequenceBatch, compact, prefill_chunks
from serve_tp.engine.decode_runner import attention_span, batch_buckets, bucket_for, span_buckets
from serve_tp.model.forward import GPT2Forward
from serve_tp.model.shard import shard_gpt2
from tests import reference
from tests.test_tp_equivalence import whole_context_script
from tests.tp_ranks import Arrival, Script, play


@pytest.fixture(scope="module")
def forward(tiny_model_dir):
    """Our forward over the whole (world size 1) shard of the float32 model."""
    return GPT2Forward(shard_gpt2(reference.hf_model(tiny_model_dir, "float32", "sdpa")))


@pytest.fixture(scope="module")
def bound(tiny_model_dir):
    """BOUND_FACTOR x HF float32's own error against float64, on full-context held-out text."""
    sequences = [list(a.prompt) for a in whole_context_script(tiny_model_dir).arrivals]
    return reference.BOUND_FACTOR * reference.rounding_control(tiny_model_dir, sequences)["fp32_vs_fp64"]


def assert_close_to_exact(model_dir, ids, logits, bound):
    error = float((logits.double() - reference.logits_along(model_dir, ids)[-1]).abs().max())
    assert error <= bound, f"logits after {len(ids)} tokens off by {error:.3g} > {bound:.3g}"


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


def test_decode_matches_hf_after_slots_move(tiny_model_dir, forward, bound):
    """Three sequences, the middle one leaves (the last moves into its slot), decoding goes on."""
    batch = SequenceBatch(forward, slots=4, max_len=forward.wpe.shape[0])
    prompts = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [3, 4], "c": [20, 21, 22, 23]}
    first, _ = batch.admit(list(prompts), list(prompts.values()))
    seqs = {sid: list(p) for sid, p in prompts.items()}
    for sid, row in zip(prompts, first):
        assert_close_to_exact(tiny_model_dir, seqs[sid], row, bound)
        seqs[sid].append(int(row.argmax()))
    for step in range(6):
        if step == 2:
            batch.evict(["b"])
            assert batch.seq_ids == ["a", "c"]
        logits = batch.decode([seqs[sid][-1] for sid in batch.seq_ids])
        for sid, row in zip(batch.seq_ids, logits):
            assert_close_to_exact(tiny_model_dir, seqs[sid], row, bound)
            seqs[sid].append(int(row.argmax()))


def test_logits_after_slot_moves_match_hf_over_long_contexts(tiny_model_dir, forward, bound):
    """Long and short rows leave in turn, so long caches move between slots mid-decode and
    new rows join into the freed slots; every step's logits, up to the last position of
    the context, within the bound of float64's."""
    context = forward.wpe.shape[0]
    held = [a.prompt for a in whole_context_script(tiny_model_dir).arrivals]
    script = Script([
        Arrival("short", held[1], 40), Arrival("long", held[0][:200], 56),
        Arrival("mid", held[3], 9), Arrival("tiny", held[2][:2], 5),
        Arrival("late-long", held[5], context - len(held[5]), step=7),  # into a freed slot
        Arrival("late-short", held[4], 30, step=12),
    ], slots=4)
    batch = SequenceBatch(forward, slots=4, max_len=context)
    moved, move = [], batch.cache.move
    batch.cache.move = lambda source, target, length: (moved.append(length), move(source, target, length))
    results, log = play(batch, script, keep_logits=True)
    assert max(moved) > 128 and max(log.spans) == context  # a long cache moved; the whole context used
    for arrival in script.arrivals:
        seq = results[arrival.seq_id]
        reference.check_greedy_run(tiny_model_dir, arrival.prompt, seq.tokens, torch.tensor(seq.logits), bound)


def test_padding_rows_of_a_bucket_do_not_touch_the_real_rows(tiny_model_dir, forward, bound):
    """What a replayed graph does: rows past n decode a dummy token into free slots."""
    batch = SequenceBatch(forward, slots=8, max_len=forward.wpe.shape[0])
    batch.admit(["a", "b"], [[1, 2, 3], [4, 5, 6, 7, 8]])
    with torch.inference_mode():
        padded = forward.decode(batch.cache, torch.tensor([9, 9, 0, 0, 0]), torch.tensor([3, 5, 0, 0, 0]), 64)
        exact = forward.decode(batch.cache, torch.tensor([9, 9]), torch.tensor([3, 5]), 64)
    torch.testing.assert_close(padded[:2], exact)
    assert_close_to_exact(tiny_model_dir, [1, 2, 3, 9], exact[0], bound)


def test_admit_refuses_what_the_cache_cannot_hold(forward):
    batch = SequenceBatch(forward, slots=2, max_len=16)
    with pytest.raises(ValueError, match="do not fit"):
        batch.admit(["a", "b", "c"], [[1], [2], [3]])
    with pytest.raises(ValueError, match="16"):
        batch.admit(["a"], [[1] * 16])


def test_graph_padding_rows_write_only_the_last_cache_position():
    """Rows past n in a decode graph write K/V into slots where prompts may be part-way
    through prefill: at the last position, which no prompt reaches (prompts < max_len)."""
    from serve_tp.engine.decode_runner import padded_inputs

    tokens, positions = padded_inputs([5, 6], [10, 3], batch=4, max_len=256)
    assert tokens == [5, 6, 0, 0] and positions == [10, 3, 255, 255]


def test_prompt_chunks_give_the_whole_prompts_logits(forward, tiny_model_dir, bound):
    """A prompt prefilled 9 tokens at a time, beside a decoding row that leaves mid-way (its
    slot refilled, the prefilling one moved down): last-position and every-position logits
    as close to exact as a whole prefill's."""
    from serve_tp.engine.plan import PrefillChunk

    script = whole_context_script(tiny_model_dir)
    prompt = list(script.arrivals[3].prompt)  # 125 tokens
    neighbour = list(script.arrivals[1].prompt)
    batch = SequenceBatch(forward, slots=3, max_len=256)
    batch.admit(["n0", "n1"], [neighbour, neighbour])
    every, last = [], None
    for start in range(0, len(prompt), 9):
        if start == 45:
            assert batch.evict(["n0"]) == [(1, 0)]  # n1 moves down, and the prompt with it
        end = min(start + 9, len(prompt))
        last, scored = batch.prefill([PrefillChunk("p", tuple(prompt[start:end]), start, end == len(prompt), True)],
                                     keep_prompt_logits={"p"})
    assert batch.seq_ids == ["n1", "p"] and batch.lengths == [len(neighbour), len(prompt)] and not batch.pending
    exact = reference.logits_along(tiny_model_dir, prompt)
    assert float((scored["p"].double() - exact).abs().max()) <= bound
    assert_close_to_exact(tiny_model_dir, prompt, last[0], bound)
    step = batch.decode([3, 7])  # the chunked prompt's cache decodes on as any other
    assert_close_to_exact(tiny_model_dir, prompt + [7], step[1], bound)


def test_a_chunk_must_continue_its_prompt(forward):
    from serve_tp.engine.plan import PrefillChunk

    batch = SequenceBatch(forward, slots=3, max_len=64)
    batch.prefill([PrefillChunk("a", (1, 2, 3), 0, False)])
    with pytest.raises(ValueError, match="does not continue"):
        batch.prefill([PrefillChunk("a", (4,), 5, True)])
    with pytest.raises(ValueError, match="do not fit"):
        batch.prefill([PrefillChunk(s, (1,), 0, True) for s in "bcd"])
    assert batch.pending == ["a"] and batch.pending_lengths == [3]  # refused steps changed nothing
    last, _ = batch.prefill([PrefillChunk("b", (1,), 0, True), PrefillChunk("a", (4,), 3, True)])
    assert last.shape[0] == 2 and batch.seq_ids == ["b", "a"] and batch.lengths == [1, 4]  # the plan's order


def test_prompts_finishing_ahead_of_part_filled_ones_take_their_slots_and_all_stay_exact(tiny_model_dir, forward,
                                                                                          bound):
    """Beside a decoding row, two prompts part-way through (slots 1, 2); then one of them
    and a new whole prompt finish while the other goes on: the finishers take slots 1 and
    2 (the part-filled prefix of the one going on moves to slot 3, the finishing one's from
    2 to 1, in one permutation), and every prompt's logits, and the decode after, stay
    within the bound of float64's."""
    from serve_tp.engine.plan import PrefillChunk

    held = [a.prompt for a in whole_context_script(tiny_model_dir).arrivals]
    long, mid, short, row = list(held[3]), list(held[2]), list(held[4]), [5, 6, 7]
    batch = SequenceBatch(forward, slots=4, max_len=forward.wpe.shape[0])
    batch.admit(["row"], [row])
    batch.prefill([PrefillChunk("long", tuple(long[:30]), 0, False), PrefillChunk("mid", tuple(mid[:10]), 0, False)])
    moved, move_many = [], batch.cache.move_many
    batch.cache.move_many = lambda s, t, n: (moved.append((s, t, n)), move_many(s, t, n))
    last, _ = batch.prefill([PrefillChunk("long", tuple(long[30:40]), 30, False),
                             PrefillChunk("mid", tuple(mid[10:]), 10, True),
                             PrefillChunk("short", tuple(short), 0, True)])
    assert moved == [([2, 1], [1, 3], 30)]  # only cached prefixes move: mid's 10 and long's 30, at once
    assert (batch.seq_ids, batch.lengths) == (["row", "mid", "short"], [3, len(mid), len(short)])
    assert (batch.pending, batch.pending_lengths) == (["long"], [40])
    assert_close_to_exact(tiny_model_dir, mid, last[0], bound)
    assert_close_to_exact(tiny_model_dir, short, last[1], bound)
    last, _ = batch.prefill([PrefillChunk("long", tuple(long[40:]), 40, True)])
    assert batch.seq_ids == ["row", "mid", "short", "long"] and not batch.pending
    assert_close_to_exact(tiny_model_dir, long, last[0], bound)
    step = batch.decode([1, 2, 3, 4])
    for i, prompt in enumerate([row, mid, short, long]):
        assert_close_to_exact(tiny_model_dir, prompt + [i + 1], step[i], bound)


def test_padding_rows_leave_a_part_prefilled_slot_intact(tiny_model_dir, forward, bound):
    """A replayed graph of bucket 4 decodes 1 real row and 3 padding rows, into slots 1..3,
    while slot 1 holds half a prompt: its prefill goes on to the exact logits. (Padding at
    position 0, as before chunked prefill, overwrote the prompt's first K/V there.)"""
    from serve_tp.engine.decode_runner import padded_inputs
    from serve_tp.engine.plan import PrefillChunk

    batch = SequenceBatch(forward, slots=4, max_len=forward.wpe.shape[0])
    batch.admit(["a"], [[1, 2, 3]])
    prompt = (11, 12, 13, 14, 15, 16, 17)
    batch.prefill([PrefillChunk("p", prompt[:4], 0, False)])
    assert (batch.seq_ids, batch.pending, batch.pending_lengths) == (["a"], ["p"], [4])
    tokens, positions = padded_inputs([9], batch.lengths, 4, batch.cache.max_len)
    with torch.inference_mode():  # what DecodeRunner.run replays on GPU for one row
        forward.decode(batch.cache, torch.tensor(tokens), torch.tensor(positions), 64)
    batch.lengths = [n + 1 for n in batch.lengths]
    last, _ = batch.prefill([PrefillChunk("p", prompt[4:], 4, True)])
    assert batch.seq_ids == ["a", "p"] and not batch.pending
    assert_close_to_exact(tiny_model_dir, list(prompt), last[0], bound)


@pytest.mark.parametrize("budget", [1, 16])
def test_mixed_chunks_through_the_executor_give_exact_logits_and_echo_scores(tiny_model_dir, forward, bound,
                                                                             budget):
    """Several prompts through a small per-step budget shared as the scheduler shares it
    (so whole prompts and continued chunks share a pass, beside decode rows, and short
    prompts finish ahead of part-filled long ones), one eviction moving a part-filled
    slot: each last position's logits and every echo score (gathered over the chunks by
    the executor's batch) within the rounding bound of float64's."""
    from serve_tp.engine.executor import Executor
    from serve_tp.engine.plan import PrefillChunk, StepPlan
    from serve_tp.engine.scheduler import allot, default_prefill_share

    held = [a.prompt for a in whole_context_script(tiny_model_dir).arrivals]
    prompts = {"x": held[1], "y": held[3][:40], "z": held[2][:17], "w": held[4]}
    batch = SequenceBatch(forward, slots=5, max_len=forward.wpe.shape[0])
    executor = Executor(batch, keep_prompt_logits=True)
    executor.run(StepPlan(prefill=[PrefillChunk("first", (5, 6, 7), 0, True)]))
    done, echo, order, evict, overtaken = {}, {}, list(prompts), [], 0
    while order:
        remaining = [len(prompts[s]) - done.get(s, 0) for s in order]
        chunks = []
        for seq_id, n in zip(order, allot(remaining, budget, default_prefill_share(budget))):
            start = done.get(seq_id, 0)
            if n:
                chunks.append(PrefillChunk(seq_id, tuple(prompts[seq_id][start:start + n]), start,
                                           start + n == len(prompts[seq_id]), prompt_logits=True))
            done[seq_id] = start + n
        decode = [1] * (len(batch) - len(evict))
        step = executor.run(StepPlan(evict=evict, decode_tokens=decode, prefill=chunks))
        evict = ["first"] if "first" in batch.seq_ids and batch.pending else []  # moves the pending slot
        finals = [c.seq_id for c in chunks if c.final]
        logits = step.logits if step.logits is not None else torch.empty(0)
        assert logits.shape[0] == len(decode) + len(finals)
        for seq_id, row in zip(finals, logits[len(decode):]):
            assert_close_to_exact(tiny_model_dir, list(prompts[seq_id]), row, bound)
        echo.update(step.prompt_logits)
        overtaken += finals != order[: len(finals)]
        order = [s for s in order if s not in finals]
    assert set(echo) == set(prompts) and "first" not in batch.seq_ids
    assert overtaken >= (budget > 1)  # with a share of 4, a short prompt finished ahead of a longer one
    for seq_id, prompt in prompts.items():
        exact = reference.logits_along(tiny_model_dir, prompt)
        assert echo[seq_id].shape[0] == len(prompt)
        error = float((echo[seq_id].double() - exact).abs().max())
        assert error <= bound, f"{seq_id}: echo logits off by {error:.3g} > {bound:.3g}"
