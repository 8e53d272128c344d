"""Where a Triton kernel test runs: the GPU, or Triton's CPU interpreter without one.

Triton decides when it is first imported whether its functions are compiled or
interpreted (TRITON_INTERPRET=1), so a test module calls `use_interpreter_without_gpu()`
before it imports a kernel module, then `kernel_device()` for the device its tensors go
to. Shared by tests/test_decode_attention.py and tests/test_fused_linear.py.
"""

import importlib.util
import os

import pytest
import torch


def use_interpreter_without_gpu() -> None:
    """Skip the calling module without triton; without a GPU, interpret the kernels (numpy)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton): the kernels' tests need it",
                    allow_module_level=True)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def kernel_device() -> torch.device:
    """cuda, or cpu under the interpreter; skips the calling module when triton was imported
    compiled in a process without a GPU (too late to interpret)."""
    from serve_tp.model import decode_attention

    if not torch.cuda.is_available() and not decode_attention.interpreting():
        pytest.skip("triton was imported before TRITON_INTERPRET could be set; run this module on its own "
                    "or with TRITON_INTERPRET=1", allow_module_level=True)
    return torch.device("cpu" if decode_attention.interpreting() else "cuda")
