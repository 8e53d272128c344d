"""Batched sampling maths over [rows, width] tensors: counter-based noise, inverse CDF, nucleus cut.

Pure functions of tensors, with no state and no host copies, so the sampler can chain them
over the whole batch. Each row is independent of the others: a NaN row stays a NaN row.
"""

from __future__ import annotations

from typing import Optional

import torch

_MASK64 = (1 << 64) - 1


def to_int64(value: int) -> int:
    """`value` mod 2**64 as a signed int64, the only integer type torch has for 64 bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64's constants (Steele, Lea & Flood 2014), as the signed int64 torch stores.
_GOLDEN = to_int64(0x9E3779B97F4A7C15)
_MIX1 = to_int64(0xBF58476D1CE4E5B9)
_MIX2 = to_int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's `>>` is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def counter_uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1) per row: the `position`-th output of splitmix64 seeded with `seed`.

    A counter-based generator instead of a stream: the value depends only on (seed,
    position), never on which rows share the batch, their order or earlier draws.
    int64 multiplication wraps, which is the modular arithmetic splitmix64 wants.
    24 bits, float32's mantissa: the draw is compared with float32 cumulative sums.
    """
    z = seeds + (positions + 1) * _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 40).to(torch.float32) * (2.0 ** -24)


def inverse_cdf(cdf: torch.Tensor, weights: torch.Tensor, uniforms: torch.Tensor,
                total: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Column drawn per row with probability weights/total, from one uniform per row.

    `cdf` is `weights.cumsum(-1)`; `total` ([rows, 1], default its last column) may be an
    earlier column of it, which draws from that prefix only. Returns (column, ok): `ok` is
    False where the column has no weight, which only a NaN row or a cumulative sum that
    rounding made non-monotonic can produce; the caller replaces those by a safe column.
    """
    if total is None:
        total = cdf[:, -1:]
    # u < 1, but u * total can round up to total; the float just below keeps the
    # target inside the last weighted column.
    target = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    column = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
    ok = weights.gather(1, column) > 0
    return column.squeeze(1), ok.squeeze(1)


def exclusive_cumsum(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inclusive, exclusive) running sums along rows; the exclusive one starts at exactly 0."""
    cdf = weights.cumsum(-1)
    return cdf, torch.nn.functional.pad(cdf[:, :-1], (1, 0))


def nucleus_size(weights: torch.Tensor, top_p: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """How many of the best-first `weights` the top-p nucleus keeps, at least 1.

    A token stays while the mass before it is below top_p * mass (the smallest set whose
    mass reaches top_p); the best one stays whatever top_p rounds to, and a NaN row keeps
    only its first column. The count is exact as long as it is below the number of
    columns: then the first dropped token is among them.
    """
    _, before = exclusive_cumsum(weights)
    return (before < (top_p * mass)[:, None]).sum(-1).clamp_(min=1)


def nucleus_threshold(values: torch.Tensor, probs: torch.Tensor, top_p: torch.Tensor, mass: torch.Tensor,
                      floor: Optional[torch.Tensor], complete: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowest kept value, exact) per row, from a best-first prefix of each row.

    `values` are a row's largest logits in descending order and `probs` their
    probabilities; `floor` drops values below it first (min_p), `mass` is what the row's
    kept distribution sums to. `exact` is False where every given column is kept and
    `complete` (the prefix is the whole row) is not set: the nucleus may reach beyond it.
    """
    if floor is not None:
        probs = torch.where(values >= floor[:, None], probs, 0.0)
    count = nucleus_size(probs, top_p, mass)
    threshold = values.gather(1, (count - 1)[:, None]).squeeze(1)
    return threshold, (count < values.shape[1]) | complete
