"""One rank's weights of GPT-2, cut from a Hugging Face model by a ShardPlan.

The shard is a plain module of tensors named as in GPT2Block, plus the plan that says
which heads and MLP units they are: the forward takes its shapes from the plan, never
from a transformers module mutated in place. Being an nn.Module, the shard can be cast
and placed as one (deepspeed.init_inference does that in loader.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from serve_tp.model.sharding import ShardPlan, shard_columns, shard_qkv, shard_rows


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    """The tensor itself as a weight (no copy: casting and placing make new tensors anyway)."""
    return nn.Parameter(tensor.detach(), requires_grad=False)


class Conv1DWeights(nn.Module):
    """A Conv1D's weight [in, out] and bias [out]: the layout x @ weight + bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = _frozen(weight)
        self.bias = _frozen(bias)


def _layer_norm(source: nn.LayerNorm) -> nn.LayerNorm:
    norm = nn.LayerNorm(source.normalized_shape, eps=source.eps)
    norm.weight, norm.bias = _frozen(source.weight), _frozen(source.bias)
    return norm


class BlockShard(nn.Module):
    """One GPT2Block's part on one rank: whole layer norms, this rank's columns and rows."""

    def __init__(self, block: nn.Module, plan: ShardPlan):
        super().__init__()
        attn, mlp = block.attn, block.mlp
        self.ln_1 = _layer_norm(block.ln_1)
        self.c_attn = Conv1DWeights(*shard_qkv(attn.c_attn.weight, attn.c_attn.bias, plan))
        # row-parallel: the bias is kept whole, rank 0 adds it (forward._row_parallel)
        self.attn_proj = Conv1DWeights(shard_rows(attn.c_proj.weight, *plan.attn_range), attn.c_proj.bias)
        self.ln_2 = _layer_norm(block.ln_2)
        self.c_fc = Conv1DWeights(*shard_columns(mlp.c_fc.weight, mlp.c_fc.bias, *plan.inner_range))
        self.mlp_proj = Conv1DWeights(shard_rows(mlp.c_proj.weight, *plan.inner_range), mlp.c_proj.bias)


class GPT2Shard(nn.Module):
    """Embeddings, final norm and vocabulary projection whole; every block split by `plan`.

    Keeping the vocabulary projection replicated means every rank computes the same
    logits, so no gather is needed before sampling.
    """

    def __init__(self, model: nn.Module, plan: ShardPlan):
        super().__init__()
        transformer = model.transformer
        self.plan = plan
        self.config = model.config  # HF config: activation, attention scaling, eos_token_id
        self.wte = _frozen(transformer.wte.weight)
        self.wpe = _frozen(transformer.wpe.weight)
        self.blocks = nn.ModuleList(BlockShard(block, plan) for block in transformer.h)
        self.ln_f = _layer_norm(transformer.ln_f)
        tied = model.lm_head.weight is transformer.wte.weight
        self.lm_head: Optional[nn.Parameter] = None if tied else _frozen(model.lm_head.weight)

    @property
    def vocab_projection(self) -> torch.Tensor:
        return self.wte if self.lm_head is None else self.lm_head

    @property
    def device(self) -> torch.device:
        return self.wte.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.dtype


def shard_gpt2(model: nn.Module, world_size: int = 1, rank: int = 0) -> GPT2Shard:
    """`rank`'s shard of a GPT2LMHeadModel (copies; the model is left as it was).

    With world_size 1 the shard is the whole model, as tests use it against HF's forward.
    """
    from serve_tp.model.source import check_model_shardable

    config = model.config.to_dict()
    check_model_shardable(config, world_size)
    return GPT2Shard(model, ShardPlan.for_gpt2(config, world_size, rank))
