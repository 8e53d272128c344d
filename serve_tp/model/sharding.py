"""Tensor-parallel sharding maths for GPT-2, as small pure functions.

GPT-2 stores its projections as `Conv1D`, whose weight is [in_features, out_features]
(the transpose of nn.Linear). Megatron-style split of one block over `world_size` ranks:
  * attn.c_attn  column-parallel: each rank keeps its heads' slice of Q, of K and of V
                 (the fused output is [Q | K | V], so a plain contiguous split is wrong);
  * mlp.c_fc     column-parallel: a contiguous slice of the hidden units;
  * attn.c_proj, mlp.c_proj  row-parallel: the matching slice of input rows; the partial
                 outputs are summed by an all-reduce and the bias counted once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the replica checks shapes without importing torch
    import torch


class ShardingError(ValueError):
    """A model shape that cannot be split evenly over the ranks."""


def check_divisible(what: str, size: int, world_size: int) -> None:
    """Raise a message with both numbers when `size` does not split over the ranks."""
    if world_size < 1:
        raise ShardingError(f"tensor_parallel_size must be >= 1, got {world_size}")
    if size % world_size != 0:
        raise ShardingError(
            f"{what} ({size}) is not evenly divisible by tensor_parallel_size ({world_size})"
        )


def shard_bounds(size: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of `rank`'s equal slice of `size` items."""
    if not 0 <= rank < world_size:
        raise ShardingError(f"rank {rank} outside 0..{world_size - 1}")
    check_divisible("dimension", size, world_size)
    part = size // world_size
    return rank * part, (rank + 1) * part


def qkv_column_indices(embed_dim: int, world_size: int, rank: int) -> torch.Tensor:
    """Output columns of the fused [Q | K | V] projection that belong to `rank`.

    Heads are contiguous within each of Q, K and V, so a rank's heads are the same
    slice [start, end) taken from each third.
    """
    import torch

    start, end = shard_bounds(embed_dim, world_size, rank)
    local = torch.arange(start, end)
    return torch.cat([local, local + embed_dim, local + 2 * embed_dim])


def shard_qkv(
    weight: torch.Tensor, bias: torch.Tensor, num_heads: int, world_size: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-parallel slice of c_attn: weight [E, 3E] -> [E, 3E/N], bias [3E] -> [3E/N]."""
    check_divisible("number of attention heads", num_heads, world_size)
    embed_dim = weight.shape[0]
    if weight.shape[1] != 3 * embed_dim or bias.shape[0] != 3 * embed_dim:
        raise ShardingError(
            f"c_attn weight {tuple(weight.shape)} / bias {tuple(bias.shape)} is not a fused Q|K|V "
            f"projection of width {embed_dim}"
        )
    columns = qkv_column_indices(embed_dim, world_size, rank)
    return weight[:, columns].contiguous(), bias[columns].contiguous()


def shard_columns(
    weight: torch.Tensor, bias: torch.Tensor, world_size: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-parallel slice of a Conv1D ([in, out]): keep this rank's output features."""
    check_divisible("output features", weight.shape[1], world_size)
    start, end = shard_bounds(weight.shape[1], world_size, rank)
    return weight[:, start:end].contiguous(), bias[start:end].contiguous()


def shard_rows(weight: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """Row-parallel slice of a Conv1D ([in, out]): keep this rank's input features.

    The bias is not sliced: the all-reduced sum must count it exactly once.
    """
    check_divisible("input features", weight.shape[0], world_size)
    start, end = shard_bounds(weight.shape[0], world_size, rank)
    return weight[start:end, :].contiguous()


def check_gpt2_shardable(num_heads: int, inner_dim: int, world_size: int) -> None:
    """Every split the GPT-2 TP path makes, checked before any weight is touched."""
    check_divisible("number of attention heads", num_heads, world_size)
    check_divisible("MLP inner dimension", inner_dim, world_size)
