"""The benchmark's outputs: a markdown table, the results JSON, and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

COLUMNS = [
    "target", "workload", "sampling", "load", "requests", "errors", "req/s", "out tok/s", "goodput req/s",
    "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "latency p50 s",
]

SINGLE_CHUNK_NOTE = (
    "† the whole completion arrived in one chunk (the tutorial's `generate` returns only at "
    "the end): TTFT is the full latency and TPOT cannot be seen by the client."
)
CHUNKS_NOTE = "* no `usage` in the stream: output tokens counted as non-empty chunks."


def _ms(seconds: Optional[float]) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.1f}"


def _num(value: Optional[float], digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def load_label(row: dict) -> str:
    """`8 users` (closed loop) or `4 req/s` (Poisson arrivals)."""
    rate = row.get("request_rate")
    if rate is not None:
        return "burst" if rate == float("inf") else f"{rate:g} req/s"
    users = row["concurrency"]
    return f"{users} user" if users == 1 else f"{users} users"


def sampling_label(row: dict) -> str:
    sampling = row.get("sampling", "greedy")
    if sampling == "mixed":
        return f"mixed {row.get('greedy_fraction', 0.5):.0%} greedy"
    return sampling


def header() -> list[str]:
    return ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]


def table_row(r: dict) -> tuple[str, set]:
    """One markdown line and the notes it needs."""
    notes = set()
    ttft_mark = "†" if r["single_chunk"] else ""
    tok_mark = "*" if r["tokens_counted_by"] == "chunks" and r["requests"] > r["errors"] else ""
    tpot_p50 = "n/a†" if r["single_chunk"] else _ms(r["tpot_p50_s"])
    tpot_p99 = "n/a†" if r["single_chunk"] else _ms(r["tpot_p99_s"])
    if ttft_mark:
        notes.add(SINGLE_CHUNK_NOTE)
    if tok_mark:
        notes.add(CHUNKS_NOTE)
    cells = [
        r["target"], r.get("workload", "fixed"), sampling_label(r), load_label(r),
        str(r["requests"]), str(r["errors"]),
        _num(r["requests_per_s"]), _num(r["output_tokens_per_s"], 1) + tok_mark, _num(r.get("goodput")),
        _ms(r["ttft_p50_s"]) + ttft_mark, _ms(r["ttft_p99_s"]) + ttft_mark,
        tpot_p50, tpot_p99, _num(r["latency_p50_s"]),
    ]
    return "| " + " | ".join(cells) + " |", notes


def by_sampling_lines(rows: list[dict]) -> list[str]:
    """Under a mixed row, each kind's own numbers: a slow sampler must not hide in the mix."""
    lines = []
    for r in rows:
        kinds = r.get("by_sampling")
        if not kinds:
            continue
        parts = [f"{name} {k['requests']} req, TTFT p50 {_ms(k['ttft_p50_s'])} ms, TPOT p50 "
                 f"{_ms(k['tpot_p50_s'])} / p99 {_ms(k['tpot_p99_s'])} ms, SLO met {k['slo_met']}"
                 for name, k in kinds.items()]
        lines.append(f"- {r['target']}, {r.get('workload', 'fixed')}, {load_label(r)}: " + "; ".join(parts))
    return lines


def markdown_table(rows: list[dict], slo: Optional[dict] = None) -> str:
    """One line per level, notes below for the rows that need them."""
    lines, notes = header(), set()
    for r in rows:
        line, needs = table_row(r)
        lines.append(line)
        notes |= needs
    slo = slo or next((r["slo"] for r in rows if r.get("slo")), None)
    if slo:
        lines += ["", f"goodput: successful requests/s with TTFT ≤ {slo['ttft_ms']:g} ms and "
                      f"TPOT ≤ {slo['tpot_ms']:g} ms."]
    mixed = by_sampling_lines(rows)
    if mixed:
        lines += ["", "Mixed levels, by kind:", *mixed]
    for note in sorted(notes):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, run_info: dict, rows: list[dict], name: str = "results") -> list[Path]:
    """NAME.json (the `run` header, every row, every request), NAME.md, NAME.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, run_info.get("slo"))
    json_path, md_path, png_path = (out_dir / f"{name}{ext}" for ext in (".json", ".md", ".png"))
    json_path.write_text(json.dumps({"run": run_info, "levels": rows}, indent=2, default=str))
    settings = ", ".join(f"{k}={v}" for k, v in run_info.items() if k not in ("started", "workloads"))
    workloads = "\n".join(f"- {k}: {v}" for k, v in (run_info.get("workloads") or {}).items())
    md_path.write_text(f"# serve_tp benchmark ({run_info.get('started', '')})\n\n{settings}\n\n"
                       f"{workloads}\n\n{table}")
    short = ", ".join(f"{k}={run_info[k]}" for k in ("started", "commit", "model", "device", "gpus",
                                                    "tensor_parallel_size") if run_info.get(k) is not None)
    plot(rows, png_path, title=short)
    return [json_path, md_path, png_path]


PANELS = [
    ("output_tokens_per_s", "output tokens/s", 1, False),
    ("goodput", "goodput (req/s in SLO)", 1, False),
    ("tpot_p50_s", "p50 TPOT (ms)", 1000, True),  # log: queueing spreads these over
    ("ttft_p50_s", "p50 TTFT (ms)", 1000, True),  # orders of magnitude
]


def _series(row: dict) -> str:
    return f"{row['target']} {row.get('workload', 'fixed')} {sampling_label(row)}"


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Throughput, goodput, p50 TPOT and TTFT against load; one line per target/workload/sampling.

    Closed-loop levels (x: users) on the first row of panels, Poisson rates (x: req/s) on
    the second, when the run had them.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    groups = [("concurrency (users, closed loop)", [r for r in rows if r.get("request_rate") is None], "concurrency"),
              ("request rate (req/s, Poisson)", [r for r in rows if r.get("request_rate") is not None
                                                 and r["request_rate"] != float("inf")], "request_rate")]
    groups = [g for g in groups if g[1]]
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), len(PANELS), figsize=(20, 4.5 * len(groups)), squeeze=False)
    colors = {s: f"C{i % 10}" for i, s in enumerate(dict.fromkeys(_series(r) for r in rows))}
    for axes_row, (xlabel, mine, xkey) in zip(axes, groups):
        xs = sorted({r[xkey] for r in mine})
        for ax, (key, label, scale, log) in zip(axes_row, PANELS):
            for series in dict.fromkeys(_series(r) for r in mine):
                pts = [r for r in mine if _series(r) == series and r.get(key) is not None
                       and not (key == "tpot_p50_s" and r["single_chunk"])]
                if pts:
                    ax.plot([r[xkey] for r in pts], [r[key] * scale for r in pts], marker="o",
                            color=colors[series], label=series)
            if xkey == "concurrency":
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [str(c) for c in xs])
            if log:
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        if axes_row[0].lines:
            axes_row[0].legend(fontsize=7)  # one legend per row: every panel has the same series
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
