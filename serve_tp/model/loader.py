"""Turn a loaded GPT-2 into one rank's tensor-parallel shard, in place.

DeepSpeed 0.19.8 cannot shard GPT-2 itself (AutoTP refuses it; its injection-policy path
splits Conv1D along the wrong dimension and ignores the fused Q|K|V layout), so the
split is ours (see sharding.py); the all-reduce is DeepSpeed's comm, passed in.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from serve_tp.model import sharding

AllReduce = Callable[[torch.Tensor], None]


class RowParallelConv1D(nn.Module):
    """Conv1D over a slice of input rows; partial sums all-reduced, then the bias once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, all_reduce: AllReduce):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.nf = weight.shape[1]
        self._all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        out = torch.mm(x.reshape(-1, x.size(-1)), self.weight)
        self._all_reduce(out)
        return (out + self.bias).view(size_out)


def _set_conv(conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    conv.weight = nn.Parameter(weight, requires_grad=False)
    conv.bias = nn.Parameter(bias, requires_grad=False)
    conv.nf = weight.shape[1]


def shard_gpt2(model: nn.Module, world_size: int, rank: int, all_reduce: AllReduce) -> nn.Module:
    """Shard every GPT2Block of `model` for `rank`; embeddings and lm_head stay whole.

    Keeping the vocabulary projection replicated means every rank computes the same
    logits, so no gather is needed before sampling.
    """
    config = model.config
    inner_dim = config.n_inner if config.n_inner is not None else 4 * config.hidden_size
    sharding.check_gpt2_shardable(config.num_attention_heads, inner_dim, world_size)
    if world_size == 1:
        return model
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        if getattr(attn, "is_cross_attention", False):
            raise sharding.ShardingError("cross-attention GPT-2 blocks are not supported")
        w, b = sharding.shard_qkv(
            attn.c_attn.weight.data, attn.c_attn.bias.data, attn.num_heads, world_size, rank
        )
        _set_conv(attn.c_attn, w, b)
        attn.num_heads //= world_size
        attn.split_size //= world_size
        attn.embed_dim //= world_size  # the SDPA path reshapes its output with it
        attn.c_proj = RowParallelConv1D(
            sharding.shard_rows(attn.c_proj.weight.data, world_size, rank),
            attn.c_proj.bias.data.clone(),
            all_reduce,
        )
        w, b = sharding.shard_columns(mlp.c_fc.weight.data, mlp.c_fc.bias.data, world_size, rank)
        _set_conv(mlp.c_fc, w, b)
        mlp.c_proj = RowParallelConv1D(
            sharding.shard_rows(mlp.c_proj.weight.data, world_size, rank),
            mlp.c_proj.bias.data.clone(),
            all_reduce,
        )
    return model


def load_sharded_model(model_dir: str, dtype_name: str, device, rank: int, world_size: int, all_reduce):
    """Load GPT-2 on CPU, keep this rank's shard, hand it to deepspeed.init_inference."""
    import deepspeed
    import torch
    from transformers import AutoConfig, GPT2LMHeadModel

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "gpt2":
        raise ValueError(
            f"serve_tp's tensor-parallel path supports GPT-2 models (model_type 'gpt2'); "
            f"{model_dir} is '{config.model_type}'"
        )
    dtype = getattr(torch, dtype_name)
    model = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=dtype, attn_implementation="sdpa")
    model.eval()
    shard_gpt2(model, world_size, rank, all_reduce)
    # Our shard is already split, so DeepSpeed sees tp_size 1: its AutoTP would refuse GPT-2
    # and its injection-policy path mis-splits Conv1D. It still places and casts the module.
    engine = deepspeed.init_inference(
        model, dtype=dtype, replace_with_kernel_inject=False, tensor_parallel={"tp_size": 1}
    )
    module = engine.module
    module.to(device)
    return module
