"""Where a decode step's time goes on GPU: the TP engine's forward alone, per batch size.

    python scripts/gpu_profile.py --model DIR [--tp 2]

Each rank (one process per GPU, NCCL) admits `batch` prompts, then times `steps` decode
steps, synchronising the GPU after each, and reports ms per step for rank 0. Compare with
the service's time per output token to see what serving adds (plan broadcast, sampling,
streaming through Ray).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def rank_main(rank, world, port, model_dir, dtype, batches, steps, out, plain=False):
    from serve_tp.batch import SequenceBatch
    from serve_tp.distributed import init_tp_comm
    from serve_tp.worker import load_sharded_model

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    comm = init_tp_comm(rank, world, "127.0.0.1", port, "nccl", 120, cuda_index=rank)
    if plain:  # control: the same module without deepspeed.init_inference
        from transformers import GPT2LMHeadModel

        from serve_tp.tp_gpt2 import shard_gpt2

        model = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=getattr(torch, dtype), attn_implementation="sdpa")
        model = shard_gpt2(model.eval(), world, rank, comm.all_reduce).to(device)
    else:
        model = load_sharded_model(model_dir, dtype, device, rank, world, comm.all_reduce)
    results = {}
    for batch_size in batches:
        batch = SequenceBatch(model, device)
        batch.admit([str(i) for i in range(batch_size)], [[1 + i % 50] * 32 for i in range(batch_size)])
        tokens = [5] * batch_size
        for _ in range(5):
            batch.decode(tokens)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            logits = batch.decode(tokens)
            torch.cuda.synchronize()
        results[batch_size] = 1000 * (time.perf_counter() - start) / steps
        # a plan broadcast over the gloo control group, as the engine sends each step
        plan = {"evict": [], "decode_tokens": tokens, "admit": []}
        start = time.perf_counter()
        for _ in range(steps):
            comm.broadcast_plan(plan)
        results[f"broadcast_{batch_size}"] = 1000 * (time.perf_counter() - start) / steps
        del logits
    if rank == 0:
        out.put(results)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--plain", action="store_true", help="skip deepspeed.init_inference (control)")
    args = parser.parse_args()
    from serve_tp.distributed import free_port

    batches = [int(b) for b in args.batches.split(",")]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=rank_main, args=(r, args.tp, port, args.model, args.dtype, batches, args.steps, out, args.plain))
             for r in range(args.tp)]
    for p in procs:
        p.start()
    results = out.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    print(f"\ndeepspeed.init_inference: {not args.plain}")
    print(f"| TP | dtype | batch | forward ms/step (synced) | plan broadcast ms |")
    print("|---|---|---|---|---|")
    for b in batches:
        print(f"| {args.tp} | {args.dtype} | {b} | {results[b]:.2f} | {results[f'broadcast_{b}']:.3f} |")


if __name__ == "__main__":
    main()
