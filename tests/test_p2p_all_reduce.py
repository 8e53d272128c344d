"""The p2p all-reduce kernel's protocol, on CPU: Triton's interpreter, one process per rank.

The GPU run (tests/test_gpu.py) checks it over NVLink inside the decode graphs; here the
flags, the two slots, the grid loop and the residual are checked where CI can run them
(`scripts/setup.sh --dev` installs triton 3.9 beside a CPU torch; skipped without it). A kernel that reads the wrong rank's or slot's
buffer, or misrounds, gives wrong sums; one that leaves a flag raised leaves a pad non-zero;
one that never takes its peer's flag hangs the next call until the timeout. Each fails this
test. Reusing one slot for consecutive calls is a race the interpreter's pace does not show
(a peer must still be reading when the slot is rewritten): that argument is in the module's
docstring, and the GPU tests run the kernel in the decode graphs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Triton 3.6's interpreter cannot loop over a range with tensor bounds (the kernel's grid loop;
# the GPU compiler can): 3.9's can.
pytest.importorskip("triton", minversion="3.9")

HARNESS = Path(__file__).with_name("p2p_interpreted.py")


@pytest.mark.parametrize("fused", [False, True], ids=["one-shot", "fused-gemm"])
@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_sum_rounded_once_and_the_pads_return_to_zero(world, fused):
    """one-shot: the all-reduce kernel; fused-gemm: P2PAllReduce.linear, whose GEMM programs
    sum their own tiles over the ranks (fused_decode)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(HARNESS), str(world)] + (["fused"] if fused else []), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    calls = report["calls"]
    assert len(calls) == world * (4 if fused else 6) and all(equal for _, _, equal in calls), calls
    assert report["pads_left"] == 0 and report["exit_codes"] == [0] * world

