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



def test_the_fused_sum_is_taken_only_where_every_tile_can_meet_its_peers(monkeypatch):
    """P2PAllReduce.takes_linear: every row in the tile, a flag per column tile and sender in
    the pad, and fewer column tiles than programs the GPU runs at once (each tile's last
    program spins for its peers; with no SM to spare a chunk it waits for could never start).
    Otherwise the forward sums the partial over NCCL instead."""
    import torch

    from serve_tp.engine import p2p_all_reduce
    from serve_tp.model import fused_linear

    reduce = object.__new__(p2p_all_reduce.P2PAllReduce)  # the rule alone: no symmetric memory
    reduce.world_size, reduce.elements, reduce.pad_words = 2, 64 * 1280, 256
    reduce.buffer = torch.zeros(1)
    assert fused_linear.plan(5120, 1280).tiles == 20
    monkeypatch.setattr(fused_linear, "resident_programs", lambda device: 21)
    assert reduce.takes_linear(fused_linear.MAX_ROWS, 5120, 1280)
    assert not reduce.takes_linear(fused_linear.MAX_ROWS + 1, 5120, 1280)  # fits the slot, not the tile
    assert not reduce.takes_linear(1, 5120, 64 * 1280 + 1)  # outgrows the slot
    monkeypatch.setattr(fused_linear, "resident_programs", lambda device: 20)
    assert not reduce.takes_linear(1, 5120, 1280)  # 20 tiles could fill all 20 SMs with spinners
    monkeypatch.setattr(fused_linear, "resident_programs", lambda device: 21)
    reduce.pad_words = 39
    assert not reduce.takes_linear(1, 5120, 1280)  # 20 tiles x 2 senders need 40 flags
