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


class _Result:
    def __init__(self, tokens):
        self.tokens = tokens
        self.has_logprobs = False


class Sampler:
    """Interim adapter over sample_tokens (replaced by the batched device sampler)."""

    def __init__(self, slots, vocab_size, device, eos_token_id=None, max_logprobs=20):
        self.params = [None] * slots
        self.generators = [None] * slots
        self.count = 0

    def admit(self, slot, params, seed, prompt_ids):
        self.params[slot] = params
        self.generators[slot] = make_generator(params)

    def move(self, source, target):
        self.params[target] = self.params[source]
        self.generators[target] = self.generators[source]

    def sample(self, logits):
        n = logits.shape[0]
        return _Result(torch.tensor(sample_tokens(logits, self.params[:n], self.generators[:n])))
