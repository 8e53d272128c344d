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
