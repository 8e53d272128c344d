"""One sample step's host-side decisions, made once from the slots' host table.

The sampler skips what no live row uses (no sort without top-p, no penalties pass without
penalties, argmax only when every row is greedy). Those choices are read from a small
numpy table, never from the device, and gathered here into one frozen `SamplePlan`: the
device chain that follows is a pure function of (plan, logits, per-slot device state).
Two steps with equal plans launch the same kernels at the same shapes, which makes the
plan the key of the step's CUDA graph (sampling_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TOP_P_CANDIDATES = 64  # a top-p cut that ends among a row's 64 best tokens needs no radix select


@dataclass(frozen=True)
class SamplePlan:
    rows: int
    dtype: torch.dtype  # the logits' dtype (a graph's input buffer has it)
    biased: bool  # some row has a logit_bias
    banning: bool  # some row still bans EOS/stop ids (min_tokens)
    history: int  # history columns the penalties read; 0: no row is penalised
    any_greedy: bool
    all_greedy: bool  # then nothing below matters: argmax only
    scaled: bool  # some temperature is not 1
    cut: bool  # some sampled row has a top-k cut: it draws among its best candidates
    full: bool  # some sampled row has none: it draws over the whole vocabulary
    width: int  # candidates per row from one topk (0: none)
    cut_min_p: bool
    cut_top_p: bool
    full_min_p: bool
    full_top_p: bool
    sort_nucleus: bool  # full-vocabulary top-p from one batched sort (no host read)
    top_logprobs: int  # -1: no row wants logprobs; else the most alternatives a row asks for

    @property
    def reads_host(self) -> bool:
        """True when the chain waits for the device mid-way (the radix fallback's row list)."""
        return self.full_top_p and not self.sort_nucleus


def plan_step(host: np.ndarray, dtype: torch.dtype, *, vocab_size: int, biased: bool, banning: bool,
              history: int, avoid_host_sync: bool) -> SamplePlan:
    """The plan for rows `host` (the live slots' host table); the logit edits' flags come from SlotState."""
    greedy = host["greedy"]
    all_greedy = bool(greedy.all())
    if all_greedy:
        # Every draw flag off: an all-greedy batch has one plan whatever its rows' other params.
        draw = dict(scaled=False, cut=False, full=False, width=0, cut_min_p=False, cut_top_p=False,
                    full_min_p=False, full_top_p=False, sort_nucleus=False)
    else:
        sampled = ~greedy
        cut_rows = sampled & (host["top_k"] > 0)
        full_rows = sampled & (host["top_k"] == 0)
        cut, full = bool(cut_rows.any()), bool(full_rows.any())
        full_top_p = bool((host["top_p"][full_rows] < 1.0).any())
        width = int(host["top_k"][cut_rows].max()) if cut else 0
        if full_top_p and not avoid_host_sync:
            width = max(width, TOP_P_CANDIDATES)
        draw = dict(scaled=not bool(np.all(host["temperature"] == 1.0)), cut=cut, full=full,
                    width=min(width, vocab_size),
                    cut_min_p=bool((host["min_p"][cut_rows] > 0).any()),
                    cut_top_p=bool((host["top_p"][cut_rows] < 1.0).any()),
                    full_min_p=bool((host["min_p"][full_rows] > 0).any()),
                    full_top_p=full_top_p, sort_nucleus=full_top_p and avoid_host_sync)
    wanted = host["logprobs"]
    top_logprobs = min(int(wanted.max()), vocab_size) if (wanted >= 0).any() else -1
    return SamplePlan(rows=len(host), dtype=dtype, biased=biased, banning=banning, history=history,
                      any_greedy=bool(greedy.any()), all_greedy=all_greedy, top_logprobs=top_logprobs, **draw)
