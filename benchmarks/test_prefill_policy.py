"""The prefill-allotment simulation (benchmarks/prefill_policy.py): seeded, so repeatable,
and it shows what the BENCHMARKS.md table says (no model, about a second).

    python -m pytest benchmarks/test_prefill_policy.py
"""

from benchmarks.prefill_policy import simulate


def test_shares_let_short_prompts_through_a_contended_budget_and_change_nothing_uncontended():
    fifo = simulate(32, 20, budget=256, share=256, slots=128, seed=1)
    shared = simulate(32, 20, budget=256, share=64, slots=128, seed=1)
    assert shared == simulate(32, 20, budget=256, share=64, slots=128, seed=1)  # seeded
    assert shared["short_p99"] == 1 < fifo["short_p99"] and shared["short_mean"] < fifo["short_mean"]
    assert shared["part_chunks_max"] > fifo["part_chunks_max"]  # the price: more part-way chunks a step
    roomy = [simulate(32, 6, budget=2048, share=share, slots=128, seed=0) for share in (2048, 512)]
    assert roomy[0]["later_max"] == roomy[1]["later_max"] == 1  # after the burst, the next step for all
