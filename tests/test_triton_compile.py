"""Every Triton kernel of serve_tp compiles for Hopper, checked without a GPU.

The interpreter tests (test_fused_linear, test_p2p_all_reduce, test_decode_attention) run a
kernel's Python; this runs Triton's compiler on it down to a cubin for sm_90
(tests/compile_kernels.py), in a process without TRITON_INTERPRET. A kernel that reads a
non-constexpr global or that the compiler refuses otherwise fails here, not at its first
launch on a device (fused_linear's GELU constant once did). Skipped where triton is not
installed (`scripts/setup.sh --dev` installs it beside a CPU torch, so CI runs it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", minversion="3.6")

HARNESS = Path(__file__).with_name("compile_kernels.py")


def test_every_kernel_variant_compiles_to_a_cubin_for_sm90():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU's default; silences triton 3.9's notice
    done = subprocess.run([sys.executable, str(HARNESS)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {name: error for name, error in report.items() if error != "ok"}
    assert len(report) >= 40 and not failed, failed
