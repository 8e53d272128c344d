"""The sequences a rank is decoding together, each in its own slot of a static KV cache.

Sequences join (prefill) and leave (finished, cancelled) between decode steps. The
decoding sequences always fill slots 0..n-1: a leaving sequence's slot is refilled by
moving the last one into it, so a decode step is "the first n slots", a shape CUDA graphs
can replay. Sequences whose prompts are still being prefilled, chunk by chunk, sit in
the slots right after them (n..n+m-1). Any of them may finish in a step (the scheduler
gives short prompts a share of the budget beside long ones): before the step's prefill,
those finishing are brought to the first of these slots, in the plan's order, by one
permutation of the part-filled prefixes, so they become decoding rows n.. without moving
afterwards. Every rank applies the same plans to the same state, so all ranks agree on
the row order.

`sampled` holds, per decoding slot, the token rank 0 sampled for it last step, on the
device: async scheduling decodes from it (rank 0 writes it, the others receive it by
broadcast), so it moves with the slots like the cache does.
"""

from __future__ import annotations

from typing import Collection, Sequence

import torch

from serve_tp.engine.decode_runner import DecodeRunner
from serve_tp.engine.plan import PrefillChunk
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
            self.sampled = torch.zeros(slots, dtype=torch.long, device=forward.device)
        self.forward = forward
        self.runner = DecodeRunner(forward, self.cache, cuda_graphs)
        self.seq_ids: list[str] = []  # decoding rows, slots 0..n-1
        self.lengths: list[int] = []  # tokens in each decoding slot's cache
        self.pending: list[str] = []  # prompts part-way through prefill, slots n..n+m-1
        self.pending_lengths: list[int] = []
        self._prompt_logits: dict[str, list[torch.Tensor]] = {}  # echo scoring across chunks

    def __len__(self) -> int:
        return len(self.seq_ids)

    @property
    def slots_used(self) -> int:
        return len(self.seq_ids) + len(self.pending)

    def capture(self) -> None:
        """Capture the decode graphs (a no-op on CPU). Every rank calls it at the same point."""
        self.runner.capture()

    def rows_after_evict(self, leaving: Sequence[str]) -> list[str]:
        return compact(self.seq_ids, leaving)[0]

    @torch.inference_mode()
    def evict(self, leaving: Sequence[str]) -> list[tuple[int, int]]:
        """Drop finished or cancelled sequences, decoding or prefilling, refilling decoding
        slots from the end and shifting the prefilling ones down behind them.

        Returns the decoding rows' (source, target) slot moves, for any per-slot state
        kept beside the cache (prefilling sequences have none yet).
        """
        first_pending = len(self.seq_ids)
        self.seq_ids, moves = compact(self.seq_ids, leaving)
        for source, target in moves:
            self.cache.move(source, target, self.lengths[source])
            self.lengths[target] = self.lengths[source]
            self.sampled[target] = self.sampled[source]
        del self.lengths[len(self.seq_ids):]
        kept = [(j, sid) for j, sid in enumerate(self.pending) if sid not in leaving]
        for new_index, (old_index, _) in enumerate(kept):  # targets never pass a source not yet moved
            source, target = first_pending + old_index, len(self.seq_ids) + new_index
            if source != target:
                self.cache.move(source, target, self.pending_lengths[old_index])
        self.pending_lengths = [self.pending_lengths[j] for j, _ in kept]
        self.pending = [sid for _, sid in kept]
        for sid in leaving:
            self._prompt_logits.pop(sid, None)
        return moves

    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token per row (in row order); returns next-token logits [B, V]."""
        if len(tokens) != len(self.seq_ids):
            raise ValueError(f"decode got {len(tokens)} tokens for {len(self.seq_ids)} sequences")
        logits = self.runner.run(tokens, self.lengths)
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def decode_sampled(self, rows: int) -> torch.Tensor:
        """Decode every row from `sampled`, the tokens sampled for it last step (async scheduling)."""
        if rows != len(self.seq_ids):
            raise ValueError(f"decode got {rows} sampled tokens for {len(self.seq_ids)} sequences")
        logits = self.runner.run_sampled(self.sampled[:rows], self.lengths)
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    @torch.inference_mode()
    def keep_sampled(self, tokens: torch.Tensor) -> None:
        """Rank 0: this step's sampled tokens [n], which the next step decodes from."""
        self.sampled[: tokens.shape[0]].copy_(tokens)

    def admit(
        self, seq_ids: Sequence[str], prompts: Sequence[Sequence[int]], keep_prompt_logits: Collection[str] = (),
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Prefill whole prompts at once (one final chunk each): see `prefill`."""
        chunks = [PrefillChunk(sid, tuple(p), 0, True) for sid, p in zip(seq_ids, prompts)]
        return self.prefill(chunks, keep_prompt_logits)

    def prefill(
        self, chunks: Sequence[PrefillChunk], keep_prompt_logits: Collection[str] = (),
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Prefill prompt chunks: a sequence's first chunk takes the next free slot.

        The sequences whose final chunk this is become decoding rows, in the order of their
        chunks; returns their last positions' logits [n, V] (in row order), and the logits
        of every prompt position [len, V] of those in `keep_prompt_logits` (echo scoring),
        gathered over all their chunks. Consecutive whole prompts are prefilled together,
        right-padded.
        """
        finished = [c.seq_id for c in chunks if c.final]
        self._place(chunks)
        self._bring_forward(finished)
        last = {}
        i = 0
        while i < len(chunks):
            whole = i
            while whole < len(chunks) and chunks[whole].start == 0 and chunks[whole].final:
                whole += 1
            if whole > i:
                last.update(self._prefill_whole(chunks[i:whole], keep_prompt_logits))
                i = whole
            else:
                last.update(self._prefill_part(chunks[i], keep_prompt_logits))
                i += 1
        n = len(finished)
        self.seq_ids.extend(self.pending[:n])
        self.lengths.extend(self.pending_lengths[:n])
        del self.pending[:n], self.pending_lengths[:n]
        prompt_logits = {sid: torch.cat(self._prompt_logits.pop(sid)) for sid in finished if sid in self._prompt_logits}
        if not finished:
            return torch.empty(0, 0), prompt_logits
        return torch.cat([last[sid] for sid in finished]), prompt_logits

    def _place(self, chunks: Sequence[PrefillChunk]) -> None:
        """New sequences take slots; every chunk must continue where its sequence stands.
        Checked before anything changes, so a refused step leaves the batch as it was."""
        new = [c.seq_id for c in chunks if c.start == 0 and c.seq_id not in self.pending]
        if self.slots_used + len(new) > self.cache.slots:
            raise ValueError(f"{len(new)} new sequences do not fit: {self.slots_used} of {self.cache.slots} slots used")
        done = dict(zip(self.pending, self.pending_lengths)) | {sid: 0 for sid in new}
        for chunk in chunks:
            end = chunk.start + len(chunk.tokens)
            if chunk.start != done.get(chunk.seq_id) or not chunk.tokens or end >= self.cache.max_len:
                raise ValueError(f"chunk [{chunk.start}, {end}) of {chunk.seq_id} does not continue its "
                                 f"{done.get(chunk.seq_id)} prefilled tokens within a cache of {self.cache.max_len}")
            done[chunk.seq_id] = end
        self.pending.extend(new)
        self.pending_lengths.extend(0 for _ in new)

    @torch.inference_mode()
    def _bring_forward(self, finishing: Sequence[str]) -> None:
        """Give the sequences finishing their prompts this step the first prefilling slots,
        in `finishing`'s order, the others keeping theirs after them. Only cached prefixes
        move (a new sequence has none), all in one gather, which permutes safely."""
        order = list(finishing) + [sid for sid in self.pending if sid not in finishing]
        if order == self.pending:
            return
        base = len(self.seq_ids)
        held = dict(zip(self.pending, self.pending_lengths))
        was = {sid: base + j for j, sid in enumerate(self.pending)}
        moved = [(sid, base + j) for j, sid in enumerate(order) if held[sid] and was[sid] != base + j]
        if moved:
            self.cache.move_many([was[sid] for sid, _ in moved], [target for _, target in moved],
                                 max(held[sid] for sid, _ in moved))
        self.pending = order
        self.pending_lengths = [held[sid] for sid in order]

    def _slot(self, seq_id: str) -> int:
        return len(self.seq_ids) + self.pending.index(seq_id)

    def _prefill_whole(self, chunks, keep) -> dict[str, torch.Tensor]:
        """Whole prompts (consecutive slots), batched as far as the padded budget allows."""
        last = {}
        prompts = [list(c.tokens) for c in chunks]
        first_slot = self._slot(chunks[0].seq_id)
        for start, end in prefill_chunks(prompts):
            ids = [c.seq_id for c in chunks[start:end]]
            rows = [row for row, sid in enumerate(ids) if sid in keep]
            logits, every = self.forward.prefill(self.cache, first_slot + start, prompts[start:end], rows)
            last.update(zip(ids, logits.split(1)))
            for row in rows:
                self._prompt_logits.setdefault(ids[row], []).append(every[row])
        for chunk in chunks:
            self.pending_lengths[self.pending.index(chunk.seq_id)] = len(chunk.tokens)
        return last

    def _prefill_part(self, chunk: PrefillChunk, keep) -> dict[str, torch.Tensor]:
        wanted = chunk.seq_id in keep
        logits, every = self.forward.prefill_chunk(self.cache, self._slot(chunk.seq_id), chunk.tokens,
                                                   chunk.start, chunk.final, wanted)
        if wanted:
            self._prompt_logits.setdefault(chunk.seq_id, []).append(every)
        self.pending_lengths[self.pending.index(chunk.seq_id)] += len(chunk.tokens)
        return {chunk.seq_id: logits} if chunk.final else {}
