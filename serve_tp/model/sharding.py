"""Tensor-parallel sharding maths for GPT-2, as small pure functions.

GPT-2 stores its projections as `Conv1D`, whose weight is [in_features, out_features]
(the transpose of nn.Linear). Megatron-style split of one block over `world_size` ranks:
  * attn.c_attn  column-parallel: each rank keeps its heads' slice of Q, of K and of V
                 (the fused output is [Q | K | V], so a plain contiguous split is wrong);
  * mlp.c_fc     column-parallel: a contiguous slice of the hidden units;
  * attn.c_proj, mlp.c_proj  row-parallel: the matching slice of input rows; the partial
                 outputs are summed by an all-reduce and the bias counted once.

The split need not be even: gpt2-xl has 25 heads and gpt2-large 20, so on 2, 3, 4 or 8
ranks some ranks hold one head more than others (25 on 2 = 13 + 12). Heads are whole, so
the only shape refused is more ranks than heads. Each rank's slice is still contiguous
and each all-reduce still sums full-width [tokens, n_embd] partials, so an uneven split
costs only the imbalance (the largest rank sets the pace), never correctness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the replica checks shapes without importing torch
    import torch


class ShardingError(ValueError):
    """A model shape that cannot be split over the ranks."""


def split_sizes(total: int, world_size: int, what: str = "dimension") -> list[int]:
    """How many of `total` items each rank holds: as even as possible, the larger parts first.

    25 over 2 is [13, 12], 5 over 3 is [2, 2, 1]: sizes differ by at most one, so no rank
    waits on another for more than one item's work.
    """
    if world_size < 1:
        raise ShardingError(f"tensor_parallel_size must be >= 1, got {world_size}")
    if total < world_size:
        raise ShardingError(
            f"tensor_parallel_size ({world_size}) is larger than the {what} ({total}): "
            f"every rank needs at least one"
        )
    base, extra = divmod(total, world_size)
    return [base + 1 if rank < extra else base for rank in range(world_size)]


def split_bounds(total: int, world_size: int, rank: int, what: str = "dimension") -> tuple[int, int]:
    """[start, end) of `rank`'s contiguous part of `total` items (see split_sizes)."""
    if not 0 <= rank < world_size:
        raise ShardingError(f"rank {rank} outside 0..{world_size - 1}")
    sizes = split_sizes(total, world_size, what)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


@dataclass(frozen=True)
class ShardPlan:
    """Which heads and MLP units of every block one rank holds; the forward's shapes come from here."""

    num_heads: int  # the model's
    head_dim: int
    inner_dim: int  # the MLP's hidden width, the model's
    world_size: int
    rank: int

    @classmethod
    def for_gpt2(cls, model_config: dict, world_size: int, rank: int) -> "ShardPlan":
        """The plan for a GPT-2 config.json (a plain dict: the replica has no transformers)."""
        embed, heads = int(model_config["n_embd"]), int(model_config["n_head"])
        inner = int(model_config.get("n_inner") or 4 * embed)
        check_gpt2_shardable(heads, inner, world_size)
        if embed % heads:
            raise ShardingError(f"n_embd ({embed}) is not a multiple of n_head ({heads})")
        return cls(heads, embed // heads, inner, world_size, rank)

    def __post_init__(self):
        check_gpt2_shardable(self.num_heads, self.inner_dim, self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise ShardingError(f"rank {self.rank} outside 0..{self.world_size - 1}")

    @property
    def embed_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def head_range(self) -> tuple[int, int]:
        return split_bounds(self.num_heads, self.world_size, self.rank, "number of attention heads")

    @property
    def heads(self) -> int:
        """Attention heads on this rank: its KV cache and its graphs have this many."""
        start, end = self.head_range
        return end - start

    @property
    def attn_range(self) -> tuple[int, int]:
        """This rank's features within each of Q, K and V (and rows of attn.c_proj)."""
        start, end = self.head_range
        return start * self.head_dim, end * self.head_dim

    @property
    def inner_range(self) -> tuple[int, int]:
        """This rank's MLP hidden units (columns of mlp.c_fc, rows of mlp.c_proj)."""
        return split_bounds(self.inner_dim, self.world_size, self.rank, "MLP inner dimension")

    def heads_per_rank(self) -> list[int]:
        return split_sizes(self.num_heads, self.world_size, "number of attention heads")


def qkv_column_indices(embed_dim: int, start: int, end: int) -> torch.Tensor:
    """Output columns of the fused [Q | K | V] projection for features [start, end).

    Heads are contiguous within each of Q, K and V, so a rank's heads are the same
    slice taken from each third.
    """
    import torch

    local = torch.arange(start, end)
    return torch.cat([local, local + embed_dim, local + 2 * embed_dim])


def shard_qkv(weight: torch.Tensor, bias: torch.Tensor, plan: ShardPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-parallel slice of c_attn: weight [E, 3E] -> [E, 3e], bias [3E] -> [3e], e = heads * head_dim."""
    embed_dim = weight.shape[0]
    if embed_dim != plan.embed_dim or weight.shape[1] != 3 * embed_dim or bias.shape[0] != 3 * embed_dim:
        raise ShardingError(
            f"c_attn weight {tuple(weight.shape)} / bias {tuple(bias.shape)} is not a fused Q|K|V "
            f"projection of width {plan.embed_dim}"
        )
    columns = qkv_column_indices(embed_dim, *plan.attn_range)
    return weight[:, columns].contiguous(), bias[columns].contiguous()


def shard_columns(weight: torch.Tensor, bias: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-parallel slice of a Conv1D ([in, out]): keep output features [start, end)."""
    return weight[:, start:end].contiguous(), bias[start:end].contiguous()


def shard_rows(weight: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Row-parallel slice of a Conv1D ([in, out]): keep input features [start, end).

    The bias is not sliced: the all-reduced sum must count it exactly once.
    """
    return weight[start:end, :].contiguous()


def check_gpt2_shardable(num_heads: int, inner_dim: int, world_size: int) -> None:
    """Every split the GPT-2 TP path makes, checked before any weight is touched."""
    split_sizes(num_heads, world_size, "number of attention heads")
    split_sizes(inner_dim, world_size, "MLP inner dimension")
