"""Milliseconds per `Sampler.sample` call, per kind of request, beside greedy.

The engine samples once per step on rank 0, so a sampled batch costs (its ms - greedy's
ms) more per step than a greedy one; `--step-ms` turns that into the tokens/s ratio of a
whole step (default 6 ms: a TP=2 CPU step of the tiny model at 16 clients).

Logits are synthetic rows of GPT-2's shape: `zipf` gives each row a random permutation of
Zipf probabilities, exponents spread over 1.2-1.8 (3 to 5 nats of entropy, around GPT-2's
typical ~3.3; top-p 0.95 keeps from ~50 to ~5000 tokens); `flat` (N(0, 1) logits, top-p
0.95 keeps ~37000 tokens) is top-p's worst case.

Time is the sampling thread's CPU time (torch runs one thread here), so other processes on
a shared machine do not inflate it; wall time is printed beside it. On CUDA, wall only.
`--graphs both` (CUDA) times each case eagerly and replayed from the sampler's CUDA graphs,
side by side.

    python -m benchmarks.bench_sampler --rows 16 --vocab 50257 --device cpu --threads 1
    python -m benchmarks.bench_sampler --rows 1 --device cuda --graphs both
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from serve_tp.engine.sampling import Sampler
from serve_tp.messages import SamplingParams

CASES = {
    "greedy": SamplingParams(temperature=0),
    "temperature 1": SamplingParams(temperature=1.0),
    "temperature 0.7": SamplingParams(temperature=0.7),
    "top_p 0.95": SamplingParams(temperature=1.0, top_p=0.95),
    "top_k 50": SamplingParams(temperature=1.0, top_k=50),
    "min_p 0.05": SamplingParams(temperature=1.0, min_p=0.05),
    "penalties (rep, freq, pres)": SamplingParams(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.5,
                                                  presence_penalty=0.5),
    "greedy + penalties": SamplingParams(temperature=0, repetition_penalty=1.2, frequency_penalty=0.5),
    "logprobs 5": SamplingParams(temperature=1.0, logprobs=5),
}
MIXED = ["greedy", "temperature 1", "top_p 0.95", "top_k 50", "penalties (rep, freq, pres)", "logprobs 5"]


def make_logits(kind: str, rows: int, vocab: int, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "flat":
        logits = torch.randn(rows, vocab, generator=gen)
    else:
        log_ranks = torch.arange(1, vocab + 1, dtype=torch.float64).log()
        exponents = torch.linspace(1.2, 1.8, rows, dtype=torch.float64)
        logits = torch.stack([(-s * log_ranks)[torch.randperm(vocab, generator=gen)] for s in exponents]).float()
    return logits.to(device)


def time_case(params: list[SamplingParams], logits: torch.Tensor, repeats: int, history: int,
              graphs: bool = False) -> tuple[float, float]:
    """Median (CPU, wall) ms of sample() plus the host read of its tokens, as the engine does."""
    rows, vocab = logits.shape
    sampler = Sampler(rows, vocab, logits.device, eos_token_id=vocab - 1, max_logprobs=20,
                      context_length=history + repeats + 16, graphs=graphs)
    prompt = torch.randint(0, vocab, (history,), generator=torch.Generator().manual_seed(1)).tolist()
    for slot, p in enumerate(params):
        sampler.admit(slot, p, seed=slot, prompt_ids=prompt)
    for _ in range(3):  # with graphs: the first sight of the plan, its capture, a replay
        sampler.sample(logits).tokens.tolist()
    if graphs and (sampler.graphs is None or sampler.graphs.count == 0 or sampler.graphs.refused):
        raise RuntimeError("the sampler replays no graph for this case (graphs need CUDA; see its log)")
    cpu, wall = [], []
    for _ in range(repeats):
        if logits.is_cuda:
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.thread_time()
        result = sampler.sample(logits)
        result.tokens.tolist()
        if result.logprobs is not None:
            result.token_logprobs()
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start)
    return 1000 * statistics.median(wall if logits.is_cuda else cpu), 1000 * statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (ranks run with 1)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--history", type=int, default=256, help="prompt tokens each row's penalties look at")
    parser.add_argument("--logits", choices=["zipf", "flat"], nargs="+", default=["zipf", "flat"])
    parser.add_argument("--step-ms", type=float, default=6.0, help="the rest of a step, for the tokens/s ratio")
    parser.add_argument("--graphs", choices=["off", "on", "both"], default="off",
                        help="replay the sampler's CUDA graphs (CUDA only); both: eager and graphs side by side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.graphs == "both":
        return compare_graphs(args)

    print(f"{args.rows} rows x {args.vocab} vocab on {args.device}, {args.threads} thread(s), "
          f"median of {args.repeats}; ratio = greedy step / this step at {args.step_ms} ms of forward")
    for kind in args.logits:
        logits = make_logits(kind, args.rows, args.vocab, args.device, seed=0)
        print(f"\n| {kind} logits | ms / call | vs greedy | tokens/s vs greedy | wall ms |\n|---|---:|---:|---:|---:|")
        greedy = None
        for name, params in cases(args.rows).items():
            ms, wall = time_case(params, logits, args.repeats, args.history, graphs=args.graphs == "on")
            greedy = ms if greedy is None else greedy
            ratio = (args.step_ms + greedy) / (args.step_ms + ms)
            print(f"| {name} | {ms:.2f} | {ms / greedy:.1f}x | {ratio:.2f} | {wall:.2f} |")


def cases(rows: int) -> dict[str, list[SamplingParams]]:
    table = {name: [p] * rows for name, p in CASES.items()}
    table["mixed (one of each above)"] = [CASES[MIXED[i % len(MIXED)]] for i in range(rows)]
    return table


def compare_graphs(args) -> None:
    """Per case: wall ms eager and with graphs, and each one's excess over its own greedy."""
    print(f"{args.rows} rows x {args.vocab} vocab on {args.device}, median wall ms of {args.repeats} "
          f"sample() + token read; 'over greedy' = this case - greedy, same mode")
    for kind in args.logits:
        logits = make_logits(kind, args.rows, args.vocab, args.device, seed=0)
        print(f"\n| {kind} logits, batch {args.rows} | eager ms | graphs ms | speed-up | eager over greedy "
              f"| graphs over greedy |\n|---|---:|---:|---:|---:|---:|")
        base = None
        for name, params in cases(args.rows).items():
            eager = time_case(params, logits, args.repeats, args.history)[1]
            graphed = time_case(params, logits, args.repeats, args.history, graphs=True)[1]
            base = (eager, graphed) if base is None else base
            print(f"| {name} | {eager:.3f} | {graphed:.3f} | {eager / graphed:.1f}x | {eager - base[0]:+.3f} "
                  f"| {graphed - base[1]:+.3f} |")


if __name__ == "__main__":
    main()
