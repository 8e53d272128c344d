"""Compile every Triton kernel of serve_tp for a Hopper GPU, on a machine without one.

    python tests/compile_kernels.py      (TRITON_INTERPRET must be unset)

Triton's CPU interpreter runs a kernel's Python, not its compiler: a kernel that reads a
non-constexpr global, or mixes types the compiler refuses, passes every interpreted test
and fails at its first launch on the GPU (fused_linear's GELU constant did, costing a
device call). Here each kernel, in the variants the code launches, goes through Triton's
whole pipeline for sm_90 (TTIR, TTGIR, LLVM IR, PTX, and ptxas to a cubin; triton's wheel
carries ptxas), with the warps and stages it is launched with, and its shared memory is held
to the GPU's limit (split-K's fp32 tiles outgrew it at four stages: another device call).
Prints one JSON line: {variant: "ok" or the error}. tests/test_triton_compile.py runs it.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


SHARED_LIMIT = 232448  # bytes a block may take on H100/H200 (Triton refuses the launch past it)
# split-K's plan and workspace (fused_linear.plan, fused_linear.workspace)
SPLIT_ARGUMENTS = {"tiles": "i32", "splits": "i32", "chunk": "i32", "partials_ptr": "*fp32", "counts_ptr": "*i32"}


def variants():
    """(name, kernel, signature, constexprs, launch options): what the project launches, by
    dtype and flags, with the warps and stages it launches them with."""
    import torch

    from serve_tp.engine import p2p_kernel
    from serve_tp.model import decode_attention, fused_linear

    for dtype, precision, torch_dtype in (("fp16", "tf32", torch.float16), ("bf16", "tf32", torch.bfloat16),
                                          ("fp32", "ieee", torch.float32)):
        pointer = f"*{dtype}"
        for gelu in (0, 1, 2):
            for block_m, block_n in ((16, 16), (32, 64)):
                signature = {"x_ptr": pointer, "x_stride": "i32", "rows": "i32", "K": "i32", "eps": "fp32",
                             "ln_w_ptr": pointer, "ln_b_ptr": pointer, "w_ptr": pointer, "w_stride_k": "i32",
                             "w_stride_n": "i32", "bias_ptr": pointer, "out_ptr": pointer, "N": "i32",
                             **SPLIT_ARGUMENTS}
                one_pass = split = block_m == 32  # both ways of the norm's statistics, K whole or split
                yield (f"ln_linear {dtype} gelu={gelu} {block_m}x{block_n} one_pass={one_pass} split={split}",
                       fused_linear.ln_linear_kernel, signature,
                       dict(GELU_KIND=gelu, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=fused_linear.BLOCK_K,
                            PRECISION=precision, ONE_PASS=one_pass, SPLIT=split),
                       fused_linear.launch_options(torch_dtype, block_m, block_n))
        for rank, world in ((0, 1), (0, 2), (1, 2), (2, 3)):
            for has_bias in (rank == 0, False):
                signature = {"x_ptr": pointer, "x_stride": "i32", "rows": "i32", "K": "i32", "w_ptr": pointer,
                             "w_stride_k": "i32", "w_stride_n": "i32", "bias_ptr": pointer, "residual_ptr": pointer,
                             "out_ptr": pointer, "N": "i32", **SPLIT_ARGUMENTS, "buffer_ptrs": "*i64",
                             "pad_ptrs": "*i64", "slot_offset": "i32"}
                split = not has_bias
                yield (f"linear_sum {dtype} rank {rank}/{world} bias={has_bias} split={split}",
                       fused_linear.linear_sum_kernel, signature,
                       dict(RANK=rank, WORLD=world, HAS_BIAS=has_bias, HAS_RESIDUAL=True, BLOCK_M=16, BLOCK_N=64,
                            BLOCK_K=fused_linear.BLOCK_K, PRECISION=precision, SPLIT=split),
                       fused_linear.launch_options(torch_dtype, 16, 64))
        for published in (True, False):
            signature = {"partial_ptr": pointer, "residual_ptr": pointer, "out_ptr": pointer, "buffer_ptrs": "*i64",
                         "pad_ptrs": "*i64", "n": "i32", "slot_offset": "i32"}
            yield (f"p2p one_shot {dtype} published={published}", p2p_kernel.one_shot_kernel, signature,
                   dict(RANK=0, WORLD=2, HAS_RESIDUAL=True, PUBLISHED=published, BLOCK=1024), {})
        signature = {"qkv": pointer, "kv": pointer, "positions": "*i64", "out": pointer, "span": "i32",
                     "scale_log2": "fp32", "qkv_row": "i32", "qkv_part": "i32", "qkv_head": "i32", "kv_slot": "i32",
                     "kv_part": "i32", "kv_head": "i32", "kv_pos": "i32", "out_row": "i32"}
        yield (f"decode_attention {dtype}", decode_attention._decode_attention_kernel, signature,
               dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_N=decode_attention.BLOCK_N), {})


def main() -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)  # H100/H200
    report = {}
    for name, kernel, signature, constexprs, options in variants():
        signature = {**signature, **{key: "constexpr" for key in constexprs}}
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target, options=options)
            shared = compiled.metadata.shared
            report[name] = ("no cubin" if not compiled.asm.get("cubin") else "ok" if shared <= SHARED_LIMIT
                            else f"{shared} bytes of shared memory, over sm_90's {SHARED_LIMIT}")
        except Exception as exc:  # the compiler's refusal, reported per variant
            report[name] = f"{type(exc).__name__}: {str(exc)[-600:]}"
    return report


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler this checks")
    print(json.dumps(main()))
