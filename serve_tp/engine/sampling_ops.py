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


def _below(total: torch.Tensor) -> torch.Tensor:
    """The float just under `total`: u * total (u < 1) can round up to total itself."""
    return torch.nextafter(total, torch.zeros_like(total))


def search_cdf(cdf: torch.Tensor, weights: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(column, ok) per row: the first column whose running sum `cdf` passes `target` [rows, 1].

    With the target below the last column it searches, the column is a weighted one;
    `ok` is False where it has no weight anyway, which only a NaN row or a running sum
    that rounding made non-monotonic (a parallel scan) can produce.
    """
    column = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
    ok = weights.gather(1, column) > 0
    return column.squeeze(1), ok.squeeze(1)


def inverse_cdf(cdf: torch.Tensor, weights: torch.Tensor, uniforms: torch.Tensor,
                total: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(column, ok) drawn per row with probability weights/total, from one uniform per row.

    `cdf` is `weights.cumsum(-1)`; `total` ([rows, 1], default its last column) may be an
    earlier column of it, which draws from that prefix only.
    """
    if total is None:
        total = cdf[:, -1:]
    return search_cdf(cdf, weights, torch.minimum(uniforms[:, None] * total, _below(total)))


def blocked_inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The `inverse_cdf` column of whole rows, for a fraction of a row-wide cumsum's cost.

    The draw picks a block of `block` columns from the blocks' sums, then a column from
    the running sum inside that block only. A column without weight (a NaN row, or
    rounding between the two levels) gives way to the heaviest column of its block.
    """
    rows, width = weights.shape
    padded = torch.nn.functional.pad(weights, (0, -width % block)) if width % block else weights
    blocks = padded.view(rows, -1, block)
    sums = blocks.sum(-1)
    cdf, before = exclusive_cumsum(sums)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms[:, None] * total, _below(total))
    chosen, _ = search_cdf(cdf, sums, target)
    inside = blocks.gather(1, chosen[:, None, None].expand(-1, -1, block)).squeeze(1)
    inside_cdf = inside.cumsum(-1)
    offset = (target - before.gather(1, chosen[:, None])).clamp_(min=0)
    column, ok = search_cdf(inside_cdf, inside, torch.minimum(offset, _below(inside_cdf[:, -1:])))
    column = torch.where(ok, column, inside.argmax(-1))
    return (chosen * block + column).clamp_(max=width - 1)


def exclusive_cumsum(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inclusive, exclusive) running sums along rows; the exclusive one starts at exactly 0."""
    cdf = weights.cumsum(-1)
    return cdf, torch.nn.functional.pad(cdf[:, :-1], (1, 0))


def nucleus_size(weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """How many of the best-first `weights` the top-p nucleus keeps, at least 1.

    A token stays while the weight before it is below `target` (top_p times the row's
    mass): the smallest set whose mass reaches top_p. The best one stays whatever top_p
    rounds to, and a NaN row keeps only its first column.
    """
    _, before = exclusive_cumsum(weights)
    return (before < target[:, None]).sum(-1).clamp_(min=1)


def sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 with the same order (negative floats get their magnitude bits flipped)."""
    bits = values.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def from_sortable_keys(keys: torch.Tensor) -> torch.Tensor:
    """The inverse of `sortable_keys` (the same flip: it keeps the sign bit)."""
    return (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _digit_reaching(digits: torch.Tensor, weights: torch.Tensor, target: torch.Tensor,
                    width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(digit, target left) per row: the lowest digit whose higher digits weigh less than `target`."""
    mass = torch.zeros(digits.shape[0], width, dtype=weights.dtype, device=weights.device)
    mass.scatter_add_(1, digits.long(), weights)
    prefix = mass.cumsum(-1)
    above = prefix[:, -1:] - prefix  # weight of the strictly higher digits, non-increasing
    digit = (above >= target[:, None]).sum(-1).clamp_(max=width - 1)
    return digit, target - above.gather(1, digit[:, None]).squeeze(1)


def radix_nucleus_threshold(values: torch.Tensor, weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the lowest value the top-p nucleus keeps, without sorting the row.

    The nucleus keeps a value v while the weight of values strictly above v is below
    `target` (top_p times the row's mass). On the values' int32 sort keys, a radix select
    of three digits (11, 11 and 10 bits) finds the lowest such key from three weighted
    histograms of at most 2048 columns: static shapes, no host read, exact up to the
    float rounding of the sums. Values whose higher digits were not chosen weigh 0 in the
    next histogram (masking the weights rather than moving those values to one spare
    column: additions into one address serialise). The best value always stays.
    """
    keys = sortable_keys(values.contiguous())
    prefix, left = _digit_reaching((keys >> 21) + 1024, weights, target, 2048)
    prefix = prefix - 1024  # the chosen key's top 11 bits, as the signed keys >> 21
    racing = torch.where((keys >> 21) == prefix.to(torch.int32)[:, None], weights, 0.0)
    digit, left = _digit_reaching((keys >> 10) & 2047, racing, left, 2048)
    prefix = prefix * 2048 + digit  # keys >> 10
    racing = torch.where((keys >> 10) == prefix.to(torch.int32)[:, None], weights, 0.0)
    digit, _ = _digit_reaching(keys & 1023, racing, left, 1024)
    threshold = from_sortable_keys((prefix * 1024 + digit).to(torch.int32))
    # fmin: a key past every value (a target of 0) can decode to NaN; the best value stays.
    return torch.fmin(threshold, values.amax(-1))


def nucleus_threshold(values: torch.Tensor, weights: torch.Tensor, target: torch.Tensor,
                      complete: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowest kept value, exact) per row, from a best-first prefix of each row.

    `values` are a row's largest values in descending order and `weights` their
    probabilities. The count is exact when the nucleus ends before the prefix does, or
    when the prefix is the whole row (`complete`).
    """
    count = nucleus_size(weights, target)
    threshold = values.gather(1, (count - 1)[:, None]).squeeze(1)
    return threshold, (count < values.shape[1]) | complete
