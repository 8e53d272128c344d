"""A decode step with its elementwise work fused by torch.compile, between the all-reduces.

Replayed as a CUDA graph a decode step still runs every kernel: at batch 1 a GPT-2 layer
is ~17 small kernels, and their count, not the weights' bytes, sets its time. Inductor
fuses the residual add (with the all-reduce's cast back to the model's dtype), the layer
norm, and the MLP's bias + GELU into single kernels; the GEMMs stay cuBLAS calls (c_fc's
with its bias + GELU in cuBLASLt's epilogue where ATen takes it, `mlp_epilogue`: epilogue.py).

What is compiled is two functions per layer shape (and the first layer's input, which
gathers the embeddings inside the layer norm's kernel), not the model: the weights are
arguments, so every layer of one width reuses one compiled graph (dynamo guards on
shapes and dtypes, not on which tensor), and compile time does not grow with depth.
Batch is dynamic (one graph for batch 1, one for the rest), so a bucket needs no compile
of its own (the runner still runs every bucket once before capturing). Kept outside: the
KV-cache write and attention (an input mutation Inductor would copy), the row-parallel
GEMMs (they write into the all-reduce's buffer) and the all-reduce itself. Inductor's own
CUDA graphs are off (mode "default"): the decode runner captures the whole step, compiled
pieces included, into its graphs.

The sums arrive here un-cast (`partial_sum`): an fp16 model's symmetric-memory sum is
float32, and `h + s.to(h.dtype)` inside the fused kernel rounds it exactly where the eager
step does, so the compiled step computes the eager step's fp16 values up to Inductor's own
layer-norm arithmetic (fp32 accumulation, a different reduction order).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from serve_tp.model.epilogue import bias_tanh_gelu

logger = logging.getLogger(__name__)


def _with_sum(h: torch.Tensor, partial_sum: Optional[torch.Tensor]) -> torch.Tensor:
    return h if partial_sum is None else h + partial_sum.to(h.dtype)


def attention_input(h, partial_sum, ln_weight, ln_bias, eps: float, weight, bias):
    """(residual, Q|K|V): the previous sum added, layer norm, the fused QKV GEMM + bias."""
    h = _with_sum(h, partial_sum)
    x = F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, eps)
    return h, torch.addmm(bias, x, weight)


def embedded_attention_input(tokens, positions, wte, wpe, ln_weight, ln_bias, eps: float, weight, bias):
    """attention_input of the first layer from the token and position ids: the two embedding
    gathers and their sum fuse into the layer norm's kernel (three kernels fewer per step).
    The sum is eager's `wte[t] + wpe[p]` in the model's dtype."""
    return attention_input(F.embedding(tokens, wte), F.embedding(positions, wpe), ln_weight, ln_bias, eps,
                           weight, bias)


def mlp_input(h, partial_sum, ln_weight, ln_bias, eps: float, weight, bias, approximate: str,
              epilogue: bool = False):
    """(residual, activations): the attention sum added, layer norm, c_fc GEMM, bias + GELU.

    `epilogue` (tanh GELU only): the GEMM, bias and GELU as one cuBLASLt call where ATen takes
    its epilogue (epilogue.py); Inductor runs aten._addmm_activation as an extern kernel."""
    h = _with_sum(h, partial_sum)
    x = F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, eps)
    if epilogue and approximate == "tanh":
        return h, bias_tanh_gelu(bias, x, weight)
    return h, F.gelu(torch.addmm(bias, x, weight), approximate=approximate)


def final_norm(h, partial_sum, ln_weight, ln_bias, eps: float):
    h = _with_sum(h, partial_sum)
    return F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, eps)


class CompiledPieces:
    """The compiled functions, made once per process and mode (dynamo caches by shape).

    `mode` "default" keeps the GEMMs on cuBLAS; "max-autotune-no-cudagraphs" lets Inductor
    pick Triton GEMM templates with the bias + GELU (and the residual add) fused into their
    epilogue, at minutes of autotuning per shape (gpu_profile.py --compile max measures it).
    """

    def __init__(self, mode: str = "default"):
        # batch is marked dynamic per call (`batch_dynamic`); widths stay static, for Inductor's kernels
        options = dict(fullgraph=True, mode=mode)
        self.attention_input = torch.compile(attention_input, **options)
        self.embedded_attention_input = torch.compile(embedded_attention_input, **options)
        self.mlp_input = torch.compile(mlp_input, **options)
        self.final_norm = torch.compile(final_norm, **options)


def batch_dynamic(*tensors: Optional[torch.Tensor]) -> None:
    """Mark dim 0 (the batch) dynamic: every bucket above 1 shares one compiled graph, so
    no bucket compiles inside a CUDA-graph capture. Batch 1 keeps its own static graph."""
    for tensor in tensors:
        if tensor is not None and tensor.shape[0] > 1:
            torch._dynamo.mark_dynamic(tensor, 0)


_PIECES: dict[str, CompiledPieces] = {}


def compiled_pieces(mode: str = "default") -> CompiledPieces:
    if mode not in _PIECES:
        _PIECES[mode] = CompiledPieces(mode)
    return _PIECES[mode]


def gelu_approximation(activation: str) -> Optional[str]:
    """F.gelu's `approximate` for a GPT-2 activation name; None: not a GELU we can compile."""
    return {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(activation)
