"""Rank 0's scheduler: the prefill budget, shared among prompts or first come, first served."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serve_tp.engine.scheduler import Scheduler, allot
from serve_tp.messages import SamplingParams, SequenceRequest


def scheduler(budget, slots=4, share=None):
    """share=None: the default (a quarter of the budget); share=budget: first come, first served."""
    decoding: list[str] = []
    sched = Scheduler(lambda leaving: [s for s in decoding if s not in leaving], slots, 0, max_prefill_tokens=budget,
                      prefill_share_tokens=share)
    return sched, decoding


def submit(sched, seq_id, n):
    sched.submit(SequenceRequest(seq_id, tuple(range(1, n + 1)), SamplingParams(max_tokens=4)), lambda out: None)


def chunks(plan):
    return [(c.seq_id, c.start, len(c.tokens), c.final) for c in plan.prefill]


def test_prompts_part_way_through_come_first_and_only_the_last_chunk_is_partial():
    sched, decoding = scheduler(budget=10, share=10)  # first come, first served
    for seq_id, n in (("a", 25), ("b", 4), ("c", 3), ("d", 30)):
        submit(sched, seq_id, n)
    plan, joining = sched.next_plan()
    assert chunks(plan) == [("a", 0, 10, False)] and joining == []
    plan, _ = sched.next_plan()
    assert chunks(plan) == [("a", 10, 10, False)]
    plan, joining = sched.next_plan()  # a's last 5, then b whole, then 1 of c
    assert chunks(plan) == [("a", 20, 5, True), ("b", 0, 4, True), ("c", 0, 1, False)]
    assert [s.seq_id for s in joining] == ["a", "b"] and plan.rows == 2
    assert sched.load() == {"running": 3, "waiting": 1}  # c holds a slot already
    plan, joining = sched.next_plan()  # c's rest; d takes the last slot with what is left
    assert chunks(plan) == [("c", 1, 2, True), ("d", 0, 8, False)]
    assert [s.seq_id for s in joining] == ["c"]


def test_no_slot_no_admission_and_a_cancelled_prompt_leaves_its_turn():
    sched, decoding = scheduler(budget=100, slots=2, share=100)
    submit(sched, "a", 300)
    submit(sched, "b", 5)
    submit(sched, "c", 5)
    plan, _ = sched.next_plan()
    assert chunks(plan) == [("a", 0, 100, False)]  # a's prompt takes the whole budget
    sched.cancel("a")
    plan, joining = sched.next_plan()
    assert plan.evict == ["a"]
    assert chunks(plan) == [("b", 0, 5, True), ("c", 0, 5, True)]
    assert [s.seq_id for s in joining] == ["b", "c"]
    decoding += ["b", "c"]
    for seq in joining:
        seq.generated.append(7)
    submit(sched, "d", 5)
    plan, joining = sched.next_plan()  # both slots decode: d waits
    assert plan.decode_tokens == [7, 7] and plan.prefill == [] and sched.load()["waiting"] == 1


def test_a_prefilling_sequence_holds_its_slot():
    """Two slots: one decoding, one part-way through its prompt; the budget left over
    after the prompt's last chunk admits no third sequence until a slot frees."""
    sched, decoding = scheduler(budget=10, slots=2, share=10)
    submit(sched, "a", 2)
    plan, joining = sched.next_plan()
    decoding.append("a")
    joining[0].generated.append(7)
    submit(sched, "b", 13)
    submit(sched, "c", 2)
    plan, joining = sched.next_plan()
    assert chunks(plan) == [("b", 0, 10, False)] and plan.decode_tokens == [7] and joining == []
    plan, joining = sched.next_plan()
    assert chunks(plan) == [("b", 10, 3, True)]  # 7 tokens of budget left, no slot for c
    assert sched.load() == {"running": 2, "waiting": 1}
    decoding.append("b")
    joining[0].generated.append(8)
    sched.finish("a")
    plan, joining = sched.next_plan()
    assert plan.evict == ["a"] and chunks(plan) == [("c", 0, 2, True)] and plan.decode_tokens == [8]


def test_a_prefilling_sequence_cancelled_is_evicted_and_told_and_echo_travels_in_its_chunks():
    sched, _ = scheduler(budget=4, slots=2, share=4)
    told = []
    sched.submit(SequenceRequest("a", tuple(range(10)), SamplingParams(max_tokens=5, prompt_logprobs=1)),
                 told.append)
    plan, _ = sched.next_plan()
    assert chunks(plan) == [("a", 0, 4, False)] and plan.prefill[0].prompt_logits
    assert plan.prefill[0].tokens == (0, 1, 2, 3)
    sched.cancel("a")
    plan, joining = sched.next_plan()
    assert (plan.evict, plan.prefill, joining) == (["a"], [], [])
    assert [out.finish_reason for out in told] == ["cancelled"]
    assert sched.load() == {"running": 0, "waiting": 0} and not sched.has_work()


def test_the_default_share_is_a_quarter_of_the_budget():
    assert scheduler(budget=2048)[0].prefill_share_tokens == 512
    assert scheduler(budget=3)[0].prefill_share_tokens == 1
    with pytest.raises(ValueError, match="prefill_share_tokens"):
        scheduler(budget=8, share=0)


def test_allot_shares_a_contended_budget_and_is_first_come_first_served_otherwise():
    assert allot([900, 300], 2048, 512) == [900, 300]  # uncontended: every prompt whole
    assert allot([900, 900, 900, 16], 2048, 512) == [900, 620, 512, 16]  # the short one finishes
    assert allot([900, 900, 900, 16], 2048, 2048) == [900, 900, 248, 0]  # first come, first served
    assert allot([900] * 5 + [16], 2048, 512) == [512] * 4 + [0, 0]  # four long ones ahead: it waits


@given(st.lists(st.integers(1, 60), max_size=8), st.integers(1, 100), st.integers(1, 100))
def test_allot_spends_the_budget_and_gives_every_prompt_its_share_first(remaining, budget, share):
    grants = allot(remaining, budget, share)
    assert sum(grants) == min(budget, sum(remaining))
    assert all(0 <= g <= need for g, need in zip(grants, remaining))
    if sum(min(need, share) for need in remaining) <= budget:  # every share fits: each got it
        assert all(g >= min(need, share) for g, need in zip(grants, remaining))
    else:  # shares in turn order until the budget ran out, nothing beyond a share
        assert all(g <= share for g in grants)
        assert grants == [g for g in grants if g] + [0] * grants.count(0)


def ttft_steps(share):
    """A 40-token prompt part-way through a 12-token budget when a 3-token one arrives: the
    step (1-based) in which each gets its first token."""
    sched, decoding = scheduler(budget=12, share=share)
    submit(sched, "long", 40)
    first_plan, _ = sched.next_plan()
    assert chunks(first_plan) == [("long", 0, 12, False)]  # alone, it takes the whole budget either way
    submit(sched, "short", 3)
    joined, plans = {}, []
    for step in range(2, 8):
        plan, joining = sched.next_plan()
        plans.append(chunks(plan))
        for seq in joining:
            joined[seq.seq_id] = step
            decoding.append(seq.seq_id)
            seq.generated.append(7)
    return joined, plans


def test_a_short_prompt_behind_a_long_one_gets_its_first_token_in_the_step_it_arrives():
    joined, plans = ttft_steps(share=None)  # the default share: 3 of 12
    assert plans[0] == [("long", 12, 9, False), ("short", 0, 3, True)]  # its share, then the rest to long
    assert joined == {"short": 2, "long": 4}
    fifo, fifo_plans = ttft_steps(share=12)  # first come, first served: it waits for long's chunks
    assert fifo_plans[0] == [("long", 12, 12, False)]
    assert fifo == {"short": 4, "long": 4}  # and long is no later for sharing


def test_shares_claiming_the_budget_admit_no_one_more():
    sched, _ = scheduler(budget=12)
    for seq_id in "abcd":
        submit(sched, seq_id, 20)
    plan, _ = sched.next_plan()
    assert chunks(plan) == [(s, 0, 3, False) for s in "abcd"] and sched.load()["waiting"] == 0
    submit(sched, "e", 2)
    plan, _ = sched.next_plan()
    assert [c[0] for c in chunks(plan)] == list("abcd") and sched.load()["waiting"] == 1
