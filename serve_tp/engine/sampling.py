"""Per-sequence sampling inside a batch: greedy, temperature, top-k, top-p, seed.

Only rank 0 samples; it sends the chosen tokens to the other ranks with the next step,
so every rank feeds the same tokens whatever its floating-point noise.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from serve_tp.messages import SamplingParams


def make_generator(params: SamplingParams) -> Optional[torch.Generator]:
    """A private RNG per sequence, so a seed reproduces regardless of batch neighbours."""
    if params.temperature == 0:
        return None
    generator = torch.Generator(device="cpu")
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) what top-k and top-p exclude from a 1-D row of logits."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the top one stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop_sorted[0] = False  # the top token always survives, whatever top_p rounds to
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[Optional[torch.Generator]],
) -> list[int]:
    """One next token per row of `logits` [B, V], each row with its own params.

    Greedy rows are decided where the logits are (one small copy of B token ids); only
    the rows that sample travel to the host, where each sequence's own generator lives.
    """
    tokens = torch.argmax(logits, dim=-1).tolist()
    sampled = [row for row, p in enumerate(params) if p.temperature != 0]
    if not sampled:
        return tokens
    for row_logits, row in zip(logits[sampled].float().cpu(), sampled):
        p = params[row]
        filtered = filter_logits(row_logits / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(filtered, dim=-1)
        tokens[row] = int(torch.multinomial(probs, 1, generator=generators[row]).item())
    return tokens
