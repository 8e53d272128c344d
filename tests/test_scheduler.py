"""Rank 0's scheduler: the prefill budget handed out first come, first served."""

from serve_tp.engine.scheduler import Scheduler
from serve_tp.messages import SamplingParams, SequenceRequest


def scheduler(budget, slots=4):
    decoding: list[str] = []
    sched = Scheduler(lambda leaving: [s for s in decoding if s not in leaving], slots, 0, max_prefill_tokens=budget)
    return sched, decoding


def submit(sched, seq_id, n):
    sched.submit(SequenceRequest(seq_id, tuple(range(1, n + 1)), SamplingParams(max_tokens=4)), lambda out: None)


def chunks(plan):
    return [(c.seq_id, c.start, len(c.tokens), c.final) for c in plan.prefill]


def test_prompts_part_way_through_come_first_and_only_the_last_chunk_is_partial():
    sched, decoding = scheduler(budget=10)
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
    sched, decoding = scheduler(budget=100, slots=2)
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
    sched, decoding = scheduler(budget=10, slots=2)
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
    sched, _ = scheduler(budget=4, slots=2)
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
