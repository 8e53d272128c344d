"""The realistic workload's pure logic: length distributions, clamping, the greedy/sampled mix,
Poisson arrivals, goodput, the level plan, token-exact prompts, and open vs closed loop
against a canned server (no Ray, a few seconds).

    python -m pytest benchmarks/test_workload.py
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics

import pytest

from benchmarks import loadgen, plan, report, stats, workload
from benchmarks.workload import LengthDist, RequestSpec


@pytest.mark.parametrize("spec, expected", [
    ("32", LengthDist("fixed", 32, 32)),
    ("fixed:32", LengthDist("fixed", 32, 32)),
    ("uniform:16:900", LengthDist("uniform", 16, 900)),
    ("loguniform:16:256", LengthDist("loguniform", 16, 256)),
])
def test_length_dist_parses(spec, expected):
    assert LengthDist.parse(spec) == expected
    assert LengthDist.parse(str(expected)) == expected


@pytest.mark.parametrize("spec", ["", "normal:1:2", "uniform:9", "uniform:900:16", "loguniform:0:5", "fixed:a"])
def test_length_dist_refuses_nonsense(spec):
    with pytest.raises(ValueError, match="length distribution"):
        LengthDist.parse(spec)


def test_loguniform_covers_its_bounds_with_the_geometric_median():
    dist = LengthDist.parse(workload.REALISTIC_PROMPT)
    draws = dist.sample(random.Random(1), 20_000)
    assert min(draws) == 16 and max(draws) == 900  # both ends reachable, nothing outside
    # Log-uniform: the median is the geometric mean of [16, 901) (~120), the mean (901-16)/ln(901/16) (~219).
    assert statistics.median(draws) == pytest.approx(math.sqrt(16 * 901), rel=0.05)
    assert statistics.mean(draws) == pytest.approx((901 - 16) / math.log(901 / 16), rel=0.03)
    # Control: uniform over the same bounds puts its median in the middle, far from log-uniform's.
    uniform = LengthDist("uniform", 16, 900).sample(random.Random(1), 20_000)
    assert statistics.median(uniform) == pytest.approx(458, rel=0.05)


def test_requests_are_seeded_and_prefix_stable():
    p, o = LengthDist.parse("loguniform:16:900"), LengthDist.parse("loguniform:16:256")
    a = workload.build_requests(100, p, o, 0.5, seed=7)
    assert a == workload.build_requests(100, p, o, 0.5, seed=7)
    assert a != workload.build_requests(100, p, o, 0.5, seed=8)
    assert [s.prompt_tokens for s in workload.build_requests(10, p, o, 0.5, seed=7)] == [s.prompt_tokens for s in a[:10]]
    assert all(16 <= s.max_tokens <= 256 for s in a)


@pytest.mark.parametrize("n, fraction, greedy", [(10, 0.5, 5), (7, 0.5, 4), (9, 0.0, 0), (9, 1.0, 9), (100, 0.3, 30)])
def test_greedy_fraction_is_exact(n, fraction, greedy):
    flags = workload.greedy_flags(n, fraction, random.Random(0))
    assert (len(flags), sum(flags)) == (n, greedy)


def test_greedy_and_sampled_are_interleaved_not_blocked():
    flags = workload.greedy_flags(100, 0.5, random.Random(0))
    assert flags != sorted(flags) and flags != sorted(flags, reverse=True)


@pytest.mark.parametrize("p, o, expected", [
    (100, 50, (100, 50, False)),    # fits: untouched
    (1000, 24, (1000, 24, False)),  # exactly fills 1024
    (900, 256, (900, 124, True)),   # output cut to what is left
    (1020, 200, (1008, 16, True)),  # too little left: prompt cut to leave the 16-token floor
    (1020, 8, (1016, 8, True)),     # the floor is never above the request's own output
])
def test_clamp_fits_the_context(p, o, expected):
    got = workload.clamp(RequestSpec(p, o, True), 1024, min_output=16)
    assert (got.prompt_tokens, got.max_tokens, got.clamped) == expected
    assert got.prompt_tokens + got.max_tokens <= 1024


def test_clamped_workload_never_exceeds_a_small_context():
    specs = workload.build_requests(500, LengthDist.parse("loguniform:16:900"), LengthDist.parse("loguniform:16:256"),
                                    0.5, seed=0, max_model_len=256)
    assert all(s.prompt_tokens + s.max_tokens <= 256 and s.prompt_tokens >= 1 for s in specs)
    assert any(s.clamped for s in specs) and not all(s.clamped for s in specs)
    assert all(s.clamped == (u.prompt_tokens + u.max_tokens > 256) for s, u in
               zip(specs, workload.build_requests(500, LengthDist.parse("loguniform:16:900"),
                                                  LengthDist.parse("loguniform:16:256"), 0.5, seed=0)))


def test_poisson_arrivals_have_the_target_rate():
    times = workload.poisson_arrivals(8.0, 4000, seed=3)
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert all(g >= 0 for g in gaps) and times == sorted(times)
    assert len(times) / times[-1] == pytest.approx(8.0, rel=0.05)  # the rate over the run
    # Exponential gaps: standard deviation equals the mean (a fixed schedule would have none).
    assert statistics.pstdev(gaps) == pytest.approx(statistics.mean(gaps), rel=0.08)
    assert workload.poisson_arrivals(8.0, 50, seed=3) == times[:50]
    assert workload.poisson_arrivals(float("inf"), 3, seed=3) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        workload.poisson_arrivals(0, 3, seed=3)


def test_goodput_counts_requests_within_both_slos():
    slo = stats.SLO(ttft_s=0.2, tpot_s=0.02)

    def req(ttft, tpot, ok=True, tokens=11):
        # last token at ttft + tpot * (tokens - 1), so RequestResult.tpot gives back `tpot`
        return loadgen.RequestResult(ok=ok, ttft=ttft, last_token=ttft + tpot * (tokens - 1), output_tokens=tokens,
                                     text_chunks=tokens, latency=1.0)

    results = [req(0.1, 0.01), req(0.2, 0.02), req(0.25, 0.01), req(0.1, 0.03), req(0.1, 0.01, ok=False),
               req(0.15, 0.5, tokens=1)]  # one token: judged on TTFT alone
    assert [slo.met(r) for r in results] == [True, True, False, False, False, True]
    assert stats.goodput(results, 2.0, slo) == (3, pytest.approx(1.5))
    assert stats.goodput([], 0.0, slo) == (0, None)


def test_mixed_levels_report_each_kind():
    fast = loadgen.RequestResult(ok=True, ttft=0.05, last_token=0.14, output_tokens=10, text_chunks=10, latency=0.2,
                                 greedy=True)
    slow = loadgen.RequestResult(ok=True, ttft=0.05, last_token=2.75, output_tokens=10, text_chunks=10, latency=3.0,
                                 greedy=False)
    row = stats.summarize("serve_tp", 2, [fast, slow], 3.0, workload="realistic", sampling="mixed",
                          greedy_fraction=0.5)
    kinds = row["by_sampling"]
    assert kinds["greedy"]["tpot_p50_s"] == pytest.approx(0.01)
    assert kinds["sampled"]["tpot_p50_s"] == pytest.approx(0.3)
    assert (kinds["greedy"]["slo_met"], kinds["sampled"]["slo_met"]) == (1, 0)
    table = report.markdown_table([row])
    assert "| serve_tp | realistic | mixed 50% greedy | 2 users |" in table
    assert "sampled 1 req, TTFT p50 50.0 ms, TPOT p50 300.0" in table


def test_plan_puts_greedy_and_sampled_side_by_side():
    levels = plan.plan_levels(["fixed", "realistic"], ["greedy", "sampled"], [1, 8], [2.0])
    assert [(lv.workload, lv.sampling, lv.concurrency, lv.request_rate) for lv in levels] == [
        ("fixed", "greedy", 1, None), ("fixed", "sampled", 1, None),
        ("fixed", "greedy", 8, None), ("fixed", "sampled", 8, None),
        ("fixed", "greedy", None, 2.0), ("fixed", "sampled", None, 2.0),
        ("realistic", "mixed", 1, None), ("realistic", "mixed", 8, None), ("realistic", "mixed", None, 2.0),
    ]
    assert report.load_label({"concurrency": 1}) == "1 user" and report.load_label({"request_rate": 2.5}) == "2.5 req/s"
    assert levels[1].n_requests(4, 30) == 4 and levels[-1].n_requests(4, 30) == 60
    with pytest.raises(ValueError):
        plan.parse_rates("2,inf")


def test_bodies_send_sampling_fields_only_when_sampled():
    sampled = plan.SamplingSettings(temperature=0.8, top_p=0.9, top_k=40)
    bodies = plan.Bodies("m", sampled, "hi", 1, 64, LengthDist.parse("8"), LengthDist.parse("8"), 0.5, 0, None)
    greedy_body = bodies.for_level(plan.Level("fixed", "greedy", 1), 1, None)[0][0]
    sampled_body = bodies.for_level(plan.Level("fixed", "sampled", 1), 1, None)[0][0]
    assert greedy_body["temperature"] == 0 and "top_p" not in greedy_body and "top_k" not in greedy_body
    assert (sampled_body["temperature"], sampled_body["top_p"], sampled_body["top_k"]) == (0.8, 0.9, 40)
    assert sampled_body["ignore_eos"] and sampled_body["stream"]
    assert bodies.for_level(plan.Level("fixed", "greedy", 1), 1, 33)[0][0]["max_tokens"] == 32  # clamped
    default = loadgen.completion_body("m", "hi", 4, temperature=1.0)
    assert "top_p" not in default and "top_k" not in default  # unset fields are not sent


@pytest.fixture(scope="module")
def tokenizer():
    from serve_tp.model.tiny_model import train_tokenizer

    return train_tokenizer(600)


def test_prompts_are_token_exact_and_differ(tokenizer):
    from serve_tp.model.tiny_model import CORPUS

    encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    source = workload.PromptSource(encode, tokenizer.decode, CORPUS.read_text())
    lengths = [1, 2, 16, 17, 100, 333, 900]
    texts = [source.prompt(n, i) for i, n in enumerate(lengths)]
    assert [len(encode(t)) for t in texts] == lengths
    assert len(set(source.prompt(50, i) for i in range(5))) == 5  # each request its own prompt
    # Control: the naive cut (decode the first n ids of a fixed text) is not always n tokens.
    naive = [len(encode(tokenizer.decode(source._slice(k, 50)))) for k in range(len(source.ids))]
    assert any(n != 50 for n in naive)


def test_open_loop_sends_on_schedule_while_earlier_requests_run(slow_sse_url):
    bodies = [loadgen.completion_body("gpt2", "hi", 2)] * 4
    arrivals = [0.0, 0.05, 0.1, 0.15]
    results, duration = asyncio.run(loadgen.run_open_loop(
        slow_sse_url, bodies, arrivals, request_timeout_s=5, level_timeout_s=10))
    assert sorted(r.index for r in results) == [0, 1, 2, 3] and all(r.ok for r in results)
    assert all(abs(r.sent_at - r.scheduled_at) < 0.05 for r in results)  # nobody waited for a free client
    assert duration < 0.3 * 2  # overlapped: sequential would take 1.2 s
    # Control: one closed-loop user sends the same requests one after another.
    closed, closed_duration = asyncio.run(loadgen.run_level(
        slow_sse_url, bodies, 1, 4, request_timeout_s=5, level_timeout_s=10))
    assert closed_duration > 1.1 and [r.index for r in closed] == [0, 1, 2, 3]


def test_open_loop_sends_nothing_past_the_level_timeout(sse_url):
    results, _ = asyncio.run(loadgen.run_open_loop(
        sse_url, [loadgen.completion_body("gpt2", "hi", 2)] * 3, [0.0, 0.01, 5.0], request_timeout_s=5,
        level_timeout_s=0.5))
    assert sorted(r.index for r in results) == [0, 1]


def test_outputs_hold_the_run_header_and_goodput(tmp_path):
    res = loadgen.RequestResult(ok=True, ttft=0.05, last_token=0.14, output_tokens=10, text_chunks=10, latency=0.2,
                                greedy=True, sent_at=0.01, scheduled_at=0.0)
    closed = stats.summarize("serve_tp", 4, [res], 1.0, workload="fixed", sampling="greedy")
    rate = stats.summarize("serve_tp", None, [res], 1.0, workload="realistic", sampling="mixed", request_rate=2.0)
    run = {"device": "cpu", "tensor_parallel_size": 2, "sampling": {"sampled": {"temperature": 1.0}},
           "slo": {"ttft_ms": 200, "tpot_ms": 20}}
    paths = report.write_outputs(tmp_path, run, [closed, rate], name="cpu_tp2")
    assert [p.name for p in paths] == ["cpu_tp2.json", "cpu_tp2.md", "cpu_tp2.png"]
    saved = json.loads(paths[0].read_text())
    assert saved["run"]["tensor_parallel_size"] == 2 and saved["run"]["sampling"]["sampled"]["temperature"] == 1.0
    assert [lv["goodput"] for lv in saved["levels"]] == [1.0, 1.0]
    assert saved["levels"][1]["send_lag_p99_s"] == pytest.approx(0.01)
    assert "| serve_tp | realistic | mixed 50% greedy | 2 req/s |" in paths[1].read_text()
    assert paths[2].stat().st_size > 10_000
