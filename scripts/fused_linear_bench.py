"""The fused decode kernels alone against what they replace, replayed as CUDA graphs (one GPU).

    python scripts/fused_linear_bench.py [--md out.md]                  the pieces, per shape
    python scripts/fused_linear_bench.py --sweep [--md out.md]          launch settings, gpt2-large

For GPT-2 -medium, -large and -xl widths, TP=1 and one rank of TP=2 (the shard's columns or
rows), 1 and 32 rows, fp16: µs per call of
- layer norm + Q|K|V GEMM + bias: F.layer_norm + addmm (2 kernels) vs `ln_linear`;
- layer norm + c_fc + bias + GELU: F.layer_norm + addmm + F.gelu (3) vs `ln_linear(gelu="tanh")`;
- the MLP's projection + bias + residual, one rank's partial: addmm + add (2) vs `linear_sum`
  (without the exchange: the sum over ranks is the p2p kernel's, timed by allreduce_bench.py),
the fused ones with the default launch (split-K: `fused_linear.plan`) beside the unsplit one
(one program per column tile of the `block_cols` rule, K whole: the first kernels).

Weights come from DRAM, as in a decode step: each graph cycles through enough copies of a
piece's weights (at least 256 MB) that none is still in L2 (H200: 50 MB) when its turn comes
again. A first version reused one copy, L2-resident, and flattered the Triton kernels,
whose loads have less in flight than cuBLAS's (docs/gpu.md, "fused_decode"). The time is the
mean over 20 replays of a graph of one call per copy.

`--sweep`: gpt2-large's pieces at TP 1 and 2, 1 and 32 rows, over fused_linear's launch
settings (BLOCK_K, NUM_STAGES, PROGRAMS, BLOCK_N; NUM_WARPS 4 and the one-pass norm won the
first sweep): per piece the best four and the defaults.
"""

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from serve_tp.model import fused_linear  # noqa: E402

WIDTHS = {"gpt2-medium": 1024, "gpt2-large": 1280, "gpt2-xl": 1600}
COLD_BYTES = 256 * 2**20
REPLAYS = 20
SWEEP = dict(BLOCK_K=(128, 256), NUM_STAGES=(3, 4), PROGRAMS=(0, 132, 264), BLOCK_N=(None, 64))
UNSPLIT = dict(PROGRAMS=0, BLOCK_N=None)


def graph_us(calls) -> float:
    """Mean µs of one call, replaying a graph of `calls` (one closure per weight copy)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls[:2]:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / (REPLAYS * len(calls))


def patched(settings: dict, fn):
    """fn with fused_linear's module settings replaced."""
    def call():
        saved = {name: getattr(fused_linear, name) for name in settings}
        for name, value in settings.items():
            setattr(fused_linear, name, value)
        try:
            return fn()
        finally:
            for name, value in saved.items():
                setattr(fused_linear, name, value)
    return call


def piece_shapes(width: int, tp: int) -> dict:
    """{piece: (K, N)} of one rank's GEMM."""
    return {"ln + qkv": (width, 3 * width // tp), "ln + fc + gelu": (width, 4 * width // tp),
            "proj + residual": (4 * width // tp, width)}


def pieces(width: int, tp: int, rows: int):
    """{piece: (torch closures, fused closures)}, one closure per weight copy."""
    device, dtype = torch.device("cuda"), torch.float16
    h = torch.randn(rows, width, device=device, dtype=dtype)
    norm = torch.nn.LayerNorm(width, device=device, dtype=dtype)
    x = torch.randn(rows, 4 * width // tp, device=device, dtype=dtype)
    out = {}
    for piece, (k, n) in piece_shapes(width, tp).items():
        copies = max(2, -(-COLD_BYTES // (2 * k * n)))
        weights = [torch.randn(k, n, device=device, dtype=dtype) / k ** 0.5 for _ in range(copies)]
        bias = torch.randn(n, device=device, dtype=dtype)
        # each closure binds its own weight copy and this piece's bias (a bare name would be the last piece's)
        if piece == "ln + qkv":
            eager = [lambda w=w, b=bias: torch.addmm(b, norm(h), w) for w in weights]
            fused = [lambda w=w, b=bias: fused_linear.ln_linear(h, norm, w, b) for w in weights]
        elif piece == "ln + fc + gelu":
            eager = [lambda w=w, b=bias: F.gelu(torch.addmm(b, norm(h), w), approximate="tanh") for w in weights]
            fused = [lambda w=w, b=bias: fused_linear.ln_linear(h, norm, w, b, "tanh") for w in weights]
        else:
            eager = [lambda w=w, b=bias: h + torch.addmm(b, x, w) for w in weights]
            fused = [lambda w=w, b=bias: fused_linear.linear_sum(x, w, b, h) for w in weights]
        out[piece] = (eager, fused)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--md", default=None)
    parser.add_argument("--sweep", action="store_true", help="launch settings on gpt2-large's pieces")
    args = parser.parse_args()
    if args.sweep:
        lines = ["| TP | rows | piece | torch µs | fused µs | " + " | ".join(SWEEP) + " |",
                 "|---|---|---|---|---|" + "---|" * len(SWEEP)]
        default = tuple(getattr(fused_linear, name) for name in SWEEP)
        for tp, rows in itertools.product((1, 2), (1, 32)):
            for piece, (eager, fused) in pieces(1280, tp, rows).items():
                base, results = graph_us(eager), []
                for values in itertools.product(*SWEEP.values()):
                    settings = dict(zip(SWEEP, values))
                    results.append((graph_us([patched(settings, f) for f in fused]), values))
                ranked = sorted(results)
                for took, values in ranked[:4] + [r for r in ranked[4:] if r[1] == default]:
                    mark = " (default)" if values == default else ""
                    lines.append(f"| {tp} | {rows} | {piece} | {base:.1f} | {took:.1f} | "
                                 + " | ".join(str(v) for v in values) + mark + " |")
                    print(lines[-1], flush=True)
                del eager, fused
                torch.cuda.empty_cache()
    else:
        lines = ["| shape | TP | rows | piece | torch µs | fused µs | fused unsplit µs | splits |",
                 "|---|---|---|---|---|---|---|---|"]
        for (name, width), tp, rows in itertools.product(WIDTHS.items(), (1, 2), (1, 32)):
            for piece, (eager, fused) in pieces(width, tp, rows).items():
                k, n = piece_shapes(width, tp)[piece]
                times = [graph_us(eager), graph_us(fused), graph_us([patched(UNSPLIT, f) for f in fused])]
                launch = fused_linear.plan(k, n)
                lines.append(f"| {name} | {tp} | {rows} | {piece} | " + " | ".join(f"{t:.1f}" for t in times)
                             + f" | {launch.tiles} x {launch.splits} |")
                print(lines[-1], flush=True)
                del eager, fused
                torch.cuda.empty_cache()
    if args.md:
        Path(args.md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
