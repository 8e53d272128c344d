"""How the prefill budget's allotment delays first tokens, counted in engine steps.

The engine's own Scheduler plans every step for closed-loop users with the realistic
workload's lengths (prompts 16-900, outputs 16-256 tokens, log-uniform, seeded): a user's
next request arrives when its last one ends. Nothing runs a model: each decoding row gets
one token a step and a prompt's first token comes in the step its last chunk is planned,
so the numbers isolate the policy (first come, first served against shares of the budget)
from the machine. A step's wall time is not modelled; what a step costs is reported beside
it (prompt tokens, and the chunks run one by one: a part-way prompt is its own forward pass).
Every user's first request arrives at once (as in bench_serving's closed loop), so the
"later" columns leave those out. Results: BENCHMARKS.md, "The prefill budget's allotment".

    python -m benchmarks.prefill_policy --users 32 --budget 2048 --shares 2048,512,256
"""

from __future__ import annotations

import argparse
import random
import statistics

from benchmarks.workload import REALISTIC_OUTPUT, REALISTIC_PROMPT, LengthDist
from serve_tp.engine.batch import compact
from serve_tp.engine.scheduler import Scheduler
from serve_tp.messages import SamplingParams, SequenceRequest


def percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def simulate(users: int, requests_per_user: int, budget: int, share: int, slots: int, seed: int) -> dict:
    rng = random.Random(seed)
    n = users * requests_per_user
    prompts = LengthDist.parse(REALISTIC_PROMPT).sample(rng, n)
    outputs = LengthDist.parse(REALISTIC_OUTPUT).sample(rng, n)
    decoding: list[str] = []
    sched = Scheduler(lambda leaving: compact(decoding, leaving)[0], slots, 0, budget, share)
    queue = iter(range(n))
    submitted, ttft, wanted = {}, {}, {}
    step = 0

    def submit_next():
        i = next(queue, None)
        if i is not None:
            seq_id = str(i)
            wanted[seq_id] = outputs[i]
            submitted[seq_id] = step
            sched.submit(SequenceRequest(seq_id, tuple([1] * prompts[i]), SamplingParams(max_tokens=outputs[i])),
                         lambda out: None)

    for _ in range(users):
        submit_next()
    prefill_tokens, part_chunks = [], []
    while sched.has_work():
        step += 1
        plan, joining = sched.next_plan()
        decoding[:] = compact(decoding, plan.evict)[0]
        if plan.prefill:
            prefill_tokens.append(plan.prefill_tokens)
            part_chunks.append(sum(not (c.start == 0 and c.final) for c in plan.prefill))
        for seq in joining:
            ttft[seq.seq_id] = step - submitted[seq.seq_id]  # submitted after step k, first token in k + 1: 1
            decoding.append(seq.seq_id)
        for seq_id in decoding:
            seq = sched.sequence(seq_id)
            seq.generated.append(7)
            if len(seq.generated) == wanted[seq_id] and not seq.ended:
                seq.ended = True
                sched.finish(seq_id)
                submit_next()
    later = [t for s, t in ttft.items() if int(s) >= users]  # after every user's first request (a burst)
    short = [t for s, t in ttft.items() if int(s) >= users and prompts[int(s)] <= share]
    return {
        "share": share, "steps": step, "ttft_p50": statistics.median(ttft.values()),
        "ttft_p99": percentile(list(ttft.values()), 0.99), "later_p99": percentile(later, 0.99),
        "later_max": max(later), "short_mean": statistics.fmean(short), "short_p99": percentile(short, 0.99),
        "prefill_tokens_mean": statistics.fmean(prefill_tokens), "part_chunks_max": max(part_chunks),
        "part_chunks_mean": statistics.fmean(part_chunks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--requests-per-user", type=int, default=20)
    parser.add_argument("--budget", type=int, default=2048, help="max_prefill_tokens")
    parser.add_argument("--shares", default="2048,512", help="prefill_share_tokens values; the budget's own "
                        "value is first come, first served")
    parser.add_argument("--slots", type=int, default=128, help="max_batch_size")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    print(f"{args.users} closed-loop users x {args.requests_per_user} requests, budget {args.budget}, "
          f"{args.slots} slots; TTFT in steps (1: the step after it arrived), mean over seeds {args.seeds}; "
          "'later': every request but each user's first (those arrive together)")
    print("| share | TTFT p50 | TTFT p99 | later: p99 | later: max | later, prompts <= share: mean / p99 | "
          "steps | prompt tokens / prefill step | part-way chunks / prefill step, mean (max) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for share in (int(s) for s in args.shares.split(",")):
        runs = [simulate(args.users, args.requests_per_user, args.budget, share, args.slots, int(seed))
                for seed in args.seeds.split(",")]

        def mean(key):
            return statistics.fmean(r[key] for r in runs)

        label = f"{share} (first come, first served)" if share >= args.budget else str(share)
        print(f"| {label} | {mean('ttft_p50'):.1f} | {mean('ttft_p99'):.1f} | {mean('later_p99'):.1f} | "
              f"{mean('later_max'):.1f} | {mean('short_mean'):.2f} / {mean('short_p99'):.1f} | "
              f"{mean('steps'):.0f} | {mean('prefill_tokens_mean'):.0f} | "
              f"{mean('part_chunks_mean'):.2f} ({max(r['part_chunks_max'] for r in runs)}) |")


if __name__ == "__main__":
    main()
