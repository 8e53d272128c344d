"""Runs one StepPlan on this rank's batch: every rank, the same plans, in the same order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

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
    """Applies plans to a `SequenceBatch`; holds no scheduling state of its own.

    `share_sampled` (more than one rank) broadcasts a tensor from rank 0 to the others on
    the forward's process group (NCCL on cuda: in stream order, without the host waiting).
    A plan that decodes from the device calls it first, before its evictions move rows, so
    every rank holds rank 0's last sampled tokens in the same slots, then moves them alike.
    """

    def __init__(self, batch: SequenceBatch, keep_prompt_logits: bool,
                 share_sampled: Optional[Callable[[torch.Tensor], None]] = None):
        self.batch = batch
        self.keep_prompt_logits = keep_prompt_logits  # rank 0 only: the others never sample
        self.share_sampled = share_sampled
        self.shared = 0  # sampled-token broadcasts this rank took part in

    def run(self, plan: StepPlan) -> StepLogits:
        if plan.decode_from_device and self.share_sampled is not None:
            with torch.inference_mode():
                self.share_sampled(self.batch.sampled)
            self.shared += 1
        moves = self.batch.evict(plan.evict) if plan.evict else []
        parts, prompt_logits = [], {}
        if plan.decode_tokens:
            parts.append(self.batch.decode(plan.decode_tokens))
        elif plan.decode_from_device:
            parts.append(self.batch.decode_sampled(plan.decode_from_device))
        if plan.prefill:
            wanted = {c.seq_id for c in plan.prefill if c.prompt_logits} if self.keep_prompt_logits else set()
            last, prompt_logits = self.batch.prefill(plan.prefill, wanted)
            if last.shape[0]:
                parts.append(last)
        logits = None
        if parts:
            logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        return StepLogits(logits, moves, prompt_logits)
