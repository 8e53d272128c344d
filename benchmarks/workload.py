"""What the benchmark sends: fixed or realistic requests, their arrival times, their prompts.

Pure logic (no HTTP, no torch), seeded, so a run can be repeated request for request:

* `LengthDist`: prompt and output lengths. The realistic default draws prompts log-uniformly
  from 16..900 tokens and outputs from 16..256: as many requests of 16-32 tokens as of
  450-900, a long tail of long prompts with most of them short, like chat traffic, and
  every length inside its bounds (no clipping spikes at the ends). Median: the geometric
  mean of the bounds, 120 prompt and 64 output tokens; mean 219 and 87.
* `build_requests`: one `RequestSpec` per request, greedy or sampled by an exact ratio,
  clamped to the served context (`clamp`).
* `poisson_arrivals`: open-loop send times at a target request rate.
* `PromptSource`: prompt text of an exact token count, built from the model's tokenizer.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

KINDS = ("fixed", "uniform", "loguniform")
REALISTIC_PROMPT = "loguniform:16:900"
REALISTIC_OUTPUT = "loguniform:16:256"


@dataclass(frozen=True)
class LengthDist:
    """Token counts drawn from `kind` over [low, high], both ends included."""

    kind: str
    low: int
    high: int

    @classmethod
    def parse(cls, spec: str) -> "LengthDist":
        """`fixed:N`, `uniform:LOW:HIGH` or `loguniform:LOW:HIGH`; a bare `N` means fixed."""
        parts = spec.strip().split(":")
        if len(parts) == 1 and parts[0].isdigit():
            parts = ["fixed", parts[0]]
        kind, bounds = parts[0], parts[1:]
        try:
            numbers = [int(b) for b in bounds]
        except ValueError:
            raise ValueError(f"length distribution '{spec}': bounds must be integers") from None
        if kind not in KINDS:
            raise ValueError(f"length distribution '{spec}': kind must be one of {', '.join(KINDS)}")
        if kind == "fixed":
            numbers = numbers * 2 if len(numbers) == 1 else []
        if len(numbers) != 2:
            raise ValueError(f"length distribution '{spec}': expected {kind}:LOW:HIGH (or fixed:N)")
        low, high = numbers
        if not 1 <= low <= high:
            raise ValueError(f"length distribution '{spec}': need 1 <= low ({low}) <= high ({high})")
        return cls(kind, low, high)

    def sample(self, rng: random.Random, n: int) -> list[int]:
        if self.kind == "fixed" or self.low == self.high:
            return [self.low] * n
        if self.kind == "uniform":
            return [rng.randint(self.low, self.high) for _ in range(n)]
        # Log-uniform over the integers: floor(exp(U)) with U uniform on [ln low, ln(high + 1)),
        # so each integer k gets the mass of [k, k + 1) and both ends are reachable.
        lo, hi = math.log(self.low), math.log(self.high + 1)
        return [min(self.high, int(math.exp(rng.uniform(lo, hi)))) for _ in range(n)]

    def __str__(self) -> str:
        return f"fixed:{self.low}" if self.kind == "fixed" else f"{self.kind}:{self.low}:{self.high}"


@dataclass(frozen=True)
class RequestSpec:
    """One request before it becomes a body: lengths in tokens, greedy or sampled."""

    prompt_tokens: int
    max_tokens: int
    greedy: bool
    clamped: bool = False


def clamp(spec: RequestSpec, max_model_len: int, min_output: int = 16) -> RequestSpec:
    """Make prompt + output fit `max_model_len`, as a client that knows the context would.

    The prompt is kept and the output cut to what is left; only when fewer than
    `min_output` tokens would be left is the prompt cut too, to leave exactly that many.
    A request that does not fit would only measure the server's 400.
    """
    if spec.prompt_tokens + spec.max_tokens <= max_model_len:
        return spec
    floor = max(1, min(min_output, spec.max_tokens, max_model_len - 1))
    out = max(floor, max_model_len - spec.prompt_tokens)
    return replace(spec, prompt_tokens=max_model_len - out, max_tokens=out, clamped=True)


def greedy_flags(n: int, greedy_fraction: float, rng: random.Random) -> list[bool]:
    """Exactly round(n * fraction) greedy requests, in a seeded random order."""
    if not 0 <= greedy_fraction <= 1:
        raise ValueError(f"greedy fraction must be in [0, 1], got {greedy_fraction}")
    greedy = round(n * greedy_fraction)
    flags = [True] * greedy + [False] * (n - greedy)
    rng.shuffle(flags)
    return flags


def build_requests(
    n: int,
    prompt: LengthDist,
    output: LengthDist,
    greedy_fraction: float,
    seed: int,
    max_model_len: Optional[int] = None,
) -> list[RequestSpec]:
    """The first `n` requests of the workload seeded by `seed`, clamped to the context.

    The same seed gives the same sequence for any `n`'s prefix, so a level with fewer
    requests sends the start of a longer level's list.
    """
    rng_p, rng_o, rng_g = (random.Random(f"{seed}-{part}") for part in ("prompt", "output", "greedy"))
    prompts, outputs = prompt.sample(rng_p, n), output.sample(rng_o, n)
    flags = greedy_flags(n, greedy_fraction, rng_g)
    specs = [RequestSpec(p, o, g) for p, o, g in zip(prompts, outputs, flags)]
    if max_model_len is not None:
        specs = [clamp(s, max_model_len, min_output=output.low) for s in specs]
    return specs


def poisson_arrivals(rate: float, n: int, seed: int) -> list[float]:
    """Send times (seconds from the start) of `n` requests arriving as a Poisson process.

    Gaps are exponential with mean 1/rate, the first one included, so the average rate
    over the run is `rate`; `rate=inf` sends all at once (a burst).
    """
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng, t, times = random.Random(f"{seed}-arrivals"), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    return times


class PromptSource:
    """Prompt texts of exact token counts, cut from ordinary text by the model's tokenizer.

    `encode` and `decode` are the tokenizer's; a slice of token ids decoded to text does
    not always re-encode to as many tokens (merges across the cut), so the slice start
    moves until it does. Request `index` starts at its own offset, so prompts differ.
    """

    def __init__(self, encode: Callable[[str], Sequence[int]], decode: Callable[[Sequence[int]], str],
                 text: str, tries: int = 64):
        self.encode, self.decode, self.tries = encode, decode, tries
        self.ids = list(encode(text))
        if len(self.ids) < 8:
            raise ValueError("prompt source text is too short to cut prompts from")

    def _slice(self, start: int, n: int) -> list[int]:
        ids = self.ids
        while len(ids) < start + n:  # the text repeated as often as the prompt needs
            ids = ids + self.ids
        return ids[start:start + n]

    def prompt(self, n: int, index: int = 0) -> str:
        """A text of exactly `n` tokens; raises if no cut of the source text gives one."""
        base = (index * 7919) % len(self.ids)  # a prime stride: neighbours start far apart
        for k in range(self.tries):
            text = self.decode(self._slice((base + k) % len(self.ids), n))
            if len(self.encode(text)) == n:
                return text
        raise ValueError(f"no cut of the source text re-encodes to exactly {n} tokens")
