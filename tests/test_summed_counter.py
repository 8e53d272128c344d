"""SummedCounter: the replica's counters summed in-process, recorded once per flush, same totals."""

import asyncio

from serve_tp import metrics
from serve_tp.metrics import SummedCounter


class Recorded:
    """Stands where a ray Counter is: keeps each `inc` it gets."""

    def __init__(self):
        self.calls = []

    def inc(self, value, tags):
        self.calls.append((value, tags))

    def totals(self):
        out = {}
        for value, tags in self.calls:
            key = tuple(sorted(tags.items()))
            out[key] = out.get(key, 0) + value
        return out


def test_increments_in_a_loop_reach_the_counter_once_per_tag_set_with_the_same_totals(monkeypatch):
    monkeypatch.setattr(metrics, "COUNTER_FLUSH_S", 0.05)
    counter = Recorded()
    summed = SummedCounter(counter)
    ok, bad = {"route": "/v1/completions", "status": "200"}, {"route": "/v1/completions", "status": "400"}

    async def main():
        for i in range(100):
            summed.inc(1, ok)
            summed.inc(3, bad if i % 10 == 0 else ok)
        held = list(counter.calls)
        await asyncio.sleep(0.2)
        return held

    held = asyncio.run(main())
    assert held == []  # nothing recorded before the flush ...
    assert len(counter.calls) == 2  # ... then one record per tag set
    assert counter.totals() == {tuple(sorted(ok.items())): 100 + 3 * 90, tuple(sorted(bad.items())): 3 * 10}


def test_outside_a_loop_or_across_loops_nothing_is_lost(monkeypatch):
    monkeypatch.setattr(metrics, "COUNTER_FLUSH_S", 0.05)
    counter = Recorded()
    summed = SummedCounter(counter)
    tags = {"model": "m"}
    summed.inc(2, tags)  # no loop: recorded at once
    assert counter.calls == [(2, tags)]

    async def burst(n, wait):
        summed.inc(n, tags)
        await asyncio.sleep(wait)

    asyncio.run(burst(5, 0))  # this loop ends before its flush is due
    asyncio.run(burst(7, 0.2))  # the next loop's flush carries both
    assert counter.totals() == {(("model", "m"),): 2 + 5 + 7}
