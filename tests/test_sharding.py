"""Sharding maths: each rank's slice, recombined, is the unsharded layer."""

import pytest
import torch
from transformers import GPT2Config
from transformers.pytorch_utils import Conv1D

from serve_tp.model import sharding


def conv(in_features, out_features, seed=0):
    torch.manual_seed(seed)
    layer = Conv1D(out_features, in_features)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("world_size", [1, 2, 3, 6])
def test_qkv_shards_hold_each_ranks_heads_of_q_k_and_v(world_size):
    embed, heads = 12, 6
    layer = conv(embed, 3 * embed)
    x = torch.randn(5, embed)
    q, k, v = layer(x).split(embed, dim=-1)
    per_rank = embed // world_size
    for rank in range(world_size):
        w, b = sharding.shard_qkv(layer.weight, layer.bias, heads, world_size, rank)
        lq, lk, lv = (x @ w + b).split(per_rank, dim=-1)
        cols = slice(rank * per_rank, (rank + 1) * per_rank)
        torch.testing.assert_close(lq, q[:, cols])
        torch.testing.assert_close(lk, k[:, cols])
        torch.testing.assert_close(lv, v[:, cols])


def test_a_plain_contiguous_split_of_c_attn_would_be_wrong():
    """The bug DeepSpeed's injection path has: rank 0's slice must not be the first 3E/N columns."""
    cols = sharding.qkv_column_indices(8, 2, 0).tolist()
    assert cols != list(range(12))
    assert cols == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]


@pytest.mark.parametrize("world_size", [2, 4])
def test_column_then_row_parallel_mlp_sums_to_the_full_mlp(world_size):
    fc, proj = conv(8, 32, seed=1), conv(32, 8, seed=2)
    x = torch.randn(3, 8)
    full = proj(torch.relu(fc(x)))
    partial = torch.zeros_like(full)
    for rank in range(world_size):
        w_fc, b_fc = sharding.shard_columns(fc.weight, fc.bias, world_size, rank)
        w_proj = sharding.shard_rows(proj.weight, world_size, rank)
        partial += torch.relu(x @ w_fc + b_fc) @ w_proj  # what the all-reduce sums
    torch.testing.assert_close(partial + proj.bias, full, rtol=1e-5, atol=1e-5)


def test_shard_bounds_cover_the_dimension_without_overlap():
    bounds = [sharding.shard_bounds(12, 3, r) for r in range(3)]
    assert bounds == [(0, 4), (4, 8), (8, 12)]


def test_heads_not_divisible_names_both_numbers():
    with pytest.raises(sharding.ShardingError, match=r"attention heads \(25\).*tensor_parallel_size \(2\)"):
        sharding.check_gpt2_shardable(25, 6400, 2)


def test_shard_gpt2_rejects_indivisible_heads_before_touching_weights():
    from transformers import GPT2LMHeadModel

    from serve_tp.model.loader import shard_gpt2

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=6, n_embd=24, vocab_size=50, n_positions=16))
    before = model.transformer.h[0].attn.c_attn.weight.clone()
    with pytest.raises(sharding.ShardingError, match=r"\(6\).*\(4\)"):
        shard_gpt2(model, 4, 0, all_reduce=lambda t: None)
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.weight, before)


def test_rank_outside_group_is_refused():
    with pytest.raises(sharding.ShardingError, match="rank 2"):
        sharding.shard_bounds(8, 2, 2)
