"""The sequences a rank is decoding together, each in its own slot of a static KV cache.

Sequences join (prefill) and leave (finished, cancelled) between decode steps. The live
sequences always fill slots 0..n-1: a leaving sequence's slot is refilled by moving the
last one into it, so a decode step is "the first n slots", a shape CUDA graphs can replay.
Every rank applies the same plans to the same state, so all ranks agree on the row order.
"""

from __future__ import annotations

from typing import Collection, Sequence

import torch

from serve_tp.engine.decode_runner import DecodeRunner
from serve_tp.model.forward import GPT2Forward

PREFILL_TOKENS = 8192  # padded prompt tokens per prefill pass; bounds its activations


def compact(seq_ids: Sequence[str], leaving: Sequence[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """Row order after `leaving` go, and the (source, target) slot moves that make it."""
    rows = list(seq_ids)
    moves = []
    for seq_id in leaving:
        if seq_id not in rows:
            continue
        target, source = rows.index(seq_id), len(rows) - 1
        if target != source:
            rows[target] = rows[source]
            moves.append((source, target))
        rows.pop()
    return rows, moves


def prefill_chunks(prompts: Sequence[Sequence[int]], budget: int = PREFILL_TOKENS) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive prompts whose right-padded size stays within `budget`."""
    chunks, start, longest = [], 0, 0
    for i, prompt in enumerate(prompts):
        wider = max(longest, len(prompt))
        if i > start and wider * (i - start + 1) > budget:
            chunks.append((start, i))
            start, wider = i, len(prompt)
        longest = wider
    chunks.append((start, len(prompts)))
    return chunks


class SequenceBatch:
    """Batch state every rank keeps identically, driven by the same step plans."""

    def __init__(self, forward: GPT2Forward, slots: int, max_len: int, cuda_graphs: bool = True):
        with torch.inference_mode():
            self.cache = forward.new_cache(slots, max_len)
        self.forward = forward
        self.runner = DecodeRunner(forward, self.cache, cuda_graphs)
        self.seq_ids: list[str] = []
        self.lengths: list[int] = []  # tokens in each slot's cache

    def __len__(self) -> int:
        return len(self.seq_ids)

    def capture(self) -> None:
        """Capture the decode graphs (a no-op on CPU). Every rank calls it at the same point."""
        self.runner.capture()

    def rows_after_evict(self, leaving: Sequence[str]) -> list[str]:
        return compact(self.seq_ids, leaving)[0]

    @torch.inference_mode()
    def evict(self, leaving: Sequence[str]) -> list[tuple[int, int]]:
        """Drop finished or cancelled rows, refilling their slots from the end.

        Returns the (source, target) slot moves, for any per-slot state kept beside the cache.
        """
        self.seq_ids, moves = compact(self.seq_ids, leaving)
        for source, target in moves:
            self.cache.move(source, target, self.lengths[source])
            self.lengths[target] = self.lengths[source]
        del self.lengths[len(self.seq_ids):]
        return moves

    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token per row (in row order); returns next-token logits [B, V]."""
        if len(tokens) != len(self.seq_ids):
            raise ValueError(f"decode got {len(tokens)} tokens for {len(self.seq_ids)} sequences")
        logits = self.runner.run(tokens, self.lengths)
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def admit(
        self, seq_ids: Sequence[str], prompts: Sequence[Sequence[int]], keep_prompt_logits: Collection[str] = (),
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Prefill new sequences into the next free slots.

        Returns their last positions' logits [n, V], and the logits of every prompt
        position [len, V] for the sequences in `keep_prompt_logits` (echo scoring).
        """
        if len(self) + len(prompts) > self.cache.slots:
            raise ValueError(f"{len(prompts)} new sequences do not fit: {len(self)} of {self.cache.slots} slots used")
        too_long = [len(p) for p in prompts if not 0 < len(p) < self.cache.max_len]
        if too_long:
            raise ValueError(f"prompt of {too_long[0]} tokens does not fit a cache of {self.cache.max_len}")
        logits, prompt_logits = [], {}
        for start, end in prefill_chunks(prompts):
            keep = [row for row in range(end - start) if seq_ids[start + row] in keep_prompt_logits]
            last, every = self.forward.prefill(self.cache, len(self) + start, prompts[start:end], keep)
            logits.append(last)
            prompt_logits.update({seq_ids[start + row]: every[row] for row in keep})
        self.seq_ids.extend(seq_ids)
        self.lengths.extend(len(p) for p in prompts)
        return torch.cat(logits), prompt_logits
