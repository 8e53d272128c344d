"""StepPlan: what every rank does in one engine step, built by rank 0's scheduler.

Rank 0 broadcasts each plan on the CPU control group and every rank executes exactly the
plans it receives, in order, so the collectives inside the forward pass can never
interleave between requests. The plan carries token ids, not logits: only rank 0
samples, so every rank feeds the same tokens whatever its floating-point noise.
Long prompts arrive in chunks over several steps (chunked prefill), so a step's cost stays
bounded by its prefill token budget and running streams keep their pace.

With async scheduling (loop.py) rank 0 plans a step before it has read the previous step's
tokens: the plan then says only how many rows decode (`decode_from_device`), and every rank
feeds them the tokens rank 0 sampled last step, which it broadcasts on the device before the
step (batch.sampled). Every rank still feeds the same tokens, by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [start, start + len(tokens)) of one sequence, prefilled into its slot.

    A sequence's first chunk (start 0) gives it the next free slot after the decoding rows
    and the other prefilling ones; its `final` chunk makes it a decoding row, and only a
    final chunk yields logits (the first token's). Any prefilling sequence may finish in a
    step, not only the first (the scheduler shares the budget among prompts): those that
    do become decoding rows in the order of their chunks in the plan.
    """

    seq_id: str
    tokens: tuple[int, ...]
    start: int
    final: bool
    prompt_logits: bool = False  # rank 0 keeps the logits of every prompt position (echo scoring)


@dataclass
class StepPlan:
    """Evictions first, then one decode token per decoding row (in row order), then prefill chunks.

    A decoding row's token comes either from `decode_tokens` (host ints, synchronous
    scheduling) or, for the first `decode_from_device` rows, from the device buffer of the
    previous step's sampled tokens (async scheduling); a plan uses one or the other.
    """

    evict: list[str] = field(default_factory=list)
    decode_tokens: list[int] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    shutdown: bool = False
    decode_from_device: int = 0

    def __post_init__(self):
        if self.decode_tokens and self.decode_from_device:
            raise ValueError("a plan's decode tokens come from the host or from the device, not both")

    @property
    def decode_rows(self) -> int:
        return len(self.decode_tokens) + self.decode_from_device

    @property
    def has_work(self) -> bool:
        return bool(self.decode_rows or self.prefill)

    @property
    def rows(self) -> int:
        """Sequences that get a token in this step."""
        return self.decode_rows + sum(chunk.final for chunk in self.prefill)

    @property
    def prefill_tokens(self) -> int:
        return sum(len(chunk.tokens) for chunk in self.prefill)
