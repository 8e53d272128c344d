"""Rank 0's sampler: the whole batch's next tokens in one chain of batched tensor ops.

Only rank 0 samples; it sends the chosen tokens to the other ranks with the next step,
so every rank feeds the same tokens whatever its floating-point noise.

State lives per SLOT, mirroring the KV cache: live sequences fill slots 0..n-1 and `move`
repeats the batch's compaction moves, so a step samples `logits[n, V]` with a fixed number
of ops, no per-row Python loop and no host copy of the logits. The order is vLLM's:
logit_bias -> min_tokens ban -> penalties -> temperature -> min_p -> top_k/top_p -> draw.

Each row draws with one uniform from a counter-based hash of (its seed, tokens it has
generated), by inverse CDF, so a seeded sequence gets the same tokens whatever its batch
neighbours, its slot or the TP size. Rows with a top-k cut draw among their k best
candidates (best first); the others over the whole vocabulary in id order, with min_p and
top-p as a logit threshold. Which of the two a row takes depends only on its own params.
"""

from __future__ import annotations

import math
import secrets
from typing import Optional, Sequence

import torch

from serve_tp.engine.sampling_graphs import SamplerGraphs
from serve_tp.engine.sampling_ops import (blocked_inverse_cdf, counter_uniform, inverse_cdf, nucleus_size,
                                          nucleus_threshold, radix_nucleus_threshold, to_int64)
from serve_tp.engine.sampling_plan import SamplePlan, plan_step
from serve_tp.engine.sampling_state import SlotState
from serve_tp.messages import SamplingParams, TokenLogprob

NEG_INF = float("-inf")


def random_seed() -> int:
    """A seed for a request that gave none (the engine draws it; the sampler never does)."""
    return secrets.randbits(63)


class SampleResult:
    """One step's tokens (on the logits' device) and, when a row asked, raw-distribution logprobs."""

    def __init__(self, tokens: torch.Tensor, logprobs: Optional[torch.Tensor] = None,
                 top_ids: Optional[torch.Tensor] = None, top_logprobs: Optional[torch.Tensor] = None,
                 wanted: Optional[list[int]] = None):
        self.tokens = tokens  # [n] int64
        self.logprobs = logprobs  # [n] float32: log p(chosen token), -inf possible
        self.top_ids = top_ids  # [n, N] best first, N the most any row asked for
        self.top_logprobs = top_logprobs
        self.wanted = wanted  # per row: how many alternatives it asked for, -1 for none

    def token_logprobs(self) -> list[Optional[TokenLogprob]]:
        """Per row, its TokenLogprob or None if it did not ask; one host copy for the batch."""
        if self.logprobs is None:
            return [None] * self.tokens.shape[0]
        tokens, chosen = self.tokens.tolist(), _no_nan(self.logprobs).tolist()
        ids = self.top_ids.tolist() if self.top_ids is not None else None
        values = _no_nan(self.top_logprobs).tolist() if self.top_logprobs is not None else None
        entries: list[Optional[TokenLogprob]] = []
        for row, n in enumerate(self.wanted):
            top = tuple(zip(ids[row][:n], values[row][:n])) if n > 0 else ()
            entries.append(TokenLogprob(tokens[row], chosen[row], top) if n >= 0 else None)
        return entries


def _no_nan(values: torch.Tensor) -> torch.Tensor:
    """NaN (a NaN logits row) reported as -inf: JSON has no NaN and clients choke on it."""
    return values.masked_fill(values.isnan(), NEG_INF)


def prompt_logprobs(logits_all: torch.Tensor, prompt_ids: Sequence[int], n: int) -> list[Optional[TokenLogprob]]:
    """Each prompt token's logprob under the raw distribution, with the `n` best alternatives.

    `logits_all[t]` predicts token t + 1 (rows past len(prompt_ids) - 1 are ignored); the
    first token has nothing before it, so its entry is None (echo scoring, as OpenAI).
    """
    scored = len(prompt_ids) - 1
    if scored < 1:
        return [None] * len(prompt_ids)
    if logits_all.shape[0] < scored:
        raise ValueError(f"prompt_logprobs got {logits_all.shape[0]} logits rows for {len(prompt_ids)} prompt tokens")
    with torch.inference_mode():
        raw = torch.log_softmax(logits_all[:scored].float(), dim=-1)
        targets = torch.tensor(prompt_ids[1:], device=raw.device)
        chosen = _no_nan(raw.gather(1, targets[:, None]).squeeze(1)).tolist()
        n = min(n, raw.shape[1])
        if n > 0:
            top_values, top_ids = raw.topk(n, dim=-1)
            top = [tuple(zip(i, v)) for i, v in zip(top_ids.tolist(), _no_nan(top_values).tolist())]
        else:
            top = [()] * scored
    return [None] + [TokenLogprob(int(t), lp, alt) for t, lp, alt in zip(prompt_ids[1:], chosen, top)]


class Sampler:
    """Per-slot sampling state for a batch of at most `slots` sequences (rank 0 only).

    The engine calls `admit` when a sequence takes a slot, `move` for every compaction
    move the batch makes, and `sample` once per step with the logits of slots 0..n-1.

    `avoid_host_sync` (default: on CUDA) finds every top-p cut from one batched sort, so a
    step never waits for the device; off, a cut that ends among a row's 64 best tokens is
    read from them, and only the rows where it does not (one small device-to-host read) pay
    for a radix select, which is cheaper than sorting where the host and the device are one.

    `graphs` (CUDA only) replays each step's device chain as a CUDA graph, one per
    `SamplePlan`, captured the second time a plan comes (sampling_graphs.py): a sampled
    step is some 30-100 small kernels, launch-bound at small batches. `static_shapes`
    (default: with graphs) plans every step at the fixed shapes a graph needs; tests turn
    it on without graphs to check it changes no token.
    """

    def __init__(self, slots: int, vocab_size: int, device, eos_token_id: Optional[int],
                 max_logprobs: int, context_length: int, avoid_host_sync: Optional[bool] = None,
                 sampleable_vocab: Optional[int] = None, graphs: bool = False,
                 static_shapes: Optional[bool] = None):
        device = torch.device(device)
        self.state = SlotState(slots, vocab_size, device, context_length)
        self.slots, self.vocab_size = slots, vocab_size
        self.eos_token_id = eos_token_id
        self.max_logprobs = max_logprobs
        self.avoid_host_sync = device.type == "cuda" if avoid_host_sync is None else avoid_host_sync
        # Ids past the tokenizer (a padded embedding) are masked out of every draw, greedy included.
        self.sampleable = sampleable_vocab if sampleable_vocab and sampleable_vocab < vocab_size else None
        self.graphs = SamplerGraphs(self.run_plan, self.state.layout) if graphs and device.type == "cuda" else None
        self.static_shapes = self.graphs is not None if static_shapes is None else static_shapes
        self._plan_key: Optional[tuple] = None
        self._plans: dict[tuple, SamplePlan] = {}
        self._edit_needs = (False, False, False)

    # admit and move run in inference mode too: state made in it cannot change outside it.
    @torch.inference_mode()
    def admit(self, slot: int, params: SamplingParams, seed: int, prompt_ids: Sequence[int]) -> None:
        """Give `slot` to a new sequence; `seed` is the request's, or `random_seed()` when it gave none."""
        self._check(params)
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside the sampler's {self.slots} slots")
        bans: list[int] = []
        if params.min_tokens > 0:
            # vLLM bans EOS (even with ignore_eos) and the stop ids until min_tokens are out;
            # an id past the vocabulary can never be drawn, so there is nothing to ban.
            candidates = ([self.eos_token_id] if self.eos_token_id is not None else []) + list(params.stop_token_ids)
            bans = sorted({t for t in candidates if 0 <= t < self.vocab_size})
        self.state.admit(slot, params, to_int64(seed), prompt_ids, bans)

    @torch.inference_mode()
    def move(self, source: int, target: int) -> None:
        """The sequence in `source` now lives in `target` (what `batch.compact` moved)."""
        self.state.move(source, target)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor) -> SampleResult:
        """Next token for each of slots 0..n-1 from `logits` [n, V]; advances their positions.

        With graphs on, the returned tensors are fresh copies: they stay valid after later steps.
        """
        n, width = logits.shape
        if n > self.slots or width != self.vocab_size:
            raise ValueError(f"sample got logits {tuple(logits.shape)} for {self.slots} slots x {self.vocab_size} tokens")
        if n == 0:
            return SampleResult(torch.empty(0, dtype=torch.int64, device=logits.device))
        plan = self.plan(n, logits.dtype)
        outputs = self.graphs.run(plan, logits) if self.graphs is not None else None
        if outputs is None:
            outputs = self.run_plan(plan, logits)
        self.state.advance_host(n)
        tokens, chosen, top_ids, top_values = outputs
        if chosen is None:
            return SampleResult(tokens)
        return SampleResult(tokens, chosen, top_ids, top_values, self.state.host["logprobs"][:n].tolist())

    def plan(self, n: int, dtype: torch.dtype) -> SamplePlan:
        """This step's host decisions for slots 0..n-1 (fixed shapes when `static_shapes`).

        Made from the host table once per (rows, params) and reused until an admit or a
        move: only the min_tokens ban and the history length change from step to step.
        """
        key = (n, dtype, self.state.version)
        if key != self._plan_key or len(self._plans) > 64:  # eager penalties: a plan per history length
            self._plan_key, self._plans = key, {}
            self._edit_needs = self.state.edit_needs(n)
        edits = self.state.edits(n, full_history=self.static_shapes, needs=self._edit_needs)
        plan = self._plans.get(edits)
        if plan is None:
            biased, banning, history = edits
            plan = self._plans[edits] = plan_step(self.state.host[:n], dtype, vocab_size=self.vocab_size,
                                                  biased=biased, banning=banning, history=history,
                                                  avoid_host_sync=self.avoid_host_sync)
        return plan

    def run_plan(self, plan: SamplePlan, logits: torch.Tensor) -> tuple:
        """The step's device chain: (tokens, logprob of each, top ids, top logprobs), Nones where
        no row asked; advances the slots' device state. Reads nothing back from the device
        unless `plan.reads_host`, so a CUDA graph can capture it."""
        n = plan.rows
        raw = logits.float()
        if self.sampleable is not None:
            raw = raw.clone() if raw is logits else raw
            raw[:, self.sampleable:] = NEG_INF
        processed = self.state.process(raw, n, (plan.biased, plan.banning, plan.history))
        top = processed.argmax(dim=-1) if plan.any_greedy else None
        if plan.all_greedy:
            tokens = top
        else:
            tokens = self._draw(plan, processed, n)
            if top is not None:
                tokens = torch.where(self.state.greedy(n), top, tokens)
        self.state.advance(tokens, n, penalised=plan.history > 0)
        return (tokens,) + self._logprobs(plan, raw, tokens)

    def _draw(self, plan: SamplePlan, logits: torch.Tensor, n: int) -> torch.Tensor:
        """Sampled rows' tokens (greedy rows get a throwaway draw at temperature 1)."""
        scaled = logits / self.state.column("temperature", n)[:, None] if plan.scaled else logits
        uniforms = counter_uniform(self.state.column("seed", n), self.state.column("generated", n))
        candidates = torch.topk(scaled, plan.width, dim=-1) if plan.width else None
        if not plan.full:
            return self._draw_among_candidates(plan, candidates, uniforms, n)
        drawn = self._draw_over_vocabulary(plan, scaled, candidates, uniforms, n)
        if plan.cut:
            among = self._draw_among_candidates(plan, candidates, uniforms, n)
            drawn = torch.where(self.state.column("top_k", n) > 0, among, drawn)
        return drawn

    def _draw_among_candidates(self, plan: SamplePlan, candidates, uniforms: torch.Tensor, n: int) -> torch.Tensor:
        """Rows with a top-k cut: min_p, top-k and top-p keep a best-first prefix of the candidates."""
        values, ids = candidates
        positions = torch.arange(values.shape[1], device=values.device)
        keep = positions < self.state.column("top_k", n)[:, None]
        if plan.cut_min_p:
            keep &= values >= values[:, :1] + self.state.column("log_min_p", n)[:, None]
        keep[:, 0] = True  # the best token always survives
        weights = torch.where(keep, torch.exp(values - values[:, :1]), 0.0)
        cdf = weights.cumsum(-1)
        total = None
        if plan.cut_top_p:
            # top-p within what top-k and min_p kept (vLLM renormalises after each cut):
            # draw from the nucleus prefix by stopping the CDF at its last token.
            size = nucleus_size(weights, self.state.column("top_p", n) * cdf[:, -1])
            total = cdf.gather(1, (size - 1)[:, None])
        column, ok = inverse_cdf(cdf, weights, uniforms, total)
        column = torch.where(ok, column, 0)
        return ids.gather(1, column[:, None]).squeeze(1)

    def _draw_over_vocabulary(self, plan: SamplePlan, scaled, candidates, uniforms, n: int) -> torch.Tensor:
        """Rows without a top-k cut: min_p and top-p become one logit threshold per row."""
        probs = torch.softmax(scaled, dim=-1)
        threshold = None
        if plan.full_min_p:
            threshold = scaled.amax(dim=-1) + self.state.column("log_min_p", n)
        if plan.full_top_p:
            # top-p over what min_p kept, renormalised (vLLM's order).
            kept = probs if threshold is None else torch.where(scaled >= threshold[:, None], probs, 0.0)
            target = self.state.column("top_p", n) * kept.sum(-1)
            nucleus = self._nucleus_threshold(plan, scaled, kept, target, candidates, n)
            threshold = nucleus if threshold is None else torch.maximum(threshold, nucleus)
        if threshold is not None:
            probs = torch.where(scaled >= threshold[:, None], probs, 0.0)
        return blocked_inverse_cdf(probs, uniforms)

    def _nucleus_threshold(self, plan: SamplePlan, scaled, kept, target, candidates, n: int) -> torch.Tensor:
        """Per row, the lowest logit the top-p nucleus keeps (-inf for rows without top-p)."""
        wanted = self.state.nucleus_rows(n)
        if plan.sort_nucleus:
            # One batched sort of the rows: a few fused kernels on a GPU, where the radix
            # select's three scatter-add histograms serialise on their atomics (measured:
            # ~1.6 ms a step at batch 1 on H200, top_p 0.95).
            values, order = torch.sort(scaled, dim=-1, descending=True)
            threshold, _ = nucleus_threshold(values, kept.gather(1, order), target, complete=True)
        else:
            values, ids = candidates
            threshold, exact = nucleus_threshold(values, kept.gather(1, ids), target,
                                                 complete=values.shape[1] == self.vocab_size)
            rows = (wanted & ~exact).nonzero().squeeze(1)
            if rows.numel():
                threshold[rows] = radix_nucleus_threshold(scaled[rows], kept[rows], target[rows])
        return torch.where(wanted, threshold, NEG_INF)

    def _logprobs(self, plan: SamplePlan, raw: torch.Tensor, tokens: torch.Tensor) -> tuple:
        """Logprobs of the RAW distribution (before bias, penalties and temperature), as vLLM reports."""
        if plan.top_logprobs < 0:
            return None, None, None
        logprobs = torch.log_softmax(raw, dim=-1)
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        if plan.top_logprobs == 0:
            return chosen, None, None
        top_values, top_ids = logprobs.topk(plan.top_logprobs, dim=-1)
        return chosen, top_ids, top_values

    def _check(self, p: SamplingParams) -> None:
        """Refuse what would break a batched op; the API has refused it already with a 400."""
        problems = []
        if not (p.temperature >= 0 and math.isfinite(p.temperature)):
            problems.append(f"temperature={p.temperature}")
        if not 0 < p.top_p <= 1:
            problems.append(f"top_p={p.top_p}")
        if not 0 <= p.min_p <= 1:
            problems.append(f"min_p={p.min_p}")
        if p.top_k < -1:
            problems.append(f"top_k={p.top_k}")
        if not (p.repetition_penalty > 0 and math.isfinite(p.repetition_penalty)):
            problems.append(f"repetition_penalty={p.repetition_penalty}")
        if not (math.isfinite(p.presence_penalty) and math.isfinite(p.frequency_penalty)):
            problems.append(f"presence_penalty={p.presence_penalty}, frequency_penalty={p.frequency_penalty}")
        if any(not (0 <= t < self.vocab_size and math.isfinite(b)) for t, b in p.logit_bias):
            problems.append(f"logit_bias (ids must be in [0, {self.vocab_size}), biases finite)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(p, name)
            if value is not None and not 0 <= value <= self.max_logprobs:
                problems.append(f"{name}={value} (at most {self.max_logprobs})")
        if problems:
            raise ValueError("invalid sampling params: " + "; ".join(problems))
