"""One table from benchmarks/ingress_compare.sh's runs: each variant's load levels, with the
CPU each serving process spent per request (median over rounds).

    python -m benchmarks.report_ingress docs/results/cpu/ingress_*.json
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ORDER = ["proxy", "proxy_batched", "haproxy", "haproxy_batched", "direct", "direct_batched"]
FRONT = ("proxy", "haproxy")  # whoever answers the client's port, if not the replica


def _med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def collect(paths: list[str]) -> dict:
    """(variant, users) -> lists of each measure, one entry per round."""
    cells: dict = defaultdict(lambda: defaultdict(list))
    for path in paths:
        variant = re.sub(r"^ingress_|_r\d+$", "", Path(path).stem)
        for row in json.loads(Path(path).read_text())["levels"]:
            cell = cells[(variant, row["concurrency"])]
            cell["tok_s"].append(row["output_tokens_per_s"])
            cell["ttft_ms"].append(row["ttft_p50_s"] * 1000)
            cell["tpot_ms"].append((row["tpot_p50_s"] or 0) * 1000)
            cpu = row.get("cpu") or {}
            cell["chunks"].append(cpu.get("text_chunks_per_request"))
            front = sum(cpu[r]["ms_per_request"] for r in FRONT if r in cpu)
            cell["front"].append(front)
            for role in ("replica", "rank0", "client"):
                cell[role].append(cpu.get(role, {}).get("ms_per_request"))
    return cells


def table(cells: dict) -> str:
    head = ("| ingress | users | out tok/s | vs proxy | TTFT p50 ms | TPOT p50 ms | chunks/req | "
            "CPU ms/req: proxy | replica | rank 0 | client |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    variants = [v for v in ORDER if any(k[0] == v for k in cells)]
    for users in sorted({k[1] for k in cells}):
        base = _med(cells.get(("proxy", users), {}).get("tok_s", []))
        for v in variants:
            c = cells.get((v, users))
            if not c:
                continue
            tok = _med(c["tok_s"])
            ratio = f"{tok / base:.2f}×" if base else "–"
            fmt = lambda x, d=1: "–" if x is None else f"{x:.{d}f}"  # noqa: E731
            lines.append(f"| {v} | {users} | {tok:.0f} | {ratio} | {fmt(_med(c['ttft_ms']))} | "
                         f"{fmt(_med(c['tpot_ms']), 2)} | {fmt(_med(c['chunks']))} | {fmt(_med(c['front']), 2)} | "
                         f"{fmt(_med(c['replica']), 2)} | {fmt(_med(c['rank0']), 2)} | {fmt(_med(c['client']), 2)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(collect(sys.argv[1:])))
