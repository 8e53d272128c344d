"""Where a decode step's time goes on GPU: the TP engine's batch alone, per model shape, TP and batch.

    python scripts/gpu_profile.py --model DIR [--tp 2] [--batches 1,32,128]
    python scripts/gpu_profile.py --shapes gpt2,gpt2-medium,gpt2-large,gpt2-xl --tp 1,2 \\
        --batches 1,32,128 --json docs/results/h100x2/profile.jsonl

Each rank (one process per GPU, NCCL) admits `batch` prompts of 32 tokens, then times
`steps` decode steps of the engine's SequenceBatch, synchronising the GPU after each, with
the decode step replayed as a CUDA graph and launched eagerly. Also times a prefill and
the plan broadcast the engine sends each step. Compare with the service's time per output
token to see what serving adds (sampling, streaming through Ray and HTTP).

`--shapes` builds random-weight models of GPT-2's published shapes (vocabulary 50257,
1024 positions) under --shape-dir, once. A shape whose split the sharding refuses (gpt2-xl's
25 heads over 2 ranks, until uneven splits land) is skipped with the refusal, and so is a
run whose ranks fail (out of memory...): the other runs go on. `--json` appends one JSON
line per (shape, TP, batch): {model, layers, heads, embd, tp, dtype, batch, graph_ms,
eager_ms, ...}, with `skipped` holding the reason when there are no timings.
"""

import argparse
import datetime
import gc
import json
import queue
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

# GPT-2's published shapes: (layers, heads, width).
SHAPES = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


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
    try:
        _rank_main(rank, world, port, model_dir, dtype, batches, steps, out)
    except BaseException:  # the parent must hear of it, not wait for a result that never comes
        out.put(("error", rank, traceback.format_exc()))


def _rank_main(rank, world, port, model_dir, dtype, batches, steps, out):
    from serve_tp.engine.rank_setup import setup_rank
    from serve_tp.messages import RankSettings
    from serve_tp.model.source import context_length, read_model_config

    context = context_length(read_model_config(Path(model_dir)))
    # The serving path's rank setup with a one-slot eager batch: each timing pass below
    # builds the batch it times, so the graph pass's KV cache is freed before the eager one's.
    settings = RankSettings(model=model_dir, served_model_name="profile", device="cuda", dtype=dtype,
                            max_batch_size=1, context_length=context, cuda_graphs=False,
                            collective_timeout_s=120, plan_channel="shm")
    ready = setup_rank(rank, world, "127.0.0.1", port, settings, cuda_index=rank)
    comm, forward = ready.comm, ready.forward
    ready.batch = None
    results = {}
    for graphs in (True, False):
        _time_pass(forward, context, batches, steps, graphs, results)
        # The KV cache of the largest shapes takes half the GPU: the graph pass's is freed
        # (its batch went out of scope) before the eager pass allocates its own.
        gc.collect()
        torch.cuda.empty_cache()
    plan = {"evict": [], "decode_tokens": [5] * max(batches), "admit": []}
    start = time.perf_counter()
    for _ in range(steps):
        comm.broadcast_plan(plan)
    results["broadcast"] = 1000 * (time.perf_counter() - start) / steps  # the shared-memory ring
    start = time.perf_counter()
    for _ in range(steps if world > 1 else 0):
        comm._gloo_plan(plan)  # the fallback, side by side
    results["broadcast_gloo"] = 1000 * (time.perf_counter() - start) / steps
    if rank == 0:
        out.put(("ok", rank, results))


def _time_pass(forward, n_positions, batches, steps, graphs, results):
    from serve_tp.engine.batch import SequenceBatch

    batch = SequenceBatch(forward, max(batches), n_positions, cuda_graphs=graphs)
    batch.capture()
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


def run_ranks(model_dir, tp, dtype, batches, steps, timeout_s):
    """Rank 0's timings, or raise with the first rank's traceback (or a timeout)."""
    from serve_tp.engine.distributed import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=rank_main, args=(r, tp, port, model_dir, dtype, batches, steps, out))
             for r in range(tp)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                status, rank, payload = out.get(timeout=1)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"ranks died or timed out after {timeout_s}s (exit codes {dead})")
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            return payload
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def ensure_shape_model(name: str, root: Path) -> Path:
    """A random-weight model of `name`'s shape under root (built once; the device has no Hub)."""
    from serve_tp.model.tiny_model import build_tiny_gpt2

    layers, heads, embd = SHAPES[name]
    path = root / name
    if not (path / "config.json").is_file():
        t = time.monotonic()
        # Random weights, initialised on the GPU: timing needs the shape, not training (800
        # CPU steps of gpt2-xl, the builder's default, ran past a whole device session).
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            build_tiny_gpt2(path, n_layer=layers, n_head=heads, n_embd=embd, n_positions=1024,
                            model_vocab_size=50257, train_steps=0)
        print(f"built {name}-shaped random model in {time.monotonic() - t:.0f}s: {path}", flush=True)
    return path


def split_refusal(heads: int, embd: int, tp: int):
    """The sharding's own refusal of this split, if it refuses (None: it accepts, or cannot say)."""
    try:
        from serve_tp.model.sharding import check_gpt2_shardable

        check_gpt2_shardable(heads, 4 * embd, tp)
    except ValueError as exc:
        return str(exc)
    except Exception:  # the check moved or changed: let the ranks themselves try
        return None
    return None


def model_shape(model_dir: str):
    cfg = json.loads(Path(model_dir, "config.json").read_text())
    return cfg["n_layer"], cfg["n_head"], cfg["n_embd"]


def _command(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="one model directory (instead of --shapes)")
    parser.add_argument("--shapes", default=None, help=f"comma-separated, from {','.join(SHAPES)}")
    parser.add_argument("--shape-dir", default="/tmp/gpt2-shapes", help="where --shapes models are built")
    parser.add_argument("--tp", default="2", help="comma-separated TP sizes, e.g. 1,2")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--run-timeout-s", type=float, default=400, help="per (shape, TP) run")
    parser.add_argument("--json", default=None, help="append one JSON line per (shape, TP, batch) to this file")
    args = parser.parse_args()
    if bool(args.model) == bool(args.shapes):
        parser.error("give --model DIR or --shapes NAMES")
    batches = [int(b) for b in args.batches.split(",")]
    tps = [int(t) for t in args.tp.split(",")]
    if args.shapes:
        unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
        if unknown:
            parser.error(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
    names = args.shapes.split(",") if args.shapes else [Path(args.model).name]
    common = {"dtype": args.dtype, "steps": args.steps, "gpu": _command(["nvidia-smi", "--query-gpu=name",
              "--format=csv,noheader,nounits", "-i", "0"]), "commit": _command(["git", "rev-parse", "--short", "HEAD"]),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    lines = []
    for name in names:
        model_dir = str(ensure_shape_model(name, Path(args.shape_dir))) if args.shapes else args.model
        layers, heads, embd = model_shape(model_dir)
        for tp in tps:
            base = {"model": name, "layers": layers, "heads": heads, "embd": embd, "tp": tp, **common}
            skipped = split_refusal(heads, embd, tp)
            results = None
            if skipped is None and tp > torch.cuda.device_count():
                skipped = f"TP={tp} needs {tp} GPUs; {torch.cuda.device_count()} visible"
            if skipped is None:
                t = time.monotonic()
                try:
                    results = run_ranks(model_dir, tp, args.dtype, batches, args.steps, args.run_timeout_s)
                except RuntimeError as exc:
                    skipped = str(exc).strip().splitlines()[-1]
                    print(f"{name} TP={tp} failed:\n{exc}", flush=True)
                base["run_s"] = round(time.monotonic() - t, 1)
            if skipped:
                print(f"skip {name} TP={tp}: {skipped}", flush=True)
                rows = [{**base, "batch": b, "graph_ms": None, "eager_ms": None, "skipped": skipped} for b in batches]
            else:
                print(f"\n{name} TP={tp}: graph capture {results['capture_s_True']:.2f}s; plan broadcast "
                      f"({max(batches)} tokens): {results['broadcast']:.3f} ms "
                      f"(shared-memory ring; {results['broadcast_gloo']:.3f} ms over gloo)", flush=True)
                rows = [{**base, "batch": b, "graph_ms": round(results[(True, b)], 4),
                         "eager_ms": round(results[(False, b)], 4), "prefill_ms": round(results[("prefill", b)], 2),
                         "capture_s": round(results["capture_s_True"], 2), "broadcast_ms": round(results["broadcast"], 4),
                         "broadcast_gloo_ms": round(results["broadcast_gloo"], 4)}
                        for b in batches]
            lines += rows
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                with open(args.json, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
    print("\n" + markdown(lines))


def markdown(rows) -> str:
    out = ["| model | layers | heads | embd | TP | dtype | batch | decode ms/step, CUDA graph "
           "| decode ms/step, eager | prefill ms (32 tokens each) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            cells = ["skipped: " + r["skipped"][:120], "", ""]
        else:
            cells = [f"{r['graph_ms']:.3f}", f"{r['eager_ms']:.3f}", f"{r['prefill_ms']:.1f}"]
        out.append(f"| {r['model']} | {r['layers']} | {r['heads']} | {r['embd']} | {r['tp']} | {r['dtype']} "
                   f"| {r['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
