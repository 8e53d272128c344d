"""The KV cache of the sequences a rank is decoding together.

Sequences join (prefill) and leave (finished, cancelled) between decode steps. Rows are
left-padded to a common length; the attention mask hides the padding and position ids
count only real tokens, so a sequence's logits do not depend on its neighbours.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

Past = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def _left_pad(past: Past, mask: torch.Tensor, length: int) -> tuple[Past, torch.Tensor]:
    extra = length - mask.shape[1]
    if extra == 0:
        return past, mask
    past = tuple((F.pad(k, (0, 0, extra, 0)), F.pad(v, (0, 0, extra, 0))) for k, v in past)
    return past, F.pad(mask, (extra, 0))


class SequenceBatch:
    """Batch state every rank keeps identically, driven by the same step plans."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.seq_ids: list[str] = []
        self.past: Past | None = None
        self.mask: torch.Tensor | None = None  # [B, T], 1 = real token

    def __len__(self) -> int:
        return len(self.seq_ids)

    @torch.inference_mode()
    def evict(self, seq_ids: Sequence[str]) -> None:
        """Drop finished or cancelled rows, then padding columns no row needs."""
        gone = set(seq_ids)
        keep = [i for i, sid in enumerate(self.seq_ids) if sid not in gone]
        if len(keep) == len(self.seq_ids):
            return
        self.seq_ids = [self.seq_ids[i] for i in keep]
        if not keep:
            self.past, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(dim=0).int().argmax())  # first column some row still uses
        self.mask = mask[:, first:]
        self.past = tuple(
            (k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
            for k, v in self.past
        )

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token per row (in row order); returns next-token logits [B, V]."""
        if len(tokens) != len(self.seq_ids):
            raise ValueError(f"decode got {len(tokens)} tokens for {len(self.seq_ids)} sequences")
        input_ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
        mask = F.pad(self.mask, (0, 1), value=1)
        positions = mask.sum(dim=1, keepdim=True) - 1
        out = self.model(
            input_ids=input_ids, past_key_values=self.past, attention_mask=mask,
            position_ids=positions, use_cache=True,
        )
        self.past, self.mask = out.past_key_values, mask
        return out.logits[:, -1, :]

    @torch.inference_mode()
    def admit(self, seq_ids: Sequence[str], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prefill new sequences and append them as rows; returns their logits [n, V]."""
        length = max(len(p) for p in prompts)
        input_ids = torch.zeros((len(prompts), length), dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, length - len(prompt):] = torch.tensor(prompt)
            mask[row, length - len(prompt):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True
        )
        new_past = tuple((k, v) for k, v in out.past_key_values)
        if self.past is None:
            self.past, self.mask = new_past, mask
        else:
            width = max(self.mask.shape[1], length)
            old_past, old_mask = _left_pad(self.past, self.mask, width)
            new_past, mask = _left_pad(new_past, mask, width)
            self.past = tuple(
                (torch.cat([ok, nk]), torch.cat([ov, nv]))
                for (ok, ov), (nk, nv) in zip(old_past, new_past)
            )
            self.mask = torch.cat([old_mask, mask])
        self.seq_ids.extend(seq_ids)
        return out.logits[:, -1, :]
