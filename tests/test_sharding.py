"""Sharding maths: each rank's slice, recombined, is the unsharded layer, for even and uneven splits."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config
from transformers.pytorch_utils import Conv1D

from serve_tp.model import sharding
from serve_tp.model.sharding import ShardPlan
from serve_tp.model.source import ModelSourceError, check_model_shardable

# The released GPT-2 sizes: (n_head, n_embd)
GPT2_SIZES = {"gpt2": (12, 768), "gpt2-medium": (16, 1024), "gpt2-large": (20, 1280), "gpt2-xl": (25, 1600)}


def conv(in_features, out_features, seed=0):
    torch.manual_seed(seed)
    layer = Conv1D(out_features, in_features)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    return layer.double()


@settings(deadline=None)  # a shared 2-core CI box stalls now and then; the maths has no time limit
@given(st.integers(1, 64), st.data())
def test_split_sizes_are_as_even_as_possible_and_cover_everything(world_size, data):
    total = data.draw(st.integers(world_size, 20_000))
    sizes = sharding.split_sizes(total, world_size)
    assert len(sizes) == world_size and sum(sizes) == total
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True) and min(sizes) >= 1
    bounds = [sharding.split_bounds(total, world_size, r) for r in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(end == start for (_, end), (start, _) in zip(bounds, bounds[1:]))  # contiguous, no overlap
    assert [end - start for start, end in bounds] == sizes


def test_split_examples_from_the_gpt2_family():
    assert sharding.split_sizes(25, 2) == [13, 12]
    assert sharding.split_sizes(5, 3) == [2, 2, 1]
    assert sharding.split_sizes(25, 8) == [4, 3, 3, 3, 3, 3, 3, 3]
    assert sharding.split_sizes(6400, 3) == [2134, 2133, 2133]


@pytest.mark.parametrize("name", GPT2_SIZES)
@pytest.mark.parametrize("world_size", range(1, 9))
def test_every_gpt2_size_shards_on_every_tp_size_up_to_8(name, world_size):
    heads, embed = GPT2_SIZES[name]
    config = {"model_type": "gpt2", "n_head": heads, "n_embd": embed}
    check_model_shardable(config, world_size)
    plans = [ShardPlan.for_gpt2(config, world_size, r) for r in range(world_size)]
    assert sum(p.heads for p in plans) == heads
    assert plans[-1].attn_range[1] == embed and plans[-1].inner_range[1] == 4 * embed


def test_more_ranks_than_heads_is_refused_naming_both_numbers():
    with pytest.raises(sharding.ShardingError, match=r"tensor_parallel_size \(26\).*attention heads \(25\)"):
        check_model_shardable({"model_type": "gpt2", "n_head": 25, "n_embd": 1600}, 26)
    with pytest.raises(ModelSourceError, match="reorder_and_upcast_attn"):
        check_model_shardable({"model_type": "gpt2", "n_head": 4, "n_embd": 8, "reorder_and_upcast_attn": True}, 2)


def test_rank_outside_group_is_refused():
    with pytest.raises(sharding.ShardingError, match="rank 2"):
        sharding.split_bounds(8, 2, 2)
    with pytest.raises(sharding.ShardingError, match="rank 3"):
        ShardPlan(num_heads=4, head_dim=2, inner_dim=32, world_size=3, rank=3)


@settings(deadline=None)
@given(st.integers(1, 12), st.integers(1, 4), st.data())
def test_qkv_shards_hold_each_ranks_heads_of_q_k_and_v(heads, head_dim, data):
    world_size = data.draw(st.integers(1, heads))
    embed = heads * head_dim
    layer = conv(embed, 3 * embed)
    x = torch.randn(3, embed, dtype=torch.float64)
    q, k, v = layer(x).split(embed, dim=-1)
    parts = []
    for rank in range(world_size):
        plan = ShardPlan(heads, head_dim, 4 * embed, world_size, rank)
        w, b = sharding.shard_qkv(layer.weight, layer.bias, plan)
        width = plan.heads * head_dim
        parts.append((x @ w + b).split(width, dim=-1))
    for i, full in enumerate((q, k, v)):  # each rank's Q (K, V) slices, side by side, are the whole Q
        torch.testing.assert_close(torch.cat([p[i] for p in parts], dim=-1), full)


def test_a_plain_contiguous_split_of_c_attn_would_be_wrong():
    """The bug DeepSpeed's injection path has: rank 0's slice must not be the first 3E/N columns."""
    cols = sharding.qkv_column_indices(8, 0, 4).tolist()
    assert cols != list(range(12))
    assert cols == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]


@settings(deadline=None)
@given(st.integers(1, 40), st.data())
def test_column_then_row_parallel_mlp_sums_to_the_full_mlp(inner, data):
    world_size = data.draw(st.integers(1, min(inner, 8)))
    fc, proj = conv(6, inner, seed=1), conv(inner, 6, seed=2)
    x = torch.randn(3, 6, dtype=torch.float64)
    full = proj(torch.relu(fc(x)))
    partial = torch.zeros_like(full)
    for rank in range(world_size):
        start, end = sharding.split_bounds(inner, world_size, rank)
        w_fc, b_fc = sharding.shard_columns(fc.weight, fc.bias, start, end)
        partial += torch.relu(x @ w_fc + b_fc) @ sharding.shard_rows(proj.weight, start, end)  # the all-reduce
    torch.testing.assert_close(partial + proj.bias, full)


def test_shard_gpt2_refuses_more_ranks_than_heads_before_touching_weights():
    from transformers import GPT2LMHeadModel

    from serve_tp.model.shard import shard_gpt2

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=6, n_embd=24, vocab_size=50, n_positions=16))
    before = model.transformer.h[0].attn.c_attn.weight.clone()
    with pytest.raises(sharding.ShardingError, match=r"\(7\).*\(6\)"):
        shard_gpt2(model, 7, 0)
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.weight, before)
