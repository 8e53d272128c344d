"""Runs one StepPlan on this rank's batch: every rank, the same plans, in the same order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from serve_tp.engine.batch import SequenceBatch
from serve_tp.engine.plan import StepPlan


@dataclass
class StepLogits:
    """What a step computed, in row order: decoded rows first, then those whose prompt
    prefill ended this step (None when neither: only partial prompt chunks ran).

    `moves` are the (source, target) slot moves the evictions made, so that rank 0's
    per-slot sampler state can follow the KV cache. `prompt_logits` maps a sequence that
    finished its prefill and asked for them to the logits of every prompt position.
    """

    logits: Optional[torch.Tensor]  # [rows, V]
    moves: list[tuple[int, int]] = field(default_factory=list)
    prompt_logits: dict[str, torch.Tensor] = field(default_factory=dict)


class Executor:
    """Applies plans to a `SequenceBatch`; holds no scheduling state of its own."""

    def __init__(self, batch: SequenceBatch, keep_prompt_logits: bool):
        self.batch = batch
        self.keep_prompt_logits = keep_prompt_logits  # rank 0 only: the others never sample

    def run(self, plan: StepPlan) -> StepLogits:
        moves = self.batch.evict(plan.evict) if plan.evict else []
        parts, prompt_logits = [], {}
        if plan.decode_tokens:
            parts.append(self.batch.decode(plan.decode_tokens))
        if plan.prefill:
            wanted = {c.seq_id for c in plan.prefill if c.prompt_logits} if self.keep_prompt_logits else set()
            last, prompt_logits = self.batch.prefill(plan.prefill, wanted)
            if last.shape[0]:
                parts.append(last)
        logits = None
        if parts:
            logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        return StepLogits(logits, moves, prompt_logits)
