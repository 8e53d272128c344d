"""What loading a shard does, deepspeed.init_inference's part included (see loader.py)."""

import pytest
import torch
from deepspeed.accelerator import get_accelerator

from serve_tp.model.loader import load_shard
from serve_tp.model.shard import shard_gpt2
from serve_tp.model.sharding import ShardingError
from tests import reference


def test_deepspeed_casts_the_float32_checkpoint_to_the_serving_dtype(tiny_model_dir):
    """Control: the shard cut from the checkpoint as transformers reads it is float32; after
    init_inference every weight is bfloat16, on the CPU, and equal to the rounded original."""
    cut = shard_gpt2(reference.hf_model(tiny_model_dir, "float32", "sdpa"))
    assert {p.dtype for p in cut.parameters()} == {torch.float32}
    shard = load_shard(tiny_model_dir, "bfloat16", torch.device("cpu"), rank=0, world_size=1)
    assert {(p.dtype, p.device.type) for p in shard.parameters()} == {(torch.bfloat16, "cpu")}
    torch.testing.assert_close(shard.blocks[0].c_fc.weight, cut.blocks[0].c_fc.weight.bfloat16(), rtol=0, atol=0)


def test_a_rank_loads_its_shard_without_any_collective(tiny_model_dir):
    """No process group exists here: init_inference with tp_size 1 creates none and calls none,
    so ranks holding different numbers of heads cannot meet in a collective while loading."""
    assert not torch.distributed.is_initialized()
    shard = load_shard(tiny_model_dir, "float32", torch.device("cpu"), rank=3, world_size=4)
    assert shard.plan.heads == 1 and shard.plan.head_range == (5, 6)  # 6 heads on 4 ranks: 2, 2, 1, 1
    assert shard.blocks[0].c_attn.weight.shape == (96, 3 * 16)
    assert shard.blocks[0].c_fc.weight.shape == (96, 384 // 4)
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(get_accelerator().device_name() != "cpu", reason="DeepSpeed's accelerator here is not its CPU one")
def test_deepspeed_refuses_float16_on_its_cpu_accelerator(tiny_model_dir):
    """Why config.py refuses float16 on CPU before anything starts."""
    with pytest.raises(ValueError, match="not supported by cpu accelerator"):
        load_shard(tiny_model_dir, "float16", torch.device("cpu"), rank=0, world_size=1)


def test_more_ranks_than_heads_is_refused_before_reading_weights(tiny_model_dir):
    with pytest.raises(ShardingError, match=r"tensor_parallel_size \(7\).*attention heads \(6\)"):
        load_shard(tiny_model_dir, "float32", torch.device("cpu"), rank=0, world_size=7)
