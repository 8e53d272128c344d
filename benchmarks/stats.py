"""The benchmark's arithmetic: percentiles, service-level objectives (goodput), one row per level."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from benchmarks.loadgen import RequestResult


@dataclass(frozen=True)
class SLO:
    """What a user calls a good response: first token within `ttft_s`, then `tpot_s` per token.

    The defaults (200 ms, 20 ms) are an interactive chat's: the answer starts before the
    user notices a wait and then streams faster than anyone reads (50 tokens/s).
    """

    ttft_s: float = 0.2
    tpot_s: float = 0.02

    def met(self, r: RequestResult) -> bool:
        """Succeeded, first token in time, and paced in time. A response with no visible
        pacing (one chunk, or one token) is judged on its TTFT alone, which is then its
        whole latency."""
        if not r.ok or r.ttft is None or r.ttft > self.ttft_s:
            return False
        return r.tpot is None or r.tpot <= self.tpot_s


def goodput(results: Sequence[RequestResult], duration: float, slo: SLO) -> tuple[int, Optional[float]]:
    """(requests that met the SLO, those per second of the level's wall time)."""
    met = sum(slo.met(r) for r in results)
    return met, (met / duration if duration > 0 else None)


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (q in 0..100), as numpy's default; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _latencies(results: Sequence[RequestResult], slo: SLO) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    return {
        "requests": len(results),
        "slo_met": sum(slo.met(r) for r in results),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
    }


def summarize(
    target: str,
    concurrency: Optional[int],
    results: list[RequestResult],
    duration: float,
    slo: SLO = SLO(),
    **labels,
) -> dict:
    """One row of the report: throughput and goodput over the level's wall time, latency percentiles.

    `labels` (workload, sampling, request_rate...) are copied into the row. When the level
    mixed greedy and sampled requests, `by_sampling` holds each kind's own latencies, so a
    slow sampler cannot hide in a mixed average.
    """
    ok = [r for r in results if r.ok]
    latency = [r.latency for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    errors = [r.error for r in results if not r.ok]
    met, good_per_s = goodput(results, duration, slo)
    lags = [r.sent_at - r.scheduled_at for r in results if r.scheduled_at is not None and r.sent_at is not None]
    row = {
        "target": target,
        "concurrency": concurrency,
        **labels,
        **_latencies(results, slo),
        "errors": len(errors),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration > 0 else None,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else None,
        "goodput": good_per_s,
        "slo_met": met,
        "slo": {"ttft_ms": slo.ttft_s * 1000, "tpot_ms": slo.tpot_s * 1000},
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None,
        "prompt_tokens": prompt_tokens[0] if prompt_tokens else None,
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
        "send_lag_p99_s": percentile(lags, 99),
        "single_chunk": bool(ok) and all(r.text_chunks == 1 for r in ok),
        "no_visible_text": sum(r.no_visible_text for r in ok),
        "tokens_counted_by": "usage" if ok and all(r.tokens_from_usage for r in ok) else "chunks",
        "error_samples": sorted(set(errors))[:5],
    }
    kinds = {r.greedy for r in results if r.greedy is not None}
    if len(kinds) > 1:
        row["by_sampling"] = {
            name: _latencies([r for r in results if r.greedy is flag], slo)
            for name, flag in (("greedy", True), ("sampled", False))
        }
    row["per_request"] = [{**asdict(r), "tpot": r.tpot} for r in results]
    return row
