"""What the sampler remembers per slot, on the device, and the logit edits that need it.

Every per-row parameter is a column of one float and one int table [slots, k], so `move`
is two row copies and `sample` reads per-row tensors without any host-to-device copy. The
same facts live in a small host array, so a step can skip what no live row uses without
a device-to-host read.

logit_bias, the min_tokens ban and the penalties touch few tokens per row, so they are
gathers and scatters over per-slot id tables instead of passes over [n, V]: bias ids,
ban ids, and the history (prompt then generated ids, for repetition_penalty) beside
per-slot output counts [slots, V] (frequency/presence). Each table is allocated when the
first request that needs it arrives: a batch where no request uses them pays nothing.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from serve_tp.messages import SamplingParams
from serve_tp.model.host_copy import upload

FLOAT_COLUMNS = ("temperature", "top_p", "log_min_p", "presence", "frequency", "repetition")
INT_COLUMNS = ("top_k", "seed", "generated", "min_tokens", "prompt_len", "greedy")
HOST_FIELDS = [
    ("greedy", bool), ("temperature", np.float64), ("top_k", np.int64), ("top_p", np.float64),
    ("min_p", np.float64), ("penalised", bool), ("biased", bool), ("min_tokens", np.int64),
    ("generated", np.int64), ("prompt_len", np.int64), ("logprobs", np.int64),
]


def _widen(table: Optional[torch.Tensor], width: int, *, slots: int, dtype, device,
           pad_with_first: bool) -> torch.Tensor:
    """`table` with at least `width` columns (doubling); new columns repeat column 0 if asked."""
    old = 0 if table is None else table.shape[1]
    if old >= width:
        return table
    wider = torch.zeros(slots, max(width, 2 * old, 8), dtype=dtype, device=device)
    if table is not None:
        wider[:, :old] = table
        if pad_with_first:
            wider[:, old:] = table[:, :1]
    return wider


class SlotState:
    """Per-slot sampling parameters and token history for slots 0..slots-1."""

    def __init__(self, slots: int, vocab_size: int, device: torch.device, context_length: int):
        self.slots, self.vocab_size, self.device = slots, vocab_size, device
        self.context_length = context_length
        self.floats = torch.zeros(slots, len(FLOAT_COLUMNS), dtype=torch.float32, device=device)
        self.ints = torch.zeros(slots, len(INT_COLUMNS), dtype=torch.int64, device=device)
        self.host = np.zeros(slots, dtype=HOST_FIELDS)
        self.host["temperature"] = 1.0
        self.host["top_p"] = 1.0
        self.host["logprobs"] = -1
        self.bias_ids: Optional[torch.Tensor] = None  # [slots, B]; unused columns carry bias 0
        self.bias_values: Optional[torch.Tensor] = None
        self.ban_ids: Optional[torch.Tensor] = None  # [slots, B]; unused columns repeat column 0
        self.history: Optional[torch.Tensor] = None  # [slots, context_length] prompt then output ids
        self.counts: Optional[torch.Tensor] = None  # [slots, V] how often each id was generated
        self.version = 0  # bumped whenever a slot's params change (admit, move): cached plans stay valid until then

    # ---- per-row views ----
    def column(self, name: str, n: int) -> torch.Tensor:
        if name in FLOAT_COLUMNS:
            return self.floats[:n, FLOAT_COLUMNS.index(name)]
        return self.ints[:n, INT_COLUMNS.index(name)]

    def greedy(self, n: int) -> torch.Tensor:
        return self.column("greedy", n) != 0

    def nucleus_rows(self, n: int) -> torch.Tensor:
        """Sampled rows whose top-p cut is a threshold over the whole vocabulary (no top-k)."""
        return (self.column("top_p", n) < 1.0) & (self.column("top_k", n) == 0) & ~self.greedy(n)

    # ---- slot lifecycle ----
    def admit(self, slot: int, p: SamplingParams, seed: int, prompt_ids: Sequence[int], bans: Sequence[int]) -> None:
        self.version += 1
        greedy = p.temperature == 0
        top_k = p.top_k if 0 < p.top_k < self.vocab_size else 0
        min_tokens = p.min_tokens if bans else 0
        if p.penalised and not 0 < len(prompt_ids) <= self.context_length:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens does not fit a history of {self.context_length}")
        log_min_p = math.log(p.min_p) if p.min_p > 0 else float("-inf")
        self.floats[slot] = upload([1.0 if greedy else p.temperature, p.top_p, log_min_p, p.presence_penalty,
                                    p.frequency_penalty, p.repetition_penalty], torch.float32, self.device)
        self.ints[slot] = upload([top_k, seed, 0, min_tokens, len(prompt_ids), int(greedy)], torch.int64, self.device)
        self.host[slot] = (greedy, 1.0 if greedy else p.temperature, top_k, p.top_p, p.min_p, p.penalised,
                           bool(p.logit_bias), min_tokens, 0, len(prompt_ids),
                           -1 if p.logprobs is None else p.logprobs)
        self._admit_bias(slot, dict(p.logit_bias))
        if bans:
            self.ban_ids = _widen(self.ban_ids, len(bans), slots=self.slots, dtype=torch.int64,
                                  device=self.device, pad_with_first=True)
            row = list(bans) + [bans[0]] * (self.ban_ids.shape[1] - len(bans))
            self.ban_ids[slot] = upload(row, torch.int64, self.device)
        if p.penalised:
            if self.history is None:
                self.history = torch.zeros(self.slots, self.context_length, dtype=torch.int64, device=self.device)
                self.counts = torch.zeros(self.slots, self.vocab_size, dtype=torch.float32, device=self.device)
            self.history[slot, :len(prompt_ids)] = upload(list(prompt_ids), torch.int64, self.device)
            self.counts[slot] = 0

    def _admit_bias(self, slot: int, bias: dict[int, float]) -> None:
        if not bias:
            if self.bias_values is not None:
                self.bias_values[slot] = 0  # a biased batch adds every row's bias row
            return
        kwargs = dict(slots=self.slots, device=self.device, pad_with_first=False)
        self.bias_ids = _widen(self.bias_ids, len(bias), dtype=torch.int64, **kwargs)
        self.bias_values = _widen(self.bias_values, len(bias), dtype=torch.float32, **kwargs)
        pad = self.bias_ids.shape[1] - len(bias)
        self.bias_ids[slot] = upload(list(bias) + [0] * pad, torch.int64, self.device)
        self.bias_values[slot] = upload(list(bias.values()) + [0.0] * pad, torch.float32, self.device)

    def move(self, source: int, target: int) -> None:
        self.version += 1
        for table in (self.floats, self.ints, self.bias_ids, self.bias_values, self.ban_ids, self.history, self.counts):
            if table is not None:
                table[target] = table[source]
        self.host[target] = self.host[source]

    # ---- per step ----
    def layout(self) -> tuple[int, ...]:
        """Where the optional tables live: a CUDA graph that read them is stale once one moves."""
        tables = (self.bias_ids, self.bias_values, self.ban_ids, self.history, self.counts)
        return tuple(0 if t is None else t.data_ptr() for t in tables)

    def edit_needs(self, n: int) -> tuple[bool, bool, bool]:
        """(biased, may ban, penalised) for rows 0..n-1: fixed until the next admit or move."""
        host = self.host[:n]
        return (self.bias_ids is not None and bool(host["biased"].any()),
                self.ban_ids is not None and bool((host["min_tokens"] > 0).any()),
                self.history is not None and bool(host["penalised"].any()))

    def edits(self, n: int, full_history: bool = False,
              needs: Optional[tuple[bool, bool, bool]] = None) -> tuple[bool, bool, int]:
        """(biased, banning, history columns) that rows 0..n-1 need from `process` this step.

        The penalties read the history up to the longest row; `full_history` reads all of
        it instead (a fixed shape for a CUDA graph; the extra columns repeat column 0, so
        the result is the same).
        """
        biased, may_ban, penalised = self.edit_needs(n) if needs is None else needs
        host = self.host[:n]
        banning = may_ban and bool((host["generated"] < host["min_tokens"]).any())
        history = 0
        if penalised:
            known = self.context_length if full_history else int((host["prompt_len"] + host["generated"]).max())
            history = min(known, self.context_length)
        return biased, banning, history

    def process(self, logits: torch.Tensor, n: int, edits: Optional[tuple[bool, bool, int]] = None) -> torch.Tensor:
        """logit_bias, then the min_tokens ban, then the penalties; `logits` itself is left as is."""
        biased, banning, history = self.edits(n) if edits is None else edits
        if not (biased or banning or history):
            return logits
        logits = logits.clone()
        if biased:
            logits.scatter_add_(1, self.bias_ids[:n], self.bias_values[:n])
        if banning:
            ids = self.ban_ids[:n]
            active = (self.column("generated", n) < self.column("min_tokens", n))[:, None]
            logits.scatter_(1, ids, torch.where(active, float("-inf"), logits.gather(1, ids)))
        if history:
            self._penalise(logits, n, history)
        return logits

    def _penalise(self, logits: torch.Tensor, n: int, width: int) -> None:
        """repetition over prompt and output ids, then frequency and presence over output counts.

        Each row's ids are gathered, penalised and scattered back; an id seen twice gets the
        same value twice. Rows without penalties (1, 0, 0) write back what they read.
        """
        length = self.column("prompt_len", n) + self.column("generated", n)
        ids = self.history[:n, :width]
        # Columns past a row's length hold another sequence's ids: point them at its first.
        ids = torch.where(torch.arange(width, device=self.device) < length[:, None], ids, ids[:, :1])
        values = logits.gather(1, ids)
        repetition = self.column("repetition", n)[:, None]
        values = torch.where(values > 0, values / repetition, values * repetition)
        counts = self.counts[:n].gather(1, ids)
        values = (values - self.column("frequency", n)[:, None] * counts
                  - self.column("presence", n)[:, None] * (counts > 0))
        logits.scatter_(1, ids, values)

    def advance(self, tokens: torch.Tensor, n: int, penalised: bool) -> None:
        """Record each row's new token on the device: one more generated, and in the history
        if penalties need it. Device ops only (a CUDA graph replays them); `advance_host` follows."""
        if penalised:
            position = (self.column("prompt_len", n) + self.column("generated", n)).clamp(max=self.context_length - 1)
            self.history[:n].scatter_(1, position[:, None], tokens[:, None])
            self.counts[:n].scatter_add_(1, tokens[:, None], torch.ones(n, 1, device=self.device))
        self.ints[:n, INT_COLUMNS.index("generated")] += 1

    def advance_host(self, n: int) -> None:
        self.host["generated"][:n] += 1
