"""The continuous-batching loop in one process: joins mid-flight, leaves early, stays exact."""

import threading
import time

import pytest
import torch

from serve_tp.engine.batch import SequenceBatch
from serve_tp.engine.loop import EngineLoop
from serve_tp.engine.sampling import Sampler
from serve_tp.model.forward import GPT2Forward
from serve_tp.model.shard import shard_gpt2
from serve_tp.messages import SamplingParams, SequenceRequest
from tests import reference


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    """(the model directory, its tokenizer); the reference's float32 model is the one served."""
    return tiny_model_dir, reference.tokenizer(tiny_model_dir)


def alone(model_dir, prompt_ids, n):
    """Greedy tokens of one sequence, no batch, no cache (the float64 reference)."""
    return reference.greedy(model_dir, prompt_ids, n)


class Collector:
    def __init__(self):
        self.tokens, self.finish, self.done = [], None, threading.Event()
        self.first = threading.Event()
        self.late = 0  # outputs after the finishing one

    def __call__(self, out):
        if self.finish is not None:
            self.late += 1
        self.tokens += out.token_ids
        if out.token_ids:
            self.first.set()
        if out.finish_reason:
            self.finish = out.finish_reason
            self.done.set()


def start_engine(model_dir, eos_token_id, max_prefill_tokens=2048, async_scheduling=False):
    model = reference.hf_model(model_dir, "float32", "sdpa")
    batch = SequenceBatch(GPT2Forward(shard_gpt2(model)), slots=4, max_len=model.config.n_positions)
    sampler = Sampler(4, model.config.vocab_size, torch.device("cpu"), eos_token_id=eos_token_id,
                      max_logprobs=5, context_length=model.config.n_positions)
    loop = EngineLoop(batch, lambda plan: plan, 0,
                      eos_token_id=eos_token_id, max_context=model.config.n_positions,
                      max_batch_size=4, batch_wait_s=0, max_prefill_tokens=max_prefill_tokens, sampler=sampler,
                      async_scheduling=async_scheduling)
    loop.start()
    return loop


@pytest.fixture
def engine(model_and_tokenizer):
    model_dir, tokenizer = model_and_tokenizer
    loop = start_engine(model_dir, tokenizer.eos_token_id)
    yield loop
    loop.stop()


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_sequences_joining_mid_flight_get_their_solo_tokens(engine, model_and_tokenizer):
    model_dir, tokenizer = model_and_tokenizer
    prompts = [tokenizer.encode(p) for p in ("The quick brown fox jumps", "Hi", "Tensor parallelism splits")]
    lengths = [40, 12, 25]
    sinks = [Collector() for _ in prompts]
    engine.submit(SequenceRequest("a", tuple(prompts[0]), greedy(lengths[0])), sinks[0])
    assert sinks[0].first.wait(30)  # "a" is decoding before the others arrive
    engine.submit(SequenceRequest("b", tuple(prompts[1]), greedy(lengths[1])), sinks[1])
    engine.submit(SequenceRequest("c", tuple(prompts[2]), greedy(lengths[2])), sinks[2])
    for sink, prompt, n in zip(sinks, prompts, lengths):
        assert sink.done.wait(60)
        assert sink.finish == "length"
        assert sink.tokens == alone(model_dir, prompt, n)


def test_more_sequences_than_the_batch_wait_their_turn(engine, model_and_tokenizer):
    model_dir, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("Hello world.")
    sinks = [Collector() for _ in range(7)]  # max_batch_size is 4
    for i, sink in enumerate(sinks):
        engine.submit(SequenceRequest(str(i), tuple(prompt), greedy(5 + i)), sink)
    expected = alone(model_dir, prompt, 11)
    for i, sink in enumerate(sinks):
        assert sink.done.wait(60)
        assert sink.tokens == expected[: 5 + i]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_cancel_frees_the_slot_and_others_are_unaffected(model_and_tokenizer, async_scheduling):
    """Cancelled from another thread, at any point of a step (async scheduling too)."""
    model_dir, tokenizer = model_and_tokenizer
    engine = start_engine(model_dir, tokenizer.eos_token_id, async_scheduling=async_scheduling)
    try:
        _cancel_frees_the_slot(engine, model_dir, tokenizer)
    finally:
        engine.stop()


def _cancel_frees_the_slot(engine, model_dir, tokenizer):
    prompt = tokenizer.encode("Once upon a time")
    long_sink, other = Collector(), Collector()
    engine.submit(SequenceRequest("long", tuple(prompt), greedy(200)), long_sink)
    engine.submit(SequenceRequest("other", tuple(prompt), greedy(20)), other)
    assert long_sink.first.wait(30)
    engine.cancel("long")
    assert long_sink.done.wait(30) and long_sink.finish == "cancelled"
    assert long_sink.tokens == alone(model_dir, prompt, len(long_sink.tokens))
    assert other.done.wait(60) and other.tokens == alone(model_dir, prompt, 20)
    deadline = time.monotonic() + 5
    while (engine.load()["running"] or engine.steps < engine.plans_sent) and time.monotonic() < deadline:
        time.sleep(0.05)  # every slot freed, and the loop between steps: late outputs would be in
    assert long_sink.late == other.late == 0  # nothing after "cancelled" or "length"
    assert engine.load() | {"steps": 0, "step_ms": None} == {"running": 0, "waiting": 0, "steps": 0, "step_ms": None}


def test_eos_ends_a_sequence_unless_ignored(model_and_tokenizer):
    """The engine stops a sequence at its model's EOS id. The trained tiny model seldom
    chooses its real EOS greedily (one token in two thousand of its corpus), so this engine
    is given as EOS a token the greedy continuation reaches after a few steps: the rule is
    the same for any id."""
    model_dir, tokenizer = model_and_tokenizer
    ids = tokenizer.encode("Hello")
    solo = alone(model_dir, ids, 30)
    eos = solo[5]
    stop_at = solo.index(eos) + 1
    engine = start_engine(model_dir, eos)
    try:
        stopped, ignored = Collector(), Collector()
        engine.submit(SequenceRequest("stop", tuple(ids), SamplingParams(max_tokens=30, temperature=0)), stopped)
        engine.submit(SequenceRequest("ignore", tuple(ids), greedy(stop_at + 3)), ignored)
        assert stopped.done.wait(60) and ignored.done.wait(60)
        assert (stopped.finish, stopped.tokens) == ("stop", solo[:stop_at])
        assert (ignored.finish, ignored.tokens) == ("length", solo[:stop_at + 3])
    finally:
        engine.stop()


def test_params_the_sampler_refuses_end_that_sequence_alone(engine, model_and_tokenizer):
    """The API refuses these with a 400; should any reach rank 0, one sequence fails, not the group."""
    model_dir, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("Hello world.")
    bad, good = Collector(), Collector()
    engine.submit(SequenceRequest("good", tuple(prompt), greedy(8)), good)
    engine.submit(SequenceRequest("bad", tuple(prompt), SamplingParams(max_tokens=8, top_p=0.0)), bad)
    assert bad.done.wait(30) and good.done.wait(60)
    assert (bad.finish, bad.tokens) == ("error", [])
    assert (good.finish, good.tokens) == ("length", alone(model_dir, prompt, 8))
    assert engine.alive


@pytest.fixture
def chunked_engine(model_and_tokenizer):
    """Prefills 7 prompt tokens a step: a 100-token prompt takes 15 steps."""
    model_dir, tokenizer = model_and_tokenizer
    loop = start_engine(model_dir, tokenizer.eos_token_id, max_prefill_tokens=7)
    yield loop
    loop.stop()


def long_prompt(tokenizer, n, offset=0):
    text = " ".join(f"word{i} of the story" for i in range(offset, offset + n))
    return tokenizer.encode(text)[:n]


def test_chunked_prefill_keeps_streams_decoding_and_exact(chunked_engine, model_and_tokenizer):
    """Long prompts arrive while a stream decodes: the stream gets a token in every step of
    their prefill, and every sequence gets its solo tokens."""
    model_dir, tokenizer = model_and_tokenizer
    first = tokenizer.encode("The quick brown fox jumps")
    running = Collector()
    chunked_engine.submit(SequenceRequest("run", tuple(first), greedy(60)), running)
    assert running.first.wait(30)
    prompts = [long_prompt(tokenizer, 100), long_prompt(tokenizer, 50, 7)]
    sinks = [Collector() for _ in prompts]
    steps_before = chunked_engine.steps
    tokens_before = len(running.tokens)
    for i, (prompt, sink) in enumerate(zip(prompts, sinks)):
        chunked_engine.submit(SequenceRequest(f"long{i}", tuple(prompt), greedy(10)), sink)
    assert sinks[0].first.wait(60)
    prefill_steps = chunked_engine.steps - steps_before
    assert prefill_steps >= 100 // 7  # the prompt came in chunks...
    assert len(running.tokens) - tokens_before >= prefill_steps - 2  # ...while the stream kept decoding
    for sink, prompt in [(running, first)] + list(zip(sinks, prompts)):
        assert sink.done.wait(60)
    assert running.tokens == alone(model_dir, first, 60)
    for sink, prompt in zip(sinks, prompts):
        assert sink.tokens == alone(model_dir, prompt, 10)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_cancelling_a_prompt_part_way_through_prefill_frees_its_slot(model_and_tokenizer, async_scheduling):
    model_dir, tokenizer = model_and_tokenizer
    engine = start_engine(model_dir, tokenizer.eos_token_id, max_prefill_tokens=2,  # 125 steps of prompt
                          async_scheduling=async_scheduling)
    try:
        short = tokenizer.encode("Once upon a time")
        doomed, behind, other = Collector(), Collector(), Collector()
        engine.submit(SequenceRequest("other", tuple(short), greedy(40)), other)
        assert other.first.wait(30)
        engine.submit(SequenceRequest("doomed", tuple(long_prompt(tokenizer, 250)), greedy(5)), doomed)
        engine.submit(SequenceRequest("behind", tuple(long_prompt(tokenizer, 30, 3)), greedy(8)), behind)
        deadline = time.monotonic() + 30
        while engine.load()["running"] < 2 and time.monotonic() < deadline:
            time.sleep(0.001)  # "doomed" holds a slot: it is part-way through its prompt
        assert not doomed.first.is_set()
        engine.cancel("doomed")
        assert doomed.done.wait(30) and doomed.finish == "cancelled" and doomed.tokens == []
        assert behind.done.wait(60) and behind.tokens == alone(model_dir, long_prompt(tokenizer, 30, 3), 8)
        assert other.done.wait(60) and other.tokens == alone(model_dir, short, 40)
    finally:
        engine.stop()


def test_a_small_prefill_budget_gives_the_same_tokens_and_echo_scores(model_and_tokenizer):
    """Three tokens of prefill a step: prompts take many steps, arriving while others decode.
    Tokens equal the solo reference; echo scores (every prompt position, gathered over the
    chunks) equal those of an engine that prefills whole prompts, to rounding."""
    model_dir, tokenizer = model_and_tokenizer
    prompts = {"gen": "Tensor parallelism splits every layer across devices, and each",
               "echo": "The quick brown fox jumps over the lazy dog near the river bank.",
               "both": "Once upon a time there was a"}
    params = {"gen": greedy(12),
              "echo": SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=2),
              "both": SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=0)}
    runs = {}
    for budget in (3, 512):
        engine = start_engine(model_dir, tokenizer.eos_token_id, max_prefill_tokens=budget)
        try:
            sinks = {name: Collector() for name in prompts}
            scores = {name: [] for name in prompts}
            for name, text in prompts.items():
                sink = sinks[name]
                def capture(out, sink=sink, into=scores[name]):
                    if out.prompt_logprobs is not None:
                        into.append(out.prompt_logprobs)
                    sink(out)
                engine.submit(SequenceRequest(name, tuple(tokenizer.encode(text)), params[name]), capture)
                if name == "gen":
                    assert sink.first.wait(30)  # the others arrive while it decodes
            assert all(sink.done.wait(60) for sink in sinks.values())
            runs[budget] = ({n: s.tokens for n, s in sinks.items()}, scores, engine.steps)
        finally:
            engine.stop()
    (tokens, scores, chunked_steps), (whole_tokens, whole_scores, _) = runs[3], runs[512]
    assert tokens == whole_tokens
    assert tokens["gen"] == alone(model_dir, tokenizer.encode(prompts["gen"]), 12)
    assert tokens["both"] == alone(model_dir, tokenizer.encode(prompts["both"]), 6)
    for name in ("echo", "both"):
        [chunked], [whole] = scores[name], whole_scores[name]
        assert len(chunked) == len(tokenizer.encode(prompts[name])) and chunked[0] is None
        for ours, theirs in zip(chunked[1:], whole[1:]):
            assert ours.token_id == theirs.token_id
            assert abs(ours.logprob - theirs.logprob) < 1e-4
            assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]


def test_a_prompt_that_leaves_no_slot_is_refused_at_submit_and_the_engine_serves_on(engine, model_and_tokenizer):
    """The backstop behind the API's 400: a prompt filling the whole context (echo scoring,
    max_tokens 0) would make every rank refuse its plan; the engine refuses it alone."""
    _, tokenizer = model_and_tokenizer
    full = SequenceRequest("full", (5,) * engine.max_context, SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=0))
    with pytest.raises(ValueError, match="context"):
        engine.submit(full, Collector())
    sink = Collector()
    engine.submit(SequenceRequest("after", tuple(tokenizer.encode("Hi")), greedy(3)), sink)
    assert sink.done.wait(60) and sink.finish == "length" and engine.alive
