"""Run the real TP path in `world_size` local processes (on CPU: DeepSpeed shared memory or gloo; NCCL on GPUs).

Every rank is started by serve_tp.engine.rank_setup.setup_rank, the function the serving
rank actor uses, then plays the same `Script` on its SequenceBatch: sequences arrive at
given steps (joining while others decode), decode greedily and leave when done (their
slots refilled by moves), as the engine loop drives them.
"""

from __future__ import annotations

import json
import os
import queue
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.multiprocessing as mp

from serve_tp.engine.distributed import free_port


@dataclass(frozen=True)
class Arrival:
    seq_id: str
    prompt: tuple[int, ...]
    max_new: int  # tokens to generate before leaving
    step: int = 0  # the step at which it joins the batch


@dataclass
class Script:
    arrivals: list[Arrival]
    slots: int = 0  # 0: as many as arrivals
    prefill_budget: int = 0  # > 0: prompts prefilled in chunks of this many tokens a step, as the engine does

    @classmethod
    def together(cls, prompts, max_new: int) -> "Script":
        return cls([Arrival(str(i), tuple(p), max_new) for i, p in enumerate(prompts)])


@dataclass
class SeqResult:
    tokens: list[int] = field(default_factory=list)
    logits: list = field(default_factory=list)  # float32 rows that chose each token (rank 0)


def play(batch, script: Script, keep_logits: bool) -> tuple[dict[str, SeqResult], list[int]]:
    """Drive `batch` through `script` as the engine does: evict, admit, decode, each step.

    Returns each sequence's result and the attention span of every decode step.
    """
    from serve_tp.engine.decode_runner import attention_span

    results = {a.seq_id: SeqResult() for a in script.arrivals}
    spans = []
    wanted = {a.seq_id: a.max_new for a in script.arrivals}

    def record(seq_ids, logits):
        for seq_id, row in zip(seq_ids, logits):
            results[seq_id].tokens.append(int(row.argmax()))
            if keep_logits:
                results[seq_id].logits.append(row.float().cpu().numpy())

    if script.prefill_budget:
        return _play_chunked(batch, script, results, record, wanted, spans)
    waiting, step = sorted(script.arrivals, key=lambda a: a.step), 0
    while waiting or len(batch):
        done = [s for s in batch.seq_ids if len(results[s].tokens) >= wanted[s]]
        batch.evict(done)
        joining = [a for a in waiting if a.step <= step]
        if joining:
            waiting = waiting[len(joining):]
            ids = [a.seq_id for a in joining]
            record(ids, batch.admit(ids, [list(a.prompt) for a in joining])[0])
            batch.evict([s for s in ids if len(results[s].tokens) >= wanted[s]])
        if len(batch):
            rows = list(batch.seq_ids)
            spans.append(attention_span(max(batch.lengths) + 1, batch.cache.max_len))
            record(rows, batch.decode([results[s].tokens[-1] for s in rows]))
        step += 1
    return results, spans


def _play_chunked(batch, script, results, record, wanted, spans):
    """The engine's step order: evict, decode the decoding rows, then prompt chunks within
    the budget, first come first served (a prompt part-way through before new ones)."""
    from serve_tp.engine.decode_runner import attention_span
    from serve_tp.engine.plan import PrefillChunk

    waiting, step = sorted(script.arrivals, key=lambda a: a.step), 0
    prefilling: list[list] = []  # [arrival, tokens planned]
    while waiting or prefilling or len(batch):
        batch.evict([s for s in batch.seq_ids if len(results[s].tokens) >= wanted[s]])
        while waiting and waiting[0].step <= step:
            prefilling.append([waiting.pop(0), 0])
        if len(batch):
            rows = list(batch.seq_ids)
            spans.append(attention_span(max(batch.lengths) + 1, batch.cache.max_len))
            record(rows, batch.decode([results[s].tokens[-1] for s in rows]))
        chunks, budget = [], script.prefill_budget
        for entry in prefilling:
            if budget == 0:
                break
            arrival, start = entry
            end = min(len(arrival.prompt), start + budget)
            chunks.append(PrefillChunk(arrival.seq_id, arrival.prompt[start:end], start, end == len(arrival.prompt)))
            entry[1], budget = end, budget - (end - start)
        if chunks:
            finished = [c.seq_id for c in chunks if c.final]
            last, _ = batch.prefill(chunks)
            record(finished, last)
            del prefilling[: len(finished)]
        step += 1
    return results, spans


def _rank_main(rank, world_size, port, model_dir, script, results, device_type, dtype, cuda_graphs,
               cpu_all_reduce, extra=None):
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        from serve_tp.engine.rank_setup import setup_rank
        from serve_tp.messages import RankSettings

        context = json.loads((Path(model_dir) / "config.json").read_text())["n_positions"]
        settings = RankSettings(
            model=model_dir, served_model_name="tp-test", device=device_type, dtype=dtype,
            max_batch_size=script.slots or len(script.arrivals), context_length=context,
            cuda_graphs=cuda_graphs, collective_timeout_s=120, cpu_all_reduce=cpu_all_reduce, **(extra or {}),
        )
        setup = setup_rank(rank, world_size, "127.0.0.1", port, settings,
                           cuda_index=rank if device_type == "cuda" else 0)
        out, spans = play(setup.batch, script, keep_logits=rank == 0)
        results.put((rank, out, {**setup.info(), "spans": spans}, None))
    except Exception:
        results.put((rank, None, None, traceback.format_exc()))


def _engine_rank_main(rank, world_size, port, model_dir, jobs, results, extra):
    """One rank of a served group without Ray: setup_rank + build_engine, as the rank actor
    does; rank 0 drives `jobs` (tests/engine_workload.py), the others follow its plans."""
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        from serve_tp.engine.rank_setup import build_engine, setup_rank
        from serve_tp.messages import RankSettings
        from tests.engine_workload import drive

        context = json.loads((Path(model_dir) / "config.json").read_text())["n_positions"]
        settings = RankSettings(**{"model": model_dir, "served_model_name": "tp-test", "device": "cpu",
                                   "dtype": "float32", "context_length": context, "collective_timeout_s": 120,
                                   "batch_wait_timeout_s": 0, **extra})
        setup = setup_rank(rank, world_size, "127.0.0.1", port, settings,
                           cuda_index=rank if settings.device == "cuda" else 0)
        engine = build_engine(setup, settings)
        engine.start()
        outcomes = None
        if rank == 0:
            outcomes = drive(engine, jobs)
            engine.stop()
        engine.join(timeout_s=120)
        if engine.failure is not None:
            raise engine.failure
        counters = {"steps": engine.steps, "shared": engine.executor.shared, "plans_sent": engine.plans_sent,
                    "sampled_steps": engine.sampled_steps, "overlapped_steps": engine.overlapped_steps}
        results.put((rank, outcomes, {**setup.info(), **counters}, None))
    except BaseException:
        results.put((rank, None, None, traceback.format_exc()))


def run_tp_engine(model_dir: str, world_size: int, jobs, **settings) -> dict[int, tuple[dict, dict]]:
    """{rank: (rank 0's outcomes by seq_id or None, rank info and engine counters)} of `jobs`
    served by `world_size` ranks; `settings`: RankSettings fields (max_batch_size is required;
    device "cpu" and dtype "float32" unless given)."""
    return _spawn_and_collect(_engine_rank_main, world_size, lambda results: (model_dir, jobs, results, settings))


def run_tp_script(model_dir: str, world_size: int, script: Script, device: str = "cpu",
                  dtype: str = "float32", cuda_graphs: bool = True,
                  cpu_all_reduce: str = "auto", **settings) -> dict[int, tuple[dict, dict]]:
    """{rank: (results by seq_id, rank info)}; any rank's failure is raised.

    The ranks share this machine, so "auto" sums in shared memory where DeepSpeed can, as
    the app does. `settings`: more RankSettings fields (gpu_all_reduce=..., compile_decode=...)."""
    return _spawn_and_collect(_rank_main, world_size, lambda results: (
        model_dir, script, results, device, dtype, cuda_graphs, cpu_all_reduce, settings))


def _spawn_and_collect(target, world_size: int, args_for) -> dict[int, tuple[dict, dict]]:
    """Run target(rank, world_size, port, *args_for(results)) in one process per rank;
    each puts (rank, result, info, error) on `results`. Any rank's failure is raised."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=target, args=(r, world_size, port, *args_for(results)))
             for r in range(world_size)]
    for p in procs:
        p.start()
    got = {}
    deadline = time.monotonic() + 300
    while len(got) < world_size:
        try:
            rank, out, info, error = results.get(timeout=1)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"TP ranks died or timed out (exit codes {dead})")
            continue
        if error:
            for p in procs:
                p.kill()
            raise RuntimeError(f"rank {rank} failed:\n{error}")
        got[rank] = (out, info)
    for p in procs:
        p.join(timeout=60)
    return got


def run_tp(model_dir: str, world_size: int, prompts: list[list[int]], steps: int,
           device: str = "cpu", dtype: str = "float32", cuda_graphs: bool = True, **settings):
    """Prompts decoded together for `steps` tokens: {rank: (tokens per prompt, first-step logits)}."""
    got = run_tp_script(model_dir, world_size, Script.together(prompts, steps), device, dtype, cuda_graphs,
                        **settings)
    by_rank = {}
    for rank, (out, _) in got.items():
        seqs = [out[str(i)] for i in range(len(prompts))]
        first = [s.logits[0] for s in seqs] if seqs[0].logits else None
        by_rank[rank] = ([s.tokens for s in seqs], None if first is None else torch.tensor(first).numpy())
    return by_rank
