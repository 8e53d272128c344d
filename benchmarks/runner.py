"""Run a benchmark's levels against one target (an HTTP server, or HF generate in-process).

For each level: its bodies (benchmarks/plan.py), closed or open loop (benchmarks/loadgen.py, over
--client-processes processes by benchmarks/client_procs.py),
one summarized row (benchmarks/stats.py) with the requests it had to clamp and the prompts
the server counted differently, printed as it finishes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from benchmarks import client_procs, plan, report, stats


def model_context(args: argparse.Namespace) -> Optional[int]:
    if not args.model or not Path(args.model, "config.json").is_file():
        return None
    import json

    cfg = json.loads(Path(args.model, "config.json").read_text())
    return cfg.get("n_positions") or cfg.get("max_position_embeddings")


async def served_context(base: str, headers: Optional[dict]) -> Optional[int]:
    """The server's max_model_len from /v1/models (serve_tp and vLLM report it), else None."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=10, headers=headers) as client:
            data = (await client.get(base.rstrip("/") + "/v1/models")).json()["data"]
        return int(data[0]["max_model_len"])
    except Exception:  # the tutorial has no /v1/models; the model's own context then decides
        return None


def context_limit(args: argparse.Namespace, served: Optional[int]) -> Optional[int]:
    known = [n for n in (args.max_model_len, served, model_context(args)) if n]
    return min(known) if known else None


def completions_url(base: str) -> str:
    return base.rstrip("/") + "/v1/completions"


def _progress(row: dict) -> None:
    line = report.table_row(row)[0]
    extra = f"  clamped {row['clamped']}" if row.get("clamped") else ""
    if row.get("prompt_tokens_mismatched"):
        extra += f"  PROMPT LENGTH MISMATCHES {row['prompt_tokens_mismatched']}"
    print(line + extra, flush=True)


def finish_row(row: dict, specs, results) -> dict:
    row["clamped"] = sum(s.clamped for s in specs)
    row["prompt_tokens_mismatched"] = plan.prompt_mismatches(results, specs)
    if "greedy_fraction" in row and row["sampling"] != "mixed":
        del row["greedy_fraction"]
    return row


async def bench_http(target: str, base: str, levels: list[plan.Level], bodies: plan.Bodies, args,
                     run_info: dict) -> list[dict]:
    url = completions_url(base)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    limit = context_limit(args, await served_context(base, headers))
    run_info["max_model_len"][target] = limit
    slo = stats.SLO(args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)
    kinds = {lv.sampling for lv in levels}
    warm = [bodies.body(bodies.fixed_prompt, min(16, bodies.fixed_max(limit)), greedy)
            for greedy in (True, False) if kinds & ({"greedy", "mixed"} if greedy else {"sampled", "mixed"})]
    for _ in range(args.warmup):
        results, _, _ = await client_procs.run_level(url, warm, 1, len(warm), request_timeout_s=args.request_timeout_s,
                                                     level_timeout_s=1e9, headers=headers)
        bad = [r.error for r in results if not r.ok]
        if bad:
            raise SystemExit(f"{target}: warm-up request to {url} failed: {bad[0]}")
    meter = await cpu_meter(base, headers) if args.cpu_profile and target == "serve_tp" else None
    rows = []
    for level in levels:
        n = level.n_requests(args.requests_per_client, args.rate_duration_s)
        level_bodies, specs = bodies.for_level(level, n, limit)
        settings = {"request_timeout_s": args.request_timeout_s, "level_timeout_s": args.level_timeout_s,
                    "headers": headers, "processes": args.client_processes}
        if meter is not None:
            meter.start()
        if level.open_loop:
            results, duration, client_cpu_s = await client_procs.run_open_loop(
                url, level_bodies, plan.arrivals(level, n, args.seed), **settings)
        else:
            results, duration, client_cpu_s = await client_procs.run_level(
                url, level_bodies, level.concurrency, args.requests_per_client, **settings)
        row = stats.summarize(target, level.concurrency, results, duration, slo,
                              greedy_fraction=args.greedy_fraction, **level.labels())
        rows.append(finish_row(row, specs, results))
        _progress(row)
        if meter is not None:
            spent = meter.stop()
            if args.client_processes > 1:  # the client's work ran in its processes, not in this one
                spent["client"] = round(spent.get("client", 0.0) + client_cpu_s, 4)
            row["cpu"] = _cpu_row(spent, results)
            print("    CPU ms per request / per chunk: " + ", ".join(
                f"{role} {c['ms_per_request']}/{c['ms_per_chunk']}" for role, c in row["cpu"].items()
                if isinstance(c, dict)) + f"; chunks per request {row['cpu']['text_chunks_per_request']}", flush=True)
        if target == "serve_tp":
            row["engine_step_ms"] = await engine_step_ms(base, headers)
            print(f"    rank 0 step (ms, last 256 working steps): {row['engine_step_ms']}", flush=True)
    return rows


async def cpu_meter(base: str, headers: Optional[dict]):
    """A meter of the serving processes' CPU (proxy, replica, ranks), or None if not local."""
    import httpx

    from benchmarks.proc_cpu import CpuMeter, serving_processes

    try:
        async with httpx.AsyncClient(timeout=10) as client:
            health = (await client.get(base.rstrip("/") + "/health", headers=headers)).json()
        roles = serving_processes(base, health)
    except Exception as exc:  # a remote server: its processes are not ours to read
        print(f"    no CPU profile: {type(exc).__name__}: {exc}", flush=True)
        return None
    print(f"    CPU profile of {roles}", flush=True)
    return CpuMeter(roles)


def _cpu_row(spent: dict, results) -> dict:
    from benchmarks.proc_cpu import per_unit

    ok = [r for r in results if r.ok]
    chunks = sum(r.text_chunks for r in ok)
    return {"text_chunks_per_request": round(chunks / len(ok), 2) if ok else None,
            **per_unit(spent, len(ok), chunks, sum(r.output_tokens for r in ok))}


async def engine_step_ms(base: str, headers: Optional[dict]) -> Optional[dict]:
    """Where rank 0's recent steps spent their time (plan broadcast, forward, sampling), from /health."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=10) as client:
            ranks = (await client.get(base.rstrip("/") + "/health", headers=headers)).json()["ranks"]
        return ranks[0].get("step_ms")
    except Exception:  # a health endpoint that differs is no reason to lose the run
        return None


def bench_hf(levels: list[plan.Level], bodies: plan.Bodies, args, run_info: dict) -> list[dict]:
    """One process serves one request at a time: one closed-loop user per workload and sampling kind."""
    from benchmarks.hf_baseline import HFGenerate

    hf = HFGenerate(args.model, args.device, threads=args.hf_threads)
    limit = context_limit(args, None)
    run_info["max_model_len"]["hf"] = limit
    slo = stats.SLO(args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)
    for _ in range(args.warmup):
        hf.run(bodies.fixed_prompt, min(16, bodies.fixed_max(limit)))
    rows, seen = [], set()
    for level in levels:
        key = (level.workload, level.sampling)
        if level.open_loop or key in seen:
            continue
        seen.add(key)
        one_user = plan.Level(level.workload, level.sampling, concurrency=1)
        level_bodies, specs = bodies.for_level(one_user, args.requests_per_client, limit)
        level_bodies = [level_bodies[i % len(level_bodies)] for i in range(args.requests_per_client)]
        results, duration = hf.run_bodies(level_bodies, args.level_timeout_s)
        for r in results:
            r.index = r.index % len(specs)
        row = stats.summarize("hf", 1, results, duration, slo, greedy_fraction=args.greedy_fraction,
                              **one_user.labels())
        rows.append(finish_row(row, specs, results))
        _progress(row)
    return rows
