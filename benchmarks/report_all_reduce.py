"""Summarise benchmarks/cpu_all_reduce.sh: per all-reduce and client count, every round's
output tokens/s, their median and spread, and rank 0's forward time per step.

    python -m benchmarks.report_all_reduce [benchmarks/results/cpu_all_reduce]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def main(root: str = "benchmarks/results/cpu_all_reduce") -> None:
    runs = defaultdict(list)  # (kind, clients) -> [(round, level)]
    for path in sorted(Path(root).glob("*-*/results.json")):
        round_, kind = path.parent.name.split("-", 1)
        for level in json.loads(path.read_text())["levels"]:
            runs[(kind, level["concurrency"])].append((int(round_), level))
    print("| all-reduce | clients | out tok/s per round (1, 2, 3, ...) | median | spread | TPOT p50 ms "
          "| forward ms/step | errors |\n|---|---|---|---|---|---|---|---|")
    for (kind, clients), levels in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0] != "shm")):
        levels.sort(key=lambda rl: rl[0])
        rates = [level["output_tokens_per_s"] for _, level in levels]
        forwards = [level.get("engine_step_ms", {}).get("forward") for _, level in levels]
        tpots = [level["tpot_p50_s"] * 1e3 for _, level in levels if level.get("tpot_p50_s")]
        print(f"| {kind} | {clients} | {', '.join(f'{r:.0f}' for r in rates)} | {statistics.median(rates):.0f} "
              f"| {min(rates):.0f}–{max(rates):.0f} | {statistics.median(tpots):.1f} "
              f"| {', '.join('–' if f is None else f'{f:.2f}' for f in forwards)} "
              f"| {sum(level['errors'] for _, level in levels)} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
