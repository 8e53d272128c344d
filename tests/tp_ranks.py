"""Run the real TP path in `world_size` local processes (gloo or DeepSpeed shm on CPU), for the equivalence tests."""

from __future__ import annotations

import os
import queue
import time
import traceback

import torch
import torch.multiprocessing as mp

from serve_tp.engine.distributed import free_port


def _greedy(batch, prompts: list[list[int]], steps: int):
    """Greedy tokens and first-step logits for all prompts, decoded as one batch."""
    logits, _ = batch.admit([str(i) for i in range(len(prompts))], prompts)
    first_logits = logits.float().clone()
    tokens = [[int(t)] for t in logits.argmax(-1)]
    for _ in range(steps - 1):
        logits = batch.decode([seq[-1] for seq in tokens])
        for seq, t in zip(tokens, logits.argmax(-1)):
            seq.append(int(t))
    return tokens, first_logits


def _rank_main(rank, world_size, port, model_dir, prompts, steps, results, device_type, dtype, cuda_graphs,
               cpu_all_reduce):
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        from serve_tp.engine.batch import SequenceBatch
        from serve_tp.engine.distributed import init_tp_comm
        from serve_tp.model.forward import GPT2Forward
        from serve_tp.model.loader import load_sharded_model

        device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        comm = init_tp_comm(rank, world_size, "127.0.0.1", port, backend, 120, cuda_index=device.index or 0,
                            cpu_all_reduce=cpu_all_reduce)
        model = load_sharded_model(model_dir, dtype, device, rank, world_size, comm.all_reduce)
        batch = SequenceBatch(GPT2Forward(model, rank, world_size, comm.all_reduce), len(prompts),
                              model.config.n_positions, cuda_graphs=cuda_graphs)
        batch.capture()
        tokens, logits = _greedy(batch, prompts, steps)
        results.put((rank, (tokens, logits.cpu().numpy(), comm.all_reduce_kind), None))
    except Exception:
        results.put((rank, None, traceback.format_exc()))


def run_tp(model_dir: str, world_size: int, prompts: list[list[int]], steps: int,
           device: str = "cpu", dtype: str = "float32", cuda_graphs: bool = True, cpu_all_reduce: str = "auto"):
    """{rank: (greedy tokens, first-step logits, all-reduce kind)}; every rank's failure is raised.

    The ranks share this machine, so "auto" sums in shared memory where DeepSpeed can, as
    the app does."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, model_dir, prompts, steps, results, device, dtype, cuda_graphs,
                                              cpu_all_reduce))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    got = {}
    deadline = time.monotonic() + 300
    while len(got) < world_size:
        try:
            rank, result, error = results.get(timeout=1)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"TP ranks died or timed out (exit codes {dead})")
            continue
        if error:
            raise RuntimeError(f"rank {rank} failed:\n{error}")
        got[rank] = result
    for p in procs:
        p.join(timeout=60)
    return got
