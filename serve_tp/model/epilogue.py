"""The MLP's c_fc GEMM with its bias and tanh GELU in the GEMM's epilogue: one kernel, not two.

Measured on H200 (torch 2.11+cu130; docs/results/h200x2/kernels/): OFF by default
(GPT2Forward's `mlp_epilogue`), kept for gpu_profile.py --mlp-epilogue. cuBLASLt's GELU
epilogue is not the exact tanh GELU: in fp32 its error against float64 is 5-10x what
rounding alone gives (5.5e-6 against 5.5e-7 for one c_fc; 1.8e-5 against 3.8e-6 over a
decode), so it would break the fp32 exactness the project keeps. And it bought no time:
the gpt2 step with it had 12 kernels fewer (the GELU) and was as fast within noise. torch
2.11 also takes it at one row (the `nvjet_..._gelubias` kernel), so the row condition
below is that of the newer source read, not of the device's build.

`torch._addmm_activation(bias, x, W, use_gelu=True)` asks cuBLASLt for its GELU_BIAS
epilogue, meant as the tanh GELU GPT-2's gelu_new is (close to it, not equal: above). Where it is taken, the c_fc GEMM,
its bias and the GELU are one kernel, and the GELU acts on the fp32 accumulator before the
one rounding to fp16/bf16 (the unfused path rounds twice: after the GEMM and after the GELU).

When ATen takes the Lt path (aten/src/ATen/native/cuda/Blas.cpp, `addmm_out_cuda_impl` and
`isInputCompliesAddmmCudaLt`, in both versions read: before and after that check took the
activation as an argument): not disabled by
DISABLE_ADDMM_CUDA_LT=1; beta == 1; the result 2-D and contiguous, not the bias itself; the
bias 1-D (or squeezable to 1-D), contiguous, as long as W's columns; dtype float32, float16,
bfloat16 (or float64); and every dimension of mat1 and mat2 > 1 ("if mat2 has only 1 row or
column, we get CUBLAS_STATUS_INVALID_VALUE from cublasLtMatmulAlgoGetHeuristic"; mat1 is
included because the two may be swapped by layout). Our layout passes the layout checks:
x [rows, in] and Conv1D's W [in, out] both row-major, so cuBLAS sees the column-major
problem out^T = W^T x^T without transposes and the bias runs along the output features,
as Lt's bias epilogue wants; no weight layout change is needed.

That row rule is the newer source's. On the device's torch 2.11 ATen takes the Lt path at
one row too: `_addmm_activation` ran one `nvjet_..._gelubias` kernel there, and a plain
addmm's bias was inside its GEMM kernel at batch 1 (gpu_profile.py --kernels). So
`takes_lt_epilogue` is conservative on 2.11 (unfused at one row, where Lt would fuse); as
the epilogue is off, that costs nothing.

Under torch.compile, Inductor keeps aten._addmm_activation as a fallback (extern) kernel
(torch/_inductor/lowering.py: `make_fallback(aten._addmm_activation)`; it is not in
Inductor's decomposition table), so the compiled step calls the same ATen op and cuBLASLt.
A plain addmm whose only users are pointwise is instead split by the post-grad pass
`unfuse_bias_add_to_pointwise` into mm + a bias add fused into the pointwise kernel, except
for fp16/bf16 where `keep_addmm_fused_for_half_dtypes` (True in torch 2.13's Inductor config;
the device's 2.11 may predate it: gpu_profile.py --kernels shows which) keeps the addmm.

Off CUDA the op is not the same function: ATen's CPU kernel applies the exact (erf) GELU,
so CPU keeps addmm + F.gelu(approximate="tanh").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# transformers' activation names that are F.gelu(approximate="tanh")
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def takes_lt_epilogue(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the newer ATen source would run addmm(bias, x, weight) through cuBLASLt's
    epilogue: CUDA and no dimension of 1 (the layout, dtype and bias conditions hold for
    GPT2Forward's tensors). torch 2.11 takes it at one row as well (module docstring)."""
    return x.is_cuda and x.shape[0] > 1 and x.shape[1] > 1 and weight.shape[1] > 1


def bias_tanh_gelu(bias: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weight + bias): in the GEMM's epilogue where cuBLASLt takes it, else unfused.

    Unfused where the newer source's Lt rule would not take it (one row); under Inductor the
    unfused form may still fuse the GELU with the bias."""
    if takes_lt_epilogue(x, weight):
        return torch._addmm_activation(bias, x, weight, use_gelu=True)
    return F.gelu(torch.addmm(bias, x, weight), approximate="tanh")
