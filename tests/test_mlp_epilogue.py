"""The MLP's bias + tanh GELU in the c_fc GEMM's epilogue (serve_tp/model/epilogue.py), on CPU.

cuBLASLt's epilogue itself needs CUDA; on H200 it was 5-10x fp32 rounding from float64 and
no faster, so it is off by default (epilogue.py; gpu_profile.py --mlp-epilogue measures it). Here: why the CPU keeps the unfused form (ATen's CPU `_addmm_activation` is
the erf GELU, not GPT-2's tanh one), that the CPU path is exactly the old addmm + F.gelu,
that Inductor runs the op as an extern fallback kernel (so a compiled step calls the same
ATen op, and cuBLASLt, on CUDA), and which activations GPT2Forward fuses.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serve_tp.model.epilogue import TANH_GELU, bias_tanh_gelu, takes_lt_epilogue

CPU = torch.device("cpu")


def _operands(rows: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 64, generator=gen, dtype=torch.float64)
    weight = torch.randn(64, 48, generator=gen, dtype=torch.float64) * 0.2
    bias = torch.randn(48, generator=gen, dtype=torch.float64)
    return bias.to(dtype), x.to(dtype), weight.to(dtype)


def test_cpu_op_is_the_erf_gelu_so_the_cpu_keeps_the_unfused_tanh_one():
    """Control: fp32 against float64 of the same tanh GELU, what rounding alone moves it by;
    the CPU op's gap to the tanh GELU is far beyond it (a different function), its gap to
    the erf GELU is none (the same kernels)."""
    bias, x, weight = _operands(8)
    fused = torch._addmm_activation(bias, x, weight, use_gelu=True)
    summed = torch.addmm(bias, x, weight)
    tanh = F.gelu(summed, approximate="tanh")
    exact_tanh = F.gelu(torch.addmm(*(t.double() for t in (bias, x, weight))), approximate="tanh")
    control = (tanh.double() - exact_tanh).abs().max().item()
    assert 0 < control < 1e-5, control
    assert torch.equal(fused, F.gelu(summed))
    assert (fused - tanh).abs().max().item() > 100 * control


@pytest.mark.parametrize("rows", [1, 5])
def test_cpu_path_is_the_unfused_addmm_and_tanh_gelu(rows):
    bias, x, weight = _operands(rows)
    assert not takes_lt_epilogue(x, weight)
    assert torch.equal(bias_tanh_gelu(bias, x, weight), F.gelu(torch.addmm(bias, x, weight), approximate="tanh"))


def test_inductor_runs_the_op_as_an_extern_fallback_kernel():
    """What compiled.py's mlp_input relies on: Inductor neither decomposes nor rewrites
    aten._addmm_activation; its generated code calls the ATen op (cuBLASLt on CUDA)."""
    from torch._inductor.utils import run_and_get_code

    bias, x, weight = _operands(4)

    def fc(bias, x, weight):
        return torch._addmm_activation(bias, x, weight, use_gelu=True)

    out, code = run_and_get_code(torch.compile(fc, fullgraph=True), bias, x, weight)
    assert torch.equal(out, fc(bias, x, weight))
    assert "aten._addmm_activation.default(" in "\n".join(code)


@pytest.mark.parametrize("activation,fused", [("gelu_new", True), ("gelu_pytorch_tanh", True),
                                                ("gelu", False), ("relu", False)])
def test_forward_fuses_only_the_tanh_gelu(tiny_model_dir, activation, fused):
    from serve_tp.model.forward import GPT2Forward
    from serve_tp.model.loader import load_shard

    shard = load_shard(tiny_model_dir, "float32", CPU, 0, 1)
    shard.config.activation_function = activation
    assert (activation in TANH_GELU) == fused
    assert GPT2Forward(shard, mlp_epilogue=True).mlp_epilogue is fused
    assert GPT2Forward(shard).mlp_epilogue is False  # off by default: not exact on the device (epilogue.py)
