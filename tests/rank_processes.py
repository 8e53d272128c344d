"""Real rank processes for the comm tests: spawn `world_size` of them on one rendezvous
port, and gather each one's report (or its traceback) from a queue.

A target is `target(rank, world_size, port, results, *args)` and puts
`(rank, report, error)` on `results`, with `error` a traceback string or None.
"""

from __future__ import annotations

import queue
import time

import torch.multiprocessing as mp

from serve_tp.engine.distributed import free_port


def spawn_ranks(target, world_size, *args):
    """(processes, results queue, port): every rank started, on a port just taken."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=target, args=(r, world_size, port, results, *args)) for r in range(world_size)]
    for p in procs:
        p.start()
    return procs, results, port


def collect_reports(procs, results, world_size, timeout=240):
    """{rank: report}; a rank's error, a dead rank or the timeout is raised. The processes
    are joined (killed if they linger) whatever happens."""
    got, deadline = {}, time.monotonic() + timeout
    try:
        while len(got) < world_size:
            try:
                rank, report, error = results.get(timeout=1)
            except queue.Empty:
                if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"ranks died or timed out: {[p.exitcode for p in procs]}")
                continue
            if error:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            got[rank] = report
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return got
