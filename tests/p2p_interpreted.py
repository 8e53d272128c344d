"""Run the p2p all-reduce kernel under Triton's CPU interpreter, one spawned process per rank.

    TRITON_INTERPRET=1 python tests/p2p_interpreted.py WORLD [fused]

The ranks' "symmetric buffers" and signal pads are shared-memory tensors handed to spawned
processes; each builds its pointer tables from the addresses it maps them at (as symmetric
memory maps peers' buffers), and the interpreter's compare-and-swap is a real atomic on that
memory: the kernel's flags, slots and grid loop run as they do over NVLink, only slower.
Calls alternate slots; every third is published in place (`target`, as the decode step's
GEMM does), the others are copied in by the kernel. Prints one JSON line: each rank's calls
(bitwise equal to the float32 sum rounded once, plus the residual), and the pads afterwards
(all zero again when every flag raised was taken). tests/test_p2p_all_reduce.py runs it.

`fused`: the same, through `P2PAllReduce.linear`, the row-parallel GEMM whose programs sum
their tiles over the ranks (serve_tp/model/fused_linear.py, `fused_decode`). The expected sum
is each rank's partial made by the same kernel without the exchange (so its GEMM rounds
alike), summed in float32 in rank order and rounded once; rank 0 adds the bias. Its shapes
give 1-25 column tiles, tiles of 16 and 32 rows, and K in one chunk or three (split-K: each
tile's last program does the exchange).
"""

import json
import os
import queue
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from serve_tp.engine import p2p_all_reduce  # noqa: E402

ELEMENTS = 72 * 1024  # a slot: the 45 x 1600 call needs the grid loop (MAX_PROGRAMS x BLOCK = 65536)
CALLS = [(1, 768), (3, 1000), (45, 1600), (1, 768), (2, 1024), (4, 7)]  # (rows, width), slots alternate
FUSED_CALLS = [(1, 96, 768), (3, 64, 1600), (20, 130, 40), (2, 700, 768)]  # (rows, K, width)


class SharedMemoryRanks(p2p_all_reduce.P2PAllReduce):
    """P2PAllReduce over host tensors shared by spawned processes, without symmetric memory."""

    def __init__(self, rank: int, world: int, buffers, pads):
        self.rank, self.world_size, self.elements = rank, world, ELEMENTS
        self.model_dtype = torch.float16
        self.buffer = buffers[rank]
        self._last_slot = None
        self.pad_words = pads[rank].numel()
        self.buffer_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
        self.pad_ptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64)


def expected(parts, residual):
    total = sum(p.float() for p in parts).half()  # rank order, float32, rounded once
    return total if residual is None else (residual.float() + total.float()).half()


def rank_main(rank, world, buffers, pads, results):
    reduce = SharedMemoryRanks(rank, world, buffers, pads)
    generator = torch.Generator().manual_seed(0)  # every rank draws every rank's partial
    for call, (rows, width) in enumerate(CALLS):
        parts = [torch.randn(rows, width, generator=generator).half() for _ in range(world)]
        residual = torch.randn(rows, width, generator=generator).half() if call % 2 == 0 else None
        partial = parts[rank]
        if call % 3 == 1:  # published in place, as the decode step's GEMM does (no copy, relaxed flags)
            partial = reduce.target(rows, width, call % 2)
            partial.copy_(parts[rank])
        got = reduce(partial, residual=residual, slot=call % 2)
        results.put((rank, call, torch.equal(got, expected(parts, residual))))


def fused_rank_main(rank, world, buffers, pads, results):
    from serve_tp.model import fused_linear

    reduce = SharedMemoryRanks(rank, world, buffers, pads)
    generator = torch.Generator().manual_seed(0)  # every rank draws every rank's operands
    for call, (rows, k, width) in enumerate(FUSED_CALLS):
        xs = [torch.randn(rows, k, generator=generator).half() for _ in range(world)]
        weights = [(torch.randn(k, width, generator=generator) / k ** 0.5).half() for _ in range(world)]
        bias = torch.randn(width, generator=generator).half()
        residual = torch.randn(rows, width, generator=generator).half() if call % 2 == 0 else None
        parts = [fused_linear.linear_sum(x, w, bias if source == 0 else None) for source, (x, w) in
                 enumerate(zip(xs, weights))]
        got = reduce.linear(xs[rank], weights[rank], bias if rank == 0 else None, residual, slot=call % 2)
        results.put((rank, call, torch.equal(got, expected(parts, residual))))


def main(world: int, fused: bool = False) -> dict:
    assert ELEMENTS > p2p_all_reduce.MAX_PROGRAMS * p2p_all_reduce.BLOCK, "no call would loop over the grid"
    buffers = [torch.zeros(p2p_all_reduce.SLOTS * ELEMENTS, dtype=torch.float16).share_memory_()
               for _ in range(world)]
    programs = 128 if fused else p2p_all_reduce.MAX_PROGRAMS  # the fused grid is one program per 16-64 columns
    pads = [torch.zeros(programs * world, dtype=torch.int32).share_memory_() for _ in range(world)]
    target, calls_made = (fused_rank_main, FUSED_CALLS) if fused else (rank_main, CALLS)
    context = mp.get_context("spawn")  # a fork after torch started its threads can hang
    results = context.Queue()
    ranks = [context.Process(target=target, args=(r, world, buffers, pads, results)) for r in range(world)]
    for process in ranks:
        process.start()
    calls, deadline = [], time.monotonic() + 600
    while len(calls) < world * len(calls_made) and time.monotonic() < deadline:
        try:
            calls.append(results.get(timeout=1))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in ranks):  # a rank died: its peers would spin
                break
    for process in ranks:
        process.join(5)
        if process.is_alive():
            process.kill()
    return {"calls": sorted(calls), "pads_left": int(sum(int(p.abs().sum()) for p in pads)),
            "exit_codes": [p.exitcode for p in ranks]}


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (the kernel runs under Triton's CPU interpreter)")
    print(json.dumps(main(int(sys.argv[1]), fused=sys.argv[2:] == ["fused"])))
