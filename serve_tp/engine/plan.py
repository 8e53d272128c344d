"""StepPlan: what every rank does in one engine step, built by rank 0's scheduler.

Rank 0 broadcasts each plan on the CPU control group and every rank executes exactly the
plans it receives, in order, so the collectives inside the forward pass can never
interleave between requests. The plan carries token ids, not logits: only rank 0
samples, so every rank feeds the same tokens whatever its floating-point noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Admission:
    """A sequence joining the batch: its prompt is prefilled into the next free slot."""

    seq_id: str
    prompt_ids: tuple[int, ...]
    prompt_logits: bool = False  # rank 0 keeps the logits of every prompt position (echo scoring)


@dataclass
class StepPlan:
    """Evictions first, then one decode token per remaining row (in row order), then admissions."""

    evict: list[str] = field(default_factory=list)
    decode_tokens: list[int] = field(default_factory=list)
    admit: list[Admission] = field(default_factory=list)
    shutdown: bool = False

    @property
    def has_work(self) -> bool:
        return bool(self.decode_tokens or self.admit)

    @property
    def rows(self) -> int:
        """Sequences that get a token in this step."""
        return len(self.decode_tokens) + len(self.admit)
