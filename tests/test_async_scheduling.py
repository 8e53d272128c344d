"""Async scheduling (rank 0 launches step n+1 before reading step n's tokens) hands every
sequence exactly what the synchronous loop does: the same mixed workload through the real
engine, in one process and over two real TP ranks (whose follower gets the tokens only
through the device broadcast), with async off and on.

The workload: greedy and seeded sampled rows (one with every penalty, so the sampler's
device-side history must advance without the host), logprobs, an EOS finish and a stop-id
finish, a one-token sequence (its first token ends it, so async computes an extra row for
it), echo scoring (max_tokens 0), a sequence that fills the context (its extra step writes
the cache's last position), a self-cancelling one, one the sampler refuses, joins while
others decode, more sequences than slots, and chunked prefill (7 tokens a step).
"""

from __future__ import annotations

import pytest
import torch

from serve_tp.engine.batch import SequenceBatch
from serve_tp.engine.loop import EngineLoop
from serve_tp.engine.plan import StepPlan
from serve_tp.engine.sampling import Sampler
from serve_tp.engine.scheduler import Scheduler
from serve_tp.messages import SamplingParams, SequenceRequest
from serve_tp.model.forward import GPT2Forward
from serve_tp.model.shard import shard_gpt2
from tests import reference
from tests.engine_workload import Job, drive
from tests.tp_ranks import run_tp_engine

SLOTS = 4
PREFILL_TOKENS = 7


def greedy(n: int, **more) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **more)


def long_prompt(tokenizer, n: int) -> tuple[int, ...]:
    text = " ".join(f"word{i} of the story" for i in range(n))
    return tuple(tokenizer.encode(text)[:n])


@pytest.fixture(scope="module")
def workload(tiny_model_dir):
    """(jobs, the EOS id the one-process engine is given, each greedy job's float64 tokens)."""
    jobs, eos = mixed_jobs(tiny_model_dir)
    by_id = {job.seq_id: job for job in jobs}
    solo = {sid: reference.greedy(tiny_model_dir, job.prompt, job.params.max_tokens)
            for sid, job in by_id.items() if job.params.temperature == 0 and job.params.max_tokens and sid != "full"}
    solo["full"] = reference.greedy(tiny_model_dir, by_id["full"].prompt, 4)
    return jobs, eos, solo


def mixed_jobs(model_dir: str) -> tuple[list[Job], int]:
    """The workload for `model_dir` (tests/test_gpu.py runs it too), and the EOS id to give an
    engine so that the "eos" job meets it."""
    tokenizer = reference.tokenizer(model_dir)
    context = reference.hf_model(model_dir).config.n_positions
    enc = lambda text: tuple(tokenizer.encode(text))  # noqa: E731
    hello, fox, story = enc("Hello"), enc("The quick brown fox jumps"), enc("Once upon a time")
    # The tiny model seldom picks its real EOS greedily, so the engine's EOS is a token the
    # greedy continuation of "Hello" reaches (tests/test_engine.py does the same).
    hello_solo = reference.greedy(model_dir, hello, 20)
    eos = hello_solo[5]
    story_solo = reference.greedy(model_dir, story, 20)
    stop_id = story_solo[4]
    near_full = long_prompt(tokenizer, context - 4)
    jobs = [
        Job("greedy", fox, greedy(30, logprobs=2)),
        Job("eos", hello, SamplingParams(max_tokens=20, temperature=0)),
        Job("seeded", enc("Tensor parallelism splits"),
            SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, top_k=40, seed=11, ignore_eos=True,
                           logprobs=1)),
        Job("penalised", enc("The cat sat on"),
            SamplingParams(max_tokens=20, temperature=0.8, seed=5, frequency_penalty=0.6, presence_penalty=0.3,
                           repetition_penalty=1.3, ignore_eos=True), after=("greedy", 2)),
        Job("stop_id", story, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(stop_id,),
                                             ignore_eos=True), after=("greedy", 4)),
        Job("cancelled", enc("Hi"), greedy(50), cancel_after=6),
        Job("one", enc("A long way"), greedy(1), after=("seeded", 3)),
        Job("echo", fox, SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=2), after=("greedy", 1)),
        Job("long", long_prompt(tokenizer, 100), greedy(10), after=("greedy", 5)),
        Job("full", near_full, greedy(20), after=("cancelled", 2)),
        # the API refuses top_p 0 with a 400; should it reach rank 0, the sampler ends it alone
        Job("refused", hello, SamplingParams(max_tokens=8, top_p=0.0), after=("seeded", 6)),
    ]
    return jobs, eos


def start_engine(model_dir: str, eos: int, async_scheduling: bool) -> EngineLoop:
    model = reference.hf_model(model_dir, "float32", "sdpa")
    batch = SequenceBatch(GPT2Forward(shard_gpt2(model)), slots=SLOTS, max_len=model.config.n_positions)
    sampler = Sampler(SLOTS, model.config.vocab_size, torch.device("cpu"), eos_token_id=eos, max_logprobs=5,
                      context_length=model.config.n_positions)
    loop = EngineLoop(batch, lambda plan: plan, 0, eos_token_id=eos, max_context=model.config.n_positions,
                      max_batch_size=SLOTS, batch_wait_s=0, max_prefill_tokens=PREFILL_TOKENS, sampler=sampler,
                      async_scheduling=async_scheduling)
    loop.start()
    return loop


def run_workload(model_dir: str, jobs, eos: int, async_scheduling: bool):
    engine = start_engine(model_dir, eos, async_scheduling)
    try:
        return drive(engine, jobs), engine
    finally:
        engine.stop()
        engine.join(timeout_s=30)


def check_against_reference(outcomes, jobs, solo, eos=None):
    """Greedy rows are the float64 model's tokens, cut where their finish says."""
    by_id = {job.seq_id: job for job in jobs}
    params = {sid: job.params for sid, job in by_id.items()}
    for sid, outcome in outcomes.items():
        assert outcome.after_finish == 0, f"{sid} got output after its finish"
        assert len(outcome.tokens) <= params[sid].max_tokens
        if sid in solo:
            assert outcome.tokens == solo[sid][: len(outcome.tokens)], sid
    assert outcomes["greedy"].tokens == solo["greedy"] and outcomes["greedy"].finish == "length"
    assert (outcomes["cancelled"].finish, outcomes["cancelled"].tokens) == ("cancelled", solo["cancelled"][:6])
    stop_id = params["stop_id"].stop_token_ids[0]
    assert outcomes["stop_id"].finish == "stop" and outcomes["stop_id"].tokens[-1] == stop_id
    assert outcomes["stop_id"].tokens == solo["stop_id"][: solo["stop_id"].index(stop_id) + 1]
    assert (outcomes["one"].finish, len(outcomes["one"].tokens)) == ("length", 1)
    assert (outcomes["refused"].finish, outcomes["refused"].tokens) == ("error", [])
    assert (outcomes["full"].finish, outcomes["full"].tokens) == ("length", solo["full"])  # the context is full
    echo = outcomes["echo"]
    assert (echo.finish, echo.tokens, len(echo.prompt_logprobs)) == ("length", [], len(by_id["echo"].prompt))
    assert len(outcomes["greedy"].logprobs) == 30 and len(outcomes["seeded"].logprobs) == 24
    if eos is not None:
        assert outcomes["eos"].finish == "stop" and outcomes["eos"].tokens[-1] == eos
        assert outcomes["eos"].tokens == solo["eos"][: solo["eos"].index(eos) + 1]


def logprob_values(outcome) -> list[float]:
    entries = outcome.logprobs + [e for e in outcome.prompt_logprobs or [] if e is not None]
    return [e.logprob for e in entries] + [v for e in entries for _, v in e.top]


def without_values(outcome) -> tuple:
    entries = outcome.logprobs + [e for e in outcome.prompt_logprobs or [] if e is not None]
    return (outcome.tokens, outcome.finish, outcome.after_finish,
            [(e.token_id, [i for i, _ in e.top]) for e in entries])


@pytest.fixture(scope="module")
def rounding(tiny_model_dir, workload):
    """What float32 rounding alone does to these logits (|fp32 - fp64|, the control): a
    logprob (logit minus the log-sum) may move by twice that with the batch's shape, and
    the async batch has another shape (finished rows stay a step longer)."""
    jobs, _, solo = workload
    sequences = [job.prompt + tuple(solo.get(job.seq_id, ())) for job in jobs if job.seq_id in ("greedy", "echo")]
    bound = 2 * reference.rounding_control(tiny_model_dir, sequences)["fp32_vs_fp64"]
    assert 0 < bound < 1e-3  # float32 noise, not a different distribution
    return bound


def assert_same_outputs(ahead: dict, sync: dict, bound: float) -> None:
    """Tokens, finishes, logprob ids: identical. Logprob values: within float32 rounding."""
    assert ahead.keys() == sync.keys()
    for sid in sync:
        assert without_values(ahead[sid]) == without_values(sync[sid]), sid
        gaps = [abs(a - b) for a, b in zip(logprob_values(ahead[sid]), logprob_values(sync[sid]))]
        assert max(gaps, default=0) <= bound, sid


def test_async_scheduling_gives_the_synchronous_outputs(tiny_model_dir, workload, rounding):
    jobs, eos, solo = workload
    sync, sync_engine = run_workload(tiny_model_dir, jobs, eos, async_scheduling=False)
    ahead, async_engine = run_workload(tiny_model_dir, jobs, eos, async_scheduling=True)
    check_against_reference(sync, jobs, solo, eos)
    assert_same_outputs(ahead, sync, rounding)
    # The order itself: the synchronous loop reads every step's tokens before it sends the
    # next plan; the async one reads every step's tokens only after (and so ran ahead).
    assert sync_engine.sampled_steps > 0 and sync_engine.overlapped_steps == 0
    assert async_engine.overlapped_steps == async_engine.sampled_steps > 0
    for engine in (sync_engine, async_engine):
        assert engine.load()["running"] == 0 and len(engine.batch) == 0 and engine.failure is None


def test_async_scheduling_over_two_tp_ranks(tiny_model_dir, workload, rounding):
    """Real rank processes (gloo, shared-memory sums): the follower decodes from the tokens
    rank 0 broadcasts before each step; a follower feeding anything else would change its
    half of every sum, and the tokens with it."""
    jobs, _, solo = workload
    jobs = [job for job in jobs if job.seq_id != "eos"]  # the ranks' EOS is the model's own
    settings = dict(max_batch_size=SLOTS, max_prefill_tokens=PREFILL_TOKENS, cpu_all_reduce="auto")
    sync = run_tp_engine(tiny_model_dir, 2, jobs, **settings)
    ahead = run_tp_engine(tiny_model_dir, 2, jobs, async_scheduling=True, **settings)
    check_against_reference(ahead[0][0], jobs, solo)
    assert_same_outputs(ahead[0][0], sync[0][0], rounding)
    lead, follower = ahead[0][1], ahead[1][1]
    assert follower["shared"] == lead["shared"] > 0  # every device-decoded step, on both ranks
    assert follower["steps"] == lead["plans_sent"] - 1  # the follower ran every plan but the shutdown
    assert lead["overlapped_steps"] == lead["sampled_steps"] > 0
    assert sync[0][1]["shared"] == sync[1][1]["shared"] == 0 and sync[0][1]["overlapped_steps"] == 0


def test_async_plans_carry_row_counts_not_tokens():
    """The async scheduler names how many rows decode; the tokens stay on the device."""
    rows: list[str] = []  # the batch's decoding rows
    sched = Scheduler(lambda leaving: [r for r in rows if r not in leaving], 4, 0, async_scheduling=True)
    for sid in ("a", "b"):
        sched.submit(SequenceRequest(sid, (1, 2), SamplingParams(max_tokens=4)), lambda out: None)
    first, joining = sched.next_plan()
    assert [c.seq_id for c in first.prefill] == ["a", "b"] and [s.seq_id for s in joining] == ["a", "b"]
    assert first.decode_from_device == 0 and first.decode_tokens == []
    rows += ["a", "b"]  # their prefill ended: they decode from the next step on
    sched.finish("b")
    second, _ = sched.next_plan()
    assert (second.evict, second.decode_tokens, second.decode_from_device) == (["b"], [], 1)
    assert second.rows == 1 and second.has_work
    with pytest.raises(ValueError, match="not both"):
        StepPlan(decode_tokens=[3], decode_from_device=1)
