"""The benchmark's outputs: a markdown table, the results JSON, and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

COLUMNS = [
    "target", "concurrency", "requests", "errors", "req/s", "out tok/s",
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


def header() -> list[str]:
    return ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]


def markdown_table(rows: list[dict]) -> str:
    """One line per (target, concurrency), notes below for the rows that need them."""
    lines, notes = header(), set()
    for r in rows:
        ttft_mark = "†" if r["single_chunk"] else ""
        tok_mark = "*" if r["tokens_counted_by"] == "chunks" and r["requests"] > r["errors"] else ""
        tpot_p50 = "n/a†" if r["single_chunk"] else _ms(r["tpot_p50_s"])
        tpot_p99 = "n/a†" if r["single_chunk"] else _ms(r["tpot_p99_s"])
        if ttft_mark:
            notes.add(SINGLE_CHUNK_NOTE)
        if tok_mark:
            notes.add(CHUNKS_NOTE)
        cells = [
            r["target"], str(r["concurrency"]), str(r["requests"]), str(r["errors"]),
            _num(r["requests_per_s"]), _num(r["output_tokens_per_s"], 1) + tok_mark,
            _ms(r["ttft_p50_s"]) + ttft_mark, _ms(r["ttft_p99_s"]) + ttft_mark,
            tpot_p50, tpot_p99, _num(r["latency_p50_s"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for note in sorted(notes):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, run_info: dict, rows: list[dict]) -> list[Path]:
    """results.json (settings, summaries, every request), results.md, results.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    json_path, md_path, png_path = out_dir / "results.json", out_dir / "results.md", out_dir / "results.png"
    json_path.write_text(json.dumps({"run": run_info, "levels": rows}, indent=2))
    settings = ", ".join(f"{k}={v}" for k, v in run_info.items() if k != "started")
    md_path.write_text(f"# serve_tp benchmark ({run_info.get('started', '')})\n\n{settings}\n\n{table}")
    plot(rows, png_path, title=settings)
    return [json_path, md_path, png_path]


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Output tokens/s, p50 TPOT and p50 TTFT against concurrency; one line per target."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    panels = [
        ("output_tokens_per_s", "output tokens/s", 1),
        ("tpot_p50_s", "p50 TPOT (ms)", 1000),
        ("ttft_p50_s", "p50 TTFT (ms)", 1000),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    colors = {t: f"C{i}" for i, t in enumerate(targets)}  # one colour per target in every panel
    levels = sorted({r["concurrency"] for r in rows})
    for ax, (key, label, scale) in zip(axes, panels):
        for target in targets:
            mine = [r for r in rows if r["target"] == target and r[key] is not None]
            if key == "tpot_p50_s":
                mine = [r for r in mine if not r["single_chunk"]]
            if mine:
                ax.plot([r["concurrency"] for r in mine], [r[key] * scale for r in mine],
                        marker="o", color=colors[target], label=target)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        if key in ("ttft_p50_s", "tpot_p50_s"):
            ax.set_yscale("log")  # queueing and batching spread these over orders of magnitude
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    one_chunk = sorted({r["target"] for r in rows if r["single_chunk"]})
    if one_chunk:
        axes[1].text(0.02, 0.02, f"not shown (one chunk, no TPOT): {', '.join(one_chunk)}",
                     transform=axes[1].transAxes, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
