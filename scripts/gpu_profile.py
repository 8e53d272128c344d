"""Where a decode step's time goes on GPU: the TP engine's batch alone, per batch size.

    python scripts/gpu_profile.py --model DIR [--tp 2] [--batches 1,32,128]

Each rank (one process per GPU, NCCL) admits `batch` prompts of 32 tokens, then times
`steps` decode steps of the engine's SequenceBatch, synchronising the GPU after each, with
the decode step replayed as a CUDA graph and launched eagerly. Also times a prefill and
the plan broadcast the engine sends each step. Compare with the service's time per output
token to see what serving adds (sampling, streaming through Ray and HTTP).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _time(fn, steps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / steps


def rank_main(rank, world, port, model_dir, dtype, batches, steps, out):
    from serve_tp.engine.batch import SequenceBatch
    from serve_tp.engine.rank_setup import setup_rank
    from serve_tp.messages import RankSettings
    from serve_tp.model.source import context_length, read_model_config

    context = context_length(read_model_config(Path(model_dir)))
    settings = RankSettings(model=model_dir, served_model_name="profile", device="cuda", dtype=dtype,
                            max_batch_size=max(batches), context_length=context, cuda_graphs=True,
                            collective_timeout_s=120)
    ready = setup_rank(rank, world, "127.0.0.1", port, settings, cuda_index=rank)
    comm, forward = ready.comm, ready.forward
    results = {}
    for graphs in (True, False):
        # the serving batch (graphs captured by setup_rank), then an eager one over the same forward
        batch = ready.batch if graphs else SequenceBatch(forward, max(batches), context, cuda_graphs=False)
        results[f"capture_s_{graphs}"] = batch.runner.capture_s
        for size in batches:
            ids = [str(i) for i in range(size)]
            prompts = [[1 + (i + j) % 50 for j in range(32)] for i in range(size)]
            start = time.perf_counter()
            batch.admit(ids, prompts)
            torch.cuda.synchronize()
            results[("prefill", size)] = 1000 * (time.perf_counter() - start)
            tokens = [5] * size
            results[(graphs, size)] = _time(lambda: batch.decode(tokens), steps)
            batch.evict(ids)
    plan = {"evict": [], "decode_tokens": [5] * max(batches), "admit": []}
    start = time.perf_counter()
    for _ in range(steps):
        comm.broadcast_plan(plan)
    results["broadcast"] = 1000 * (time.perf_counter() - start) / steps
    if rank == 0:
        out.put(results)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batches", default="1,8,32,128")
    args = parser.parse_args()
    from serve_tp.engine.distributed import free_port

    batches = [int(b) for b in args.batches.split(",")]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=rank_main, args=(r, args.tp, port, args.model, args.dtype, batches, args.steps, out))
             for r in range(args.tp)]
    for p in procs:
        p.start()
    results = out.get(timeout=400)
    for p in procs:
        p.join(timeout=60)
    print(f"\ngraph capture: {results['capture_s_True']:.2f}s; plan broadcast "
          f"({max(batches)} tokens): {results['broadcast']:.3f} ms")
    print("| TP | dtype | batch | decode ms/step, CUDA graph | decode ms/step, eager | prefill ms (32 tokens each) |")
    print("|---|---|---|---|---|---|")
    for b in batches:
        print(f"| {args.tp} | {args.dtype} | {b} | {results[(True, b)]:.3f} | {results[(False, b)]:.3f} "
              f"| {results[('prefill', b)]:.1f} |")


if __name__ == "__main__":
    main()
