"""Where a decode step's time goes on GPU: the TP engine's batch alone, per model shape, TP and batch.

    python scripts/gpu_profile.py --model DIR [--tp 2] [--batches 1,32,128]
    python scripts/gpu_profile.py --shapes gpt2,gpt2-medium,gpt2-large,gpt2-xl --tp 1,2 \\
        --batches 1,32,128 --json docs/results/h100x2/profile.jsonl
    python scripts/gpu_profile.py --shapes gpt2 --tp 1 --batches 1,32 --compile off,on \\
        --attention sdpa,triton --mlp-epilogue off,on --kernels --steps 50

Each rank (one process per GPU, NCCL) admits `batch` prompts of 32 tokens (`--prompt-tokens`), then times
`steps` decode steps of the engine's SequenceBatch, synchronising the GPU after each, with
the decode step replayed as a CUDA graph and launched eagerly. Also times a prefill and
the plan broadcast the engine sends each step. Compare with the service's time per output
token to see what serving adds (sampling, streaming through Ray and HTTP).

`--shapes` writes config-only directories of GPT-2's published shapes (vocabulary 50257)
under --shape-dir; each rank draws random weights on its GPU in the target dtype
(random_shard: seconds, where building and loading a checkpoint took minutes). One run of
ranks per (shape, TP) times every variant: the decode all-reduce (`--all-reduce`: NCCL, our
p2p kernel or torch's symmetric-memory one-shot, serve_tp/engine/fast_all_reduce.py) x `--compile`
(compile_decode off / on / max = Inductor max-autotune, serve_tp/model/compiled.py) x
`--attention` (decode_attention sdpa / triton: index_put + SDPA, or one Triton kernel per
layer, serve_tp/model/decode_attention.py; fused: fused_decode, five Triton kernels a layer
up to 32 rows, serve_tp/model/fused_linear.py; fused-unsplit: the same without split-K) x
`--mlp-epilogue` (off / on: the c_fc GEMM with its bias + tanh GELU in cuBLASLt's epilogue
where ATen takes it, serve_tp/model/epilogue.py), so their rows share GPUs and warm-up. The
eager pass also counts the kernels one step launches (torch.profiler): the count a graph
replays, which sets a small step's time.
`--kernels` lists them: for every row, the kernels of one graph-replayed step by name with
their counts (and per layer), what is left to fuse. A shape whose split the sharding refuses
is skipped with the refusal, and so is a run whose ranks fail (out of memory...): the other runs go on. `--json`
appends one JSON line per (shape, TP, variant, batch): {model, layers, heads, embd, tp,
dtype, batch, decode_all_reduce, compile, attention, mlp_epilogue, graph_ms, eager_ms,
kernels_per_step, capture_s (compile included), ...; with --kernels also graph_kernels_per_step
and kernels: [[name, count], ...] of the graph-replayed step}, with `skipped` holding the reason
when there are no timings. The summary ends with TP=2 / TP=1.
"""

import argparse
import collections
import contextlib
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


def rank_main(rank, world, port, model_dir, dtype, batches, steps, out, variants, context, prompt_tokens,
              list_kernels=False):
    try:
        _rank_main(rank, world, port, model_dir, dtype, batches, steps, out, variants, context, prompt_tokens,
                   list_kernels)
    except BaseException:  # the parent must hear of it, not wait for a result that never comes
        out.put(("error", rank, traceback.format_exc()))


def _rank_main(rank, world, port, model_dir, dtype, batches, steps, out, variants, context, prompt_tokens,
               list_kernels):
    from serve_tp.engine import rank_setup
    from serve_tp.engine.fast_all_reduce import setup_decode_all_reduce
    from serve_tp.messages import RankSettings
    from serve_tp.model.forward import GPT2Forward

    if Path(model_dir, RANDOM_MARK).is_file():  # a shape without weights: random ones, made on the GPU
        rank_setup.load_shard = random_shard
    # The serving path's rank setup with an eager batch: each timing pass below builds the
    # batch it times, so one pass's KV cache is freed before the next one's.
    settings = RankSettings(model=model_dir, served_model_name="profile", device="cuda", dtype=dtype,
                            max_batch_size=max(batches), context_length=context, cuda_graphs=False,
                            collective_timeout_s=120, plan_channel="shm", gpu_all_reduce="nccl")
    ready = rank_setup.setup_rank(rank, world, "127.0.0.1", port, settings, cuda_index=rank)
    comm, shard = ready.comm, ready.shard
    ready.batch = ready.forward = None
    gc.collect()
    # every peer-memory path asked for, set up in the same order on every rank (collective)
    fast = {}
    for kind in dict.fromkeys(v[0] for v in variants if v[0] != "nccl" and world > 1):
        try:
            fast[kind] = setup_decode_all_reduce(kind, rank, world, shard.device, shard.dtype, max(batches),
                                                 shard.config.n_embd, comm.control_group)
        except RuntimeError as exc:
            fast[kind] = (None, f"skipped: {exc}")
    results = {"paths": {}}
    for variant in variants:
        path, compiled, attention, epilogue = variant
        reduce, why = fast.get(path, (None, None))
        if path != "nccl" and reduce is None:
            results["paths"][variant] = why or "skipped: one rank"
            continue
        fused = attention.startswith("fused")  # fused_decode: Triton's attention, GEMMs with their neighbours fused
        forward = GPT2Forward(shard, comm.all_reduce, decode_all_reduce=reduce, compile_decode=compiled,
                              decode_attention="triton" if fused else attention, mlp_epilogue=epilogue,
                              fused_decode=fused)
        label = (reduce.description if reduce is not None else comm.all_reduce_kind) if world > 1 else "none"
        results["paths"][variant] = label
        with _fused_launches(attention):
            for graphs in (True, False):
                _time_pass(forward, context, batches, steps, graphs, results, variant, prompt_tokens, list_kernels)
                # The KV cache of the largest shapes takes half the GPU: one pass's is freed
                # (its batch went out of scope) before the next allocates its own.
                gc.collect()
                torch.cuda.empty_cache()
    plan = {"evict": [], "decode_tokens": [5] * max(batches), "admit": []}
    start = time.perf_counter()
    for _ in range(steps):
        comm.broadcast_plan(plan)
    results["broadcast"] = 1000 * (time.perf_counter() - start) / steps  # the shared-memory ring
    if rank == 0:
        out.put(("ok", rank, results))


@contextlib.contextmanager
def _fused_launches(attention: str):
    """fused-unsplit: fused_linear's first launches (one program per column tile of the
    block_cols rule, K whole) for this variant's passes, to set split-K beside them in one run."""
    from serve_tp.model import fused_linear

    saved = fused_linear.PROGRAMS, fused_linear.BLOCK_N
    if attention == "fused-unsplit":
        fused_linear.PROGRAMS, fused_linear.BLOCK_N = 0, None
    try:
        yield
    finally:
        fused_linear.PROGRAMS, fused_linear.BLOCK_N = saved


def _time_pass(forward, n_positions, batches, steps, graphs, results, variant, prompt_tokens, list_kernels):
    from serve_tp.engine.batch import SequenceBatch

    batch = SequenceBatch(forward, max(batches), n_positions, cuda_graphs=graphs)
    torch.cuda.synchronize()
    started = time.monotonic()
    batch.capture()
    results[(variant, "capture_s", graphs)] = time.monotonic() - started  # compile included
    for size in batches:
        ids = [str(i) for i in range(size)]
        prompts = [[1 + (i + j) % 50 for j in range(prompt_tokens)] for i in range(size)]
        start = time.perf_counter()
        batch.admit(ids, prompts)
        torch.cuda.synchronize()
        results[(variant, "prefill", size)] = 1000 * (time.perf_counter() - start)
        tokens = [5] * size
        results[(variant, graphs, size)] = _time(lambda: batch.decode(tokens), steps)
        if not graphs:  # what a graph replays: the eager step's kernels (all-reduces included)
            results[(variant, "kernels", size)] = sum(_step_kernels(lambda: batch.decode(tokens)).values())
        elif list_kernels:  # the replayed graph's own kernels, by name (CUPTI reports each one)
            results[(variant, "kernel_names", size)] = _step_kernels(lambda: batch.decode(tokens)).most_common()
        batch.evict(ids)


def _step_kernels(step) -> "collections.Counter[str]":
    """GPU kernels (and memcpy/memset) one decode step runs, by name, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return collections.Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def kernel_listing(row) -> str:
    """One row's graph-replayed step: its kernels by name, most frequent first, with counts per
    layer (12 per step in a 12-layer model: once per layer)."""
    names = row.get("kernels") or []
    head = (f"{row['model']} TP={row['tp']} batch {row['batch']} compile={compile_label(row['compile'])} "
            f"attention={row.get('attention', 'sdpa')} mlp_epilogue={'on' if row.get('mlp_epilogue') else 'off'}: "
            f"{row.get('graph_kernels_per_step')} kernels per graph-replayed step "
            f"({row.get('kernels_per_step')} eager), {row['layers']} layers")
    lines = [f"  {count:5d}  {count / row['layers']:5.2f}/layer  {name[:160]}" for name, count in names]
    return "\n".join([head] + (lines or ["  (the profiler saw no kernels in the replayed graph)"]))


RANDOM_MARK = "random_weights"


def random_shard(model_dir: str, dtype_name: str, device, rank: int, world_size: int):
    """This rank's shard of a GPT-2 of model_dir's shape with random weights (normal, std 0.02),
    built on the meta device and allocated on the GPU in its dtype: seconds for gpt2-xl, where
    transformers' CPU init, a checkpoint and load_shard took minutes. Timing needs no training."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from serve_tp.model.shard import shard_gpt2

    config = GPT2Config.from_pretrained(model_dir)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    shard = shard_gpt2(model, world_size, rank).to(getattr(torch, dtype_name)).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(rank)
    with torch.no_grad():
        for name, tensor in shard.named_parameters():
            if ".ln_" in name or name.startswith("ln_f"):
                tensor.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                tensor.normal_(0.0, 0.02, generator=gen)
    return shard


def run_ranks(model_dir, tp, dtype, batches, steps, timeout_s, variants, context, prompt_tokens, list_kernels=False):
    """Rank 0's timings, or raise with the first rank's traceback (or a timeout)."""
    from serve_tp.engine.distributed import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=rank_main, args=(r, tp, port, model_dir, dtype, batches, steps, out, variants, context,
                                                      prompt_tokens, list_kernels))
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
    """A config-only directory of `name`'s shape under root; the ranks make random weights
    (random_shard): the device has no Hub, and timing needs no trained weights."""
    from transformers import GPT2Config

    layers, heads, embd = SHAPES[name]
    path = root / name
    if not (path / RANDOM_MARK).is_file():
        GPT2Config(n_layer=layers, n_head=heads, n_embd=embd, n_positions=1024, vocab_size=50257).save_pretrained(path)
        (path / RANDOM_MARK).write_text("weights are drawn at random by each rank\n")
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
    parser.add_argument("--shape-dir", default="/tmp/gpt2-shapes", help="where --shapes configs are written")
    parser.add_argument("--tp", default="2", help="comma-separated TP sizes, e.g. 1,2")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--context", type=int, default=None,
                        help="KV-cache positions (default: the model's); fewer spans, fewer graphs to capture")
    parser.add_argument("--all-reduce", default="nccl,p2p",
                        help="decode all-reduce paths to time at TP>1: nccl, p2p (our kernel), symm_mem "
                             "(torch's one-shot); one run times each")
    parser.add_argument("--compile", default="off,on",
                        help="compile_decode: off, on (Inductor's default mode), max (max-autotune-no-cudagraphs), comma-separated")
    parser.add_argument("--prompt-tokens", type=int, default=32,
                        help="each prompt's length: decode steps attend over this many positions and more "
                             "(near --context: the long spans where attention's cost shows)")
    parser.add_argument("--attention", default="sdpa",
                        help="decode_attention: sdpa (index_put + SDPA), triton (one kernel per layer), or fused "
                        "(fused_decode: triton's attention and the GEMMs with their neighbours fused, "
                        "serve_tp/model/fused_linear.py), or fused-unsplit (the same without split-K: one "
                        "program per column tile, the first kernels), comma-separated")
    parser.add_argument("--mlp-epilogue", default="off",
                        help="GPT2Forward's mlp_epilogue: off (addmm, then GELU), on (bias + tanh GELU in the c_fc "
                             "GEMM's cuBLASLt epilogue where ATen takes it), comma-separated")
    parser.add_argument("--kernels", action="store_true",
                        help="list each row's graph-replayed step kernels by name with counts (and in --json)")
    parser.add_argument("--run-timeout-s", type=float, default=400, help="per (shape, TP) run")
    parser.add_argument("--time-limit-s", type=float, default=None, help="no (shape, TP) run starts after this")
    parser.add_argument("--json", default=None, help="append one JSON line per row to this file")
    args = parser.parse_args()
    if bool(args.model) == bool(args.shapes):
        parser.error("give --model DIR or --shapes NAMES")
    batches = [int(b) for b in args.batches.split(",")]
    tps = [int(t) for t in args.tp.split(",")]
    compiles = [COMPILE_CHOICES[c] for c in args.compile.split(",")]
    attentions = args.attention.split(",")
    unknown = [a for a in attentions if a not in ("sdpa", "triton", "fused", "fused-unsplit")]
    if unknown:
        parser.error(f"unknown --attention {unknown}; choose from sdpa, triton, fused, fused-unsplit")
    unknown = [e for e in args.mlp_epilogue.split(",") if e not in ON_OFF]
    if unknown:
        parser.error(f"unknown --mlp-epilogue {unknown}; choose from off, on")
    epilogues = [ON_OFF[e] for e in args.mlp_epilogue.split(",")]
    if args.shapes:
        unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
        if unknown:
            parser.error(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
    names = args.shapes.split(",") if args.shapes else [Path(args.model).name]
    common = {"dtype": args.dtype, "steps": args.steps, "gpu": _command(["nvidia-smi", "--query-gpu=name",
              "--format=csv,noheader,nounits", "-i", "0"]), "commit": _command(["git", "rev-parse", "--short", "HEAD"]),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    lines, began = [], time.monotonic()
    for name in names:
        model_dir = str(ensure_shape_model(name, Path(args.shape_dir))) if args.shapes else args.model
        layers, heads, embd = model_shape(model_dir)
        context = args.context or json.loads(Path(model_dir, "config.json").read_text())["n_positions"]
        if args.prompt_tokens + args.steps + 5 > context:  # + 3 warm-up steps and the 2 the kernel count takes
            parser.error(f"--prompt-tokens {args.prompt_tokens} + --steps {args.steps} + 5 exceed the "
                         f"{context} cached positions of {name}")
        for tp in tps:
            paths = args.all_reduce.split(",") if tp > 1 else ["nccl"]
            variants = [(p, c, a, e) for p in paths for c in compiles for a in attentions for e in epilogues]
            base = {"model": name, "layers": layers, "heads": heads, "embd": embd, "tp": tp, "context": context,
                    "prompt_tokens": args.prompt_tokens,
                    **common}
            skipped = split_refusal(heads, embd, tp)
            results = None
            if skipped is None and tp > torch.cuda.device_count():
                skipped = f"TP={tp} needs {tp} GPUs; {torch.cuda.device_count()} visible"
            if skipped is None and args.time_limit_s and time.monotonic() - began > args.time_limit_s:
                skipped = f"time limit {args.time_limit_s:.0f}s reached"
            if skipped is None:
                t = time.monotonic()
                try:
                    results = run_ranks(model_dir, tp, args.dtype, batches, args.steps, args.run_timeout_s,
                                        variants, context, args.prompt_tokens, args.kernels)
                except RuntimeError as exc:
                    skipped = str(exc).strip().splitlines()[-1]
                    print(f"{name} TP={tp} failed:\n{exc}", flush=True)
                base["run_s"] = round(time.monotonic() - t, 1)
            rows = []
            for v in variants:
                path, compiled, attention, epilogue = v
                row = {**base, "compile": compiled, "attention": attention, "mlp_epilogue": epilogue}
                label = None if results is None else results["paths"].get(v)
                why = skipped or (label if label and label.startswith("skipped") else None)
                if why:
                    rows += [{**row, "batch": b, "decode_all_reduce": path, "graph_ms": None, "eager_ms": None,
                              "skipped": why} for b in batches]
                    continue
                rows += [{**row, "batch": b, "decode_all_reduce": label, "graph_ms": round(results[(v, True, b)], 4),
                          "eager_ms": round(results[(v, False, b)], 4),
                          "prefill_ms": round(results[(v, "prefill", b)], 2),
                          "kernels_per_step": results.get((v, "kernels", b)),
                          "capture_s": round(results[(v, "capture_s", True)], 2),
                          "broadcast_ms": round(results["broadcast"], 4),
                          **_kernel_fields(results.get((v, "kernel_names", b)), args.kernels)} for b in batches]
            print("\n".join(markdown(rows).splitlines()[2:]), flush=True)
            if args.kernels:
                print("\n\n".join(kernel_listing(r) for r in rows if not r.get("skipped")), flush=True)
            lines += rows
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                with open(args.json, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
    print("\n" + markdown(lines) + "\n\n" + ratios(lines))


def _kernel_fields(names, listed: bool) -> dict:
    if not listed:
        return {}
    names = names or []
    return {"graph_kernels_per_step": sum(count for _, count in names), "kernels": [list(n) for n in names]}


ON_OFF = {"off": False, "on": True}
# --compile's choices -> GPT2Forward's compile_decode (False, True, or an Inductor mode)
COMPILE_CHOICES = {"off": False, "on": True, "max": "max-autotune-no-cudagraphs"}


def compile_label(compiled) -> str:
    return next(name for name, value in COMPILE_CHOICES.items() if value == compiled)


def markdown(rows) -> str:
    out = ["| model | layers | heads | embd | TP | dtype | batch | decode all-reduce | compiled | attention | "
           "MLP epilogue | decode ms/step, CUDA graph | decode ms/step, eager | kernels/step | "
           "prefill ms (whole prompts) | capture s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            cells = ["skipped: " + r["skipped"][:120], "", "", "", ""]
        else:
            cells = [f"{r['graph_ms']:.3f}", f"{r['eager_ms']:.3f}", str(r.get("kernels_per_step", "")),
                     f"{r['prefill_ms']:.1f}", f"{r['capture_s']:.1f}"]
        out.append(f"| {r['model']} | {r['layers']} | {r['heads']} | {r['embd']} | {r['tp']} | {r['dtype']} "
                   f"| {r['batch']} | {r['decode_all_reduce']} | {compile_label(r['compile'])} "
                   f"| {r.get('attention', 'sdpa')} | {_on_off(r.get('mlp_epilogue'))} | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def _on_off(flag) -> str:
    return "on" if flag else "off"  # rows from before the epilogue existed: off


def ratios(rows) -> str:
    """TP=2 step over TP=1 step (CUDA graphs), per shape, batch, all-reduce path, compile, attention
    and MLP epilogue."""
    def key(r):
        return r["model"], r["batch"], r["compile"], r.get("attention", "sdpa"), bool(r.get("mlp_epilogue"))

    one = {key(r): r["graph_ms"] for r in rows if r["tp"] == 1 and r["graph_ms"]}
    out = ["| model | batch | TP=2 all-reduce | compiled | attention | MLP epilogue | TP=1 ms | TP=2 ms | TP=2 / TP=1 |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = one.get(key(r))
        if r["tp"] == 2 and r["graph_ms"] and base:
            out.append(f"| {r['model']} | {r['batch']} | {r['decode_all_reduce']} | {compile_label(r['compile'])} "
                       f"| {r.get('attention', 'sdpa')} | {_on_off(r.get('mlp_epilogue'))} | {base:.3f} "
                       f"| {r['graph_ms']:.3f} | {r['graph_ms'] / base:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
