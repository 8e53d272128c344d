"""Run the real TP path in `world_size` local processes (on CPU: DeepSpeed shared memory or gloo; NCCL on GPUs).

Every rank is started by serve_tp.engine.rank_setup.setup_rank, the function the serving
rank actor uses, then plays the same `Script` on its SequenceBatch through the engine's
Scheduler and Executor: sequences arrive at given steps (joining while others decode, their
prompts prefilled whole or in chunks of a per-step budget, shared as the scheduler shares
it), decode greedily and leave when done or cancelled (their slots refilled by moves), as
the engine loop drives them.
"""

from __future__ import annotations

import json
import os
import queue
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.multiprocessing as mp

from serve_tp.engine.distributed import free_port


@dataclass(frozen=True)
class Arrival:
    seq_id: str
    prompt: tuple[int, ...]
    max_new: int  # tokens to generate before leaving
    step: int = 0  # the step at which it is submitted
    cancel_step: Optional[int] = None  # the step at which it is cancelled, wherever it is then


@dataclass
class Script:
    arrivals: list[Arrival]
    slots: int = 0  # 0: as many as arrivals
    prefill_budget: int = 0  # prompt tokens per step (max_prefill_tokens); 0: whole prompts at once

    @classmethod
    def together(cls, prompts, max_new: int) -> "Script":
        return cls([Arrival(str(i), tuple(p), max_new) for i, p in enumerate(prompts)])


@dataclass
class SeqResult:
    tokens: list[int] = field(default_factory=list)
    logits: list = field(default_factory=list)  # float32 rows that chose each token (rank 0)


@dataclass
class PlayLog:
    spans: list[int] = field(default_factory=list)  # the attention span of every decode step
    chunks: int = 0  # prefill chunks that did not end their prompt
    evicted_pending: list[str] = field(default_factory=list)  # cancelled part-way through prefill
    pending_shifted: int = 0  # steps whose evictions moved a part-prefilled slot down
    overtaken: int = 0  # steps in which a prompt finished ahead of one that held a slot before it


def play(batch, script: Script, keep_logits: bool) -> tuple[dict[str, SeqResult], PlayLog]:
    """Drive `batch` through `script` with the engine's own Scheduler and Executor, one plan
    per step (evict, decode, prefill chunks within the budget), greedy; a sequence finishes
    after `max_new` tokens. Every rank plays the same script, so it makes the same plans.
    """
    from serve_tp.engine.decode_runner import attention_span
    from serve_tp.engine.executor import Executor
    from serve_tp.engine.scheduler import Scheduler
    from serve_tp.messages import SamplingParams, SequenceRequest

    budget = script.prefill_budget or batch.cache.slots * batch.cache.max_len
    scheduler = Scheduler(batch.rows_after_evict, batch.cache.slots, 0, budget)
    executor = Executor(batch, keep_prompt_logits=False)
    results = {a.seq_id: SeqResult() for a in script.arrivals}
    wanted = {a.seq_id: a.max_new for a in script.arrivals}
    log = PlayLog()
    waiting, step = sorted(script.arrivals, key=lambda a: a.step), 0
    while waiting or scheduler.has_work():
        while waiting and waiting[0].step <= step:
            arrival = waiting.pop(0)
            params = SamplingParams(max_tokens=arrival.max_new, temperature=0, ignore_eos=True)
            scheduler.submit(SequenceRequest(arrival.seq_id, arrival.prompt, params), lambda out: None)
        for arrival in script.arrivals:
            if arrival.cancel_step == step:
                scheduler.cancel(arrival.seq_id)
        if scheduler.has_work():
            plan, _ = scheduler.next_plan()
            log.evicted_pending += [s for s in plan.evict if s in batch.pending]
            if set(plan.evict) & set(batch.seq_ids) and set(batch.pending) - set(plan.evict):
                log.pending_shifted += 1
            log.chunks += sum(not c.final for c in plan.prefill)
            slot_order = [s for s in batch.pending if s not in plan.evict]
            slot_order += [c.seq_id for c in plan.prefill if c.seq_id not in slot_order]
            finals = [c.seq_id for c in plan.prefill if c.final]
            log.overtaken += finals != slot_order[: len(finals)]
            step_logits = executor.run(plan)
            if plan.decode_tokens:
                log.spans.append(attention_span(max(batch.lengths[: len(plan.decode_tokens)]), batch.cache.max_len))
            rows = list(batch.seq_ids)
            for seq_id, row in zip(rows, step_logits.logits if step_logits.logits is not None else []):
                token = int(row.argmax())
                results[seq_id].tokens.append(token)
                if keep_logits:
                    results[seq_id].logits.append(row.float().cpu().numpy())
                scheduler.sequence(seq_id).generated.append(token)
                if len(results[seq_id].tokens) >= wanted[seq_id]:
                    scheduler.finish(seq_id)
        step += 1
    return results, log


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
        out, log = play(setup.batch, script, keep_logits=rank == 0)
        results.put((rank, out, {**setup.info(), "spans": log.spans, "play": log}, None))
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
    the app does. `settings`: more RankSettings fields (gpu_all_reduce=..., compile_decode=...)
    that shape the rank's forward and batch; `play` drives its own scheduler and executor, so
    the engine loop's settings are refused here rather than silently dropped."""
    engine_only = {"async_scheduling", "prefill_share_tokens", "sampler_graphs"} & set(settings)
    if engine_only:
        raise ValueError(f"run_tp_script plays scripts without the engine loop: {sorted(engine_only)} would be "
                         "ignored (tests/test_async_scheduling.py drives the engine over real ranks)")
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
