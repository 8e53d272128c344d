"""One all-reduce on CPU ranks, DeepSpeed's shared memory against gloo: microseconds per call.

    python -m benchmarks.all_reduce_latency [--world-size 2] [--calls 2000]

Each rank runs the model's row-parallel all-reduce (TPComm.all_reduce, the same code the
app uses) on fp32 tensors of the shapes a decode step sums: [batch, hidden] for the tiny
test model (96 wide) and GPT-2 small (768). A barrier precedes each shape; the median
and p90 over `calls` calls are rank 0's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.multiprocessing as mp

SHAPES = [(1, 96), (16, 96), (1, 768), (16, 768), (32, 768)]


def _rank(rank: int, world_size: int, port: int, kind: str, calls: int, results) -> None:
    torch.set_num_threads(1)
    from serve_tp.engine.distributed import init_tp_comm

    comm = init_tp_comm(rank, world_size, "127.0.0.1", port, "gloo", 60, cpu_all_reduce=kind)
    rows = []
    for shape in SHAPES:
        tensor = torch.ones(shape)
        for _ in range(50):  # warm-up
            comm.all_reduce(tensor)
        torch.distributed.barrier()
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            comm.all_reduce(tensor)
            times.append(time.perf_counter() - started)
        times.sort()
        rows.append((shape, statistics.median(times) * 1e6, times[int(0.9 * len(times))] * 1e6))
    if rank == 0:
        results.put((comm.all_reduce_kind, rows))
    torch.distributed.barrier()


def measure(kind: str, world_size: int, calls: int) -> tuple[str, list]:
    from serve_tp.engine.distributed import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=_rank, args=(r, world_size, port, kind, calls, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    got = results.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    print("| all-reduce | shape | p50 µs | p90 µs |\n|---|---|---|---|")
    for kind in ("shm", "gloo"):
        used, rows = measure(kind, args.world_size, args.calls)
        for shape, p50, p90 in rows:
            print(f"| {used} | {list(shape)} | {p50:.1f} | {p90:.1f} |", flush=True)


if __name__ == "__main__":
    main()
