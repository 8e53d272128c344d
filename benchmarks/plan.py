"""The levels of a benchmark run and the request bodies each one sends.

A level is one workload (fixed or realistic) under one load (closed-loop users or a
Poisson request rate) with one sampling kind. Fixed levels run once per sampling kind,
greedy then sampled at the same load, so the two sit side by side in the table; realistic
levels mix greedy and sampled requests in one level (their split is in `by_sampling`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from benchmarks import loadgen, workload

WORKLOADS = ("fixed", "realistic")
SAMPLING_KINDS = ("greedy", "sampled")


@dataclass(frozen=True)
class Level:
    workload: str  # fixed | realistic
    sampling: str  # greedy | sampled | mixed
    concurrency: Optional[int] = None  # closed loop: users
    request_rate: Optional[float] = None  # open loop: Poisson arrivals per second

    @property
    def open_loop(self) -> bool:
        return self.request_rate is not None

    def n_requests(self, requests_per_client: int, rate_duration_s: float) -> int:
        if self.open_loop:
            return max(1, round(self.request_rate * rate_duration_s))
        return self.concurrency * requests_per_client

    def labels(self) -> dict:
        return {"workload": self.workload, "sampling": self.sampling, "request_rate": self.request_rate,
                "arrival": "poisson" if self.open_loop else "closed"}


def plan_levels(workloads: Sequence[str], sampling: Sequence[str], concurrency: Sequence[int],
                request_rates: Sequence[float]) -> list[Level]:
    """Every workload at every load: users first, then rates; fixed once per sampling kind."""
    levels = []
    for name in workloads:
        kinds = list(sampling) if name == "fixed" else ["mixed"]
        loads = [(c, None) for c in concurrency] + [(None, r) for r in request_rates]
        levels += [Level(name, kind, c, r) for c, r in loads for kind in kinds]
    return levels


@dataclass(frozen=True)
class SamplingSettings:
    """What a sampled request sends (greedy ones send temperature 0 only)."""

    temperature: float = 1.0
    top_p: Optional[float] = 0.95
    top_k: Optional[int] = None

    def fields(self, greedy: bool) -> dict:
        if greedy:
            return {"temperature": 0}
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


class Bodies:
    """Builds each level's request bodies; realistic prompts are cut once and reused."""

    def __init__(self, model: Optional[str], sampled: SamplingSettings, fixed_prompt: str, fixed_prompt_tokens: Optional[int],
                 fixed_max_tokens: int, prompt_dist: workload.LengthDist, output_dist: workload.LengthDist,
                 greedy_fraction: float, seed: int, source: Optional[workload.PromptSource]):
        self.model, self.sampled = model, sampled
        self.fixed_prompt, self.fixed_prompt_tokens, self.fixed_max_tokens = fixed_prompt, fixed_prompt_tokens, fixed_max_tokens
        self.prompt_dist, self.output_dist = prompt_dist, output_dist
        self.greedy_fraction, self.seed, self.source = greedy_fraction, seed, source
        self._texts: dict[tuple[int, int], str] = {}

    def body(self, prompt: str, max_tokens: int, greedy: bool) -> dict:
        return loadgen.completion_body(self.model, prompt, max_tokens, **self.sampled.fields(greedy))

    def fixed_max(self, max_model_len: Optional[int]) -> int:
        """--max-tokens, cut to what the context leaves after the fixed prompt."""
        if max_model_len is None or self.fixed_prompt_tokens is None:
            return self.fixed_max_tokens
        left = max_model_len - self.fixed_prompt_tokens
        if left < 1:
            raise ValueError(f"the fixed prompt ({self.fixed_prompt_tokens} tokens) fills the served context "
                             f"({max_model_len}); lower --prompt-tokens")
        return min(self.fixed_max_tokens, left)

    def for_level(self, level: Level, n: int, max_model_len: Optional[int]) -> tuple[list[dict], list[workload.RequestSpec]]:
        """The level's bodies and what each was meant to be (prompt tokens, output, greedy)."""
        if level.workload == "fixed":
            greedy = level.sampling == "greedy"
            spec = workload.RequestSpec(self.fixed_prompt_tokens or 0, self.fixed_max(max_model_len), greedy)
            return [self.body(self.fixed_prompt, spec.max_tokens, greedy)], [spec]
        if self.source is None:
            raise ValueError("the realistic workload needs the model's tokenizer (--model DIR) for its prompts")
        specs = workload.build_requests(n, self.prompt_dist, self.output_dist, self.greedy_fraction, self.seed,
                                        max_model_len)
        bodies = []
        for i, spec in enumerate(specs):
            key = (spec.prompt_tokens, i)
            if key not in self._texts:
                self._texts[key] = self.source.prompt(spec.prompt_tokens, i)
            bodies.append(self.body(self._texts[key], spec.max_tokens, spec.greedy))
        return bodies, specs


def arrivals(level: Level, n: int, seed: int) -> list[float]:
    return workload.poisson_arrivals(level.request_rate, n, seed)


def prompt_mismatches(results, specs: Sequence[workload.RequestSpec]) -> int:
    """Requests whose prompt the server counted differently from what was meant (usage's count)."""
    bad = 0
    for r in results:
        if r.ok and r.prompt_tokens is not None and r.index is not None and specs[r.index].prompt_tokens:
            bad += r.prompt_tokens != specs[r.index].prompt_tokens
    return bad


def parse_rates(text: str) -> list[float]:
    """`2,8,32` -> [2.0, 8.0, 32.0]; each finite and > 0."""
    rates = [float(x) for x in text.split(",") if x.strip()]
    if any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise ValueError(f"request rates must be finite and > 0, got {text}")
    return rates
