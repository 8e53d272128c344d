"""All-reduce microbenchmark for a TP=2 decode step: which all-reduce is fastest for small activations?

    python scripts/allreduce_bench.py [--json OUT.json] [--md OUT.md]

A decode step all-reduces `rows x width` activations (rows = sequences in the batch) twice
per layer, so at batch 1 the latency of a tiny all-reduce, not bandwidth, bounds TP's
speed. For fp16/bf16/fp32, rows 1..256 and widths 768/1024/1280/1600 (GPT-2 small to
XL), on 2 GPUs, this times:
  (a) nccl eager         dist.all_reduce, one launch per op
  (b) nccl graph         the same ops captured in a CUDA graph and replayed
  (c) nccl LL/Ring       NCCL_PROTO=LL, NCCL_ALGO=Ring, with 1, 2 and default channels
  (d) symm_mem           torch.distributed._symmetric_memory one_shot_all_reduce and
                         two_shot_all_reduce_ (peer loads over NVLink, no multicast)
  (e) p2p                the peer's buffer shared by CUDA IPC (torch.multiprocessing),
                         copied and added (p2p_copy_add), or read in place by a Triton
                         add kernel (p2p_triton). No flag orders the ranks: a lower bound
                         on what a custom all-reduce could reach, not a usable one.
  (f) serve_tp_p2p       serve_tp's own one-kernel all-reduce (serve_tp/engine/p2p_all_reduce.py):
                         flags in symmetric-memory signal pads order the ranks; usable. The input
                         copied into the symmetric buffer by the kernel (release/acquire flags),
                         or already there (_in_place, as the decode step's GEMM leaves it; relaxed).
each eagerly and graph-captured. Every variant's result is checked against the exact
two-rank sum: with 2 ranks each element is one addition, rounded once, so a correct
all-reduce (NCCL's included: its row says so) is bitwise equal to `a + b` in the dtype.
The control column is what that one rounding does (max |a + b - exact|).

Each group of variants runs in its own pair of processes (NCCL reads its settings once per
process; a variant that crashes its CUDA context takes only its group down), under a
timeout, and every failure is recorded, not raised. NVLink multicast stays off
(NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1) and no
multimem operation is used.
"""

import os

# Before torch (and NCCL) load: multicast objects must never be created on the shared
# device machines.
for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import queue  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import allreduce_variants as variants  # noqa: E402

LL_RING = {"NCCL_PROTO": "LL", "NCCL_ALGO": "Ring"}
# (group name, NCCL settings for its processes, variant kinds it runs)
GROUPS = [
    ("nccl", {}, ["nccl"]),
    ("nccl_ll_ring_ch1", {**LL_RING, "NCCL_MIN_NCHANNELS": "1", "NCCL_MAX_NCHANNELS": "1"}, ["nccl"]),
    ("nccl_ll_ring_ch2", {**LL_RING, "NCCL_MIN_NCHANNELS": "2", "NCCL_MAX_NCHANNELS": "2"}, ["nccl"]),
    ("nccl_ll_ring", dict(LL_RING), ["nccl"]),
    ("symm_mem", {}, ["one_shot", "two_shot"]),
    ("p2p_ipc", {}, ["p2p_copy_add", "p2p_triton"]),
    ("serve_tp_p2p", {}, ["serve_tp_p2p", "serve_tp_p2p_in_place"]),
]
MODES = variants.MODES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float16,bfloat16,float32")
    p.add_argument("--rows", default="1,8,32,128,256", help="activation rows (sequences in the batch)")
    p.add_argument("--widths", default="768,1024,1280,1600")
    p.add_argument("--groups", default=",".join(g[0] for g in GROUPS), help="which groups of variants to run")
    p.add_argument("--iters", type=int, default=100, help="eager ops timed per shape")
    p.add_argument("--graph-ops", type=int, default=20, help="ops captured in one graph")
    p.add_argument("--graph-replays", type=int, default=5, help="replays timed per shape")
    p.add_argument("--group-timeout-s", type=float, default=75, help="a group still running after this is killed")
    p.add_argument("--time-limit-s", type=float, default=170, help="no group starts after this")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: gloo, eager only, to check this harness without GPUs (not a measurement)")
    p.add_argument("--json", default=None, help="write the run header and every record here")
    p.add_argument("--md", default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in args.dtypes if d not in variants.DTYPES]
    if bad:
        p.error(f"unknown dtypes {bad}; choose from {', '.join(variants.DTYPES)}")
    try:
        args.rows = [int(r) for r in args.rows.split(",")]
        args.widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        p.error("--rows and --widths are integers separated by commas")
    if any(n < 1 for n in args.rows + args.widths):
        p.error("--rows and --widths must be >= 1")
    names = [g[0] for g in GROUPS]
    args.groups = [g for g in args.groups.split(",") if g]
    if any(g not in names for g in args.groups):
        p.error(f"unknown groups in {args.groups}; choose from {', '.join(names)}")
    for name in ("iters", "graph_ops", "graph_replays"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def rank_main(rank, port, group, kinds, shapes, timing, out, inbox, outbox, device_type):
    try:
        for record in variants.run_group(rank, port, group, kinds, shapes, timing, inbox, outbox, device_type):
            out.put(("record", rank, record))
        out.put(("done", rank, None))
    except BaseException:  # the parent records it; it must not wait for a group that died
        out.put(("error", rank, traceback.format_exc()))


def run_group(name, env, kinds, shapes, timing, timeout_s, device_type="cuda"):
    """Both ranks' records of one group, and the group's failure (None if it finished)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    boxes = [ctx.Queue(), ctx.Queue()]  # boxes[r]: what rank r receives (the peer's IPC buffers)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # spawned children take the environment as it is at start()
    with socket.socket() as sock:  # rank 0 binds it for the rendezvous a moment later
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        procs = [ctx.Process(target=rank_main, args=(r, port, name, kinds, shapes, timing, out, boxes[r], boxes[1 - r],
                                                        device_type))
                 for r in range(2)]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    records, done, failure = [], set(), None
    deadline = time.monotonic() + timeout_s
    while len(done) < 2 and failure is None:
        try:
            status, rank, payload = out.get(timeout=1)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                failure = f"a rank died (exit codes {dead})"
            elif time.monotonic() > deadline:
                failure = f"timed out after {timeout_s:.0f}s"
            continue
        if status == "record":
            records.append({**payload, "rank": rank})
        elif status == "done":
            done.add(rank)
        else:
            failure = f"rank {rank}: " + payload.strip().splitlines()[-1]
            print(f"{name} rank {rank} failed:\n{payload}", flush=True)
    for p in procs:
        p.join(timeout=20 if failure is None else 3)
        if p.is_alive():
            p.kill()
    return records, failure


def merge(records):
    """One row per (variant, dtype, rows, width): the slower rank's time, exact only if both ranks are."""
    rows = {}
    for r in records:
        key = (r["variant"], r["dtype"], r["rows"], r["width"])
        row = rows.setdefault(key, {k: v for k, v in r.items() if k != "rank"})
        if r.get("us") is not None and row.get("us") is not None:
            row["us"] = max(row["us"], r["us"])
        row["exact"] = bool(row.get("exact")) and bool(r.get("exact"))
        row["max_abs_diff"] = max(row.get("max_abs_diff") or 0.0, r.get("max_abs_diff") or 0.0)
        if r.get("error") and not row.get("error"):
            row["error"] = r["error"]
    return list(rows.values())


def markdown(rows, variant_order) -> str:
    """Per mode (graph-captured first: what a decode step replays), one line per shape and one
    column per variant: microseconds per all-reduce, ✗ when not exact."""
    shapes = sorted({(r["dtype"], r["rows"], r["width"]) for r in rows},
                    key=lambda s: (variants.DTYPES.index(s[0]), s[2], s[1]))
    by_key = {(r["variant"], r["dtype"], r["rows"], r["width"]): r for r in rows}
    control = {(r["dtype"], r["rows"], r["width"]): r.get("control") for r in rows if r.get("control") is not None}
    lines = []
    for mode in ("graph", "eager"):
        mine = [v for v in variant_order if v.endswith(":" + mode)]
        if not mine:
            continue
        head = ["dtype", "rows", "width", "rounding control"] + [v.rsplit(":", 1)[0] for v in mine]
        lines += ["", f"{'CUDA-graph replay' if mode == 'graph' else 'eager launches'}, µs per all-reduce:", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for shape in shapes:
            c = control.get(shape)
            cells = [shape[0], str(shape[1]), str(shape[2]), "—" if c is None else f"{c:.2e}"]
            for v in mine:
                r = by_key.get((v, *shape))
                if r is None:
                    cells.append("—")
                elif r.get("error") or r.get("us") is None:
                    cells.append("failed")
                else:
                    cells.append(f"{r['us']:.1f}" + ("" if r.get("exact") else " ✗"))
            lines.append("| " + " | ".join(cells) + " |")
    errors = {}
    for r in rows:
        if r.get("error"):
            errors.setdefault((r["variant"], r["error"]), []).append(f"{r['dtype']} {r['rows']}x{r['width']}")
    lines += ["", "The slower rank's time. ✗: not bitwise equal to the exact two-rank sum rounded once in the "
                  "dtype. Rounding control: max |a + b in the dtype − a + b exact|, what that one rounding does."]
    for (variant, error), where in sorted(errors.items()):
        lines.append(f"- {variant} failed ({len(where)} shapes, e.g. {where[0]}): {error[:300]}")
    return "\n".join(lines).lstrip("\n") + "\n"


def _command(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:
        return None


def main(argv=None):
    args = parse_args(argv)
    start = time.monotonic()
    shapes = [(d, n, w) for d in args.dtypes for n in args.rows for w in args.widths]
    timing = {"iters": args.iters, "graph_ops": args.graph_ops, "graph_replays": args.graph_replays}
    header = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": _command(["git", "rev-parse", "--short", "HEAD"]),
        "gpus": (_command(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) or "").splitlines(),
        "torch": torch.__version__, "device": args.device, "world_size": 2, **timing,
        "multicast_off": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                          "NVSHMEM_DISABLE_NVLS")},
        "groups": {name: env for name, env, _ in GROUPS if name in args.groups},
    }
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 GPUs; {torch.cuda.device_count()} visible")
    records, failures, order = [], {}, []
    for name, env, kinds in GROUPS:
        if name not in args.groups:
            continue
        order += [variants.variant_name(name, k, m) for k in kinds for m in MODES]
        if time.monotonic() - start > args.time_limit_s:
            failures[name] = "not run: --time-limit-s reached"
            continue
        t = time.monotonic()
        # The whole run stays near --time-limit-s: a late group gets what is left (at least 20 s).
        timeout = min(args.group_timeout_s, max(20.0, args.time_limit_s + 10 - (t - start)))
        got, failure = run_group(name, env, kinds, shapes, timing, timeout, args.device)
        records += got
        if failure:
            failures[name] = failure
        print(f"{name}: {len(got)} records in {time.monotonic() - t:.1f}s" + (f"; FAILED: {failure}" if failure else ""),
              flush=True)
    rows = merge(records)
    table = markdown(rows, [v for v in order if any(r["variant"] == v for r in rows)] or order)
    if failures:
        table += "\n" + "\n".join(f"- group {g}: {why}" for g, why in failures.items()) + "\n"
    print("\n" + table)
    print(f"total {time.monotonic() - start:.0f}s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"run": header, "group_failures": failures, "results": rows}, indent=1))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(f"# all-reduce microbenchmark ({header['started']}, {header['gpus']})\n\n{table}")


if __name__ == "__main__":
    main()
