"""TP=2, 3 and 4 on real CPU ranks (row-parallel sums in DeepSpeed's shared memory, the
app's default on one node, or over gloo) give one unsharded process's greedy tokens and logits,
over the whole context: prompts up to the context minus the output, short and long
prompts in one batch, sequences joining while others decode and leaving (slots moved),
every attention-span bucket crossed, even and uneven head splits; and with chunked
prefill, long prompts prefilled over many steps while others decode, one cancelled
part-way through its prompt, another's part-filled slot moved by an eviction.

The reference is Hugging Face in float64 (tests/reference.py); the bound on our float32
logits is BOUND_FACTOR times the control, Hugging Face's own float32 error against float64
on the same sequences.
"""

import pytest
import torch

from serve_tp.engine.decode_runner import span_buckets
from serve_tp.model.pretrain import split_corpus
from serve_tp.model.tiny_model import build_tiny_gpt2, corpus_ids
from tests import reference
from tests.tp_ranks import Arrival, Script, run_tp_script


@pytest.fixture(scope="module")
def five_head_model_dir(tmp_path_factory) -> str:
    """Heads split unevenly on every TP size: 3+2, 2+2+1, 2+1+1+1 (MLP 320 likewise)."""
    return str(build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-5-heads", n_head=5, n_embd=80))


def whole_context_script(model_dir: str) -> Script:
    """Held-out text as prompts; lengths chosen so every span bucket (64, 128, 256) is used
    and crossed while rows of other lengths share the step."""
    context = reference.hf_model(model_dir).config.n_positions
    _, text = split_corpus(corpus_ids(reference.tokenizer(model_dir)))
    cuts = iter(range(0, len(text), context))

    def prompt(length):
        start = next(cuts)
        return tuple(int(t) for t in text[start: start + length])

    return Script([
        Arrival("full", prompt(context - 6), 6),  # ends on the last position of the context
        Arrival("short", prompt(3), 70),  # decodes alone at the end, crossing 64
        Arrival("mid", prompt(60), 10),  # crosses 64 beside the full-context row
        Arrival("joins-128", prompt(125), 8, step=3),  # joins mid-flight, crosses 128
        Arrival("joins-small", prompt(5), 20, step=8),  # joins after "full" left (a slot move)
        Arrival("joins-long", prompt(190), 40, step=8),
    ])


def chunked_script(model_dir: str, budget: int = 16) -> Script:
    """Prompts of up to 190 tokens through a 16-token prefill budget shared in 4-token
    shares (the default quarter): "early" decodes while "doomed" and "long" are prefilled
    chunk by chunk; "short" finishes ahead of both (the slots of their part-filled prompts
    permuted); "doomed" is cancelled part-way; "early" leaves while "long" is part-way, so
    its slot moves down; "late" arrives mid-flight and its 125 tokens join over several
    steps beside decoding rows."""
    held = [a.prompt for a in whole_context_script(model_dir).arrivals]
    return Script([
        Arrival("early", held[4][:5], 4),
        Arrival("doomed", held[2], 30, cancel_step=2),  # 60 tokens: part-way at step 2
        Arrival("long", held[5], 30),
        Arrival("short", held[1], 40),
        Arrival("late", held[3], 10, step=6),
    ], prefill_budget=budget)


def assert_equivalent(model_dir: str, world_size: int, all_reduce: str = "shm", script: Script = None) -> dict:
    chunked = script is not None
    script = script or whole_context_script(model_dir)
    context = reference.hf_model(model_dir).config.n_positions
    got = run_tp_script(model_dir, world_size, script, cpu_all_reduce=all_reduce)
    out, info = got[0]
    assert info["all_reduce"] == all_reduce
    live = [a for a in script.arrivals if a.cancel_step is None]
    sequences = [list(a.prompt) + out[a.seq_id].tokens[:-1] for a in live]
    control = reference.rounding_control(model_dir, sequences)
    bound = reference.BOUND_FACTOR * control["fp32_vs_fp64"]
    errors, ties = [], 0
    for arrival in script.arrivals:
        seq = out[arrival.seq_id]
        for rank in range(1, world_size):  # every rank decoded the same sequence
            assert got[rank][0][arrival.seq_id].tokens == seq.tokens
        if arrival.cancel_step is not None:
            continue
        assert len(seq.tokens) == arrival.max_new
        check = reference.check_greedy_run(model_dir, arrival.prompt, seq.tokens, torch.tensor(seq.logits), bound)
        errors.append(check.max_error)
        ties += check.near_ties
    heads = [got[r][1]["heads"] for r in range(world_size)]
    assert sum(heads) == reference.hf_model(model_dir).config.n_head and max(heads) - min(heads) <= 1
    result = {"tp_vs_fp64": max(errors), "bound": bound, "near_ties": ties, "heads": heads, **control}
    print(f"TP={world_size}: {result}")  # the numbers behind the bound, shown with pytest -s
    if chunked:
        result["play"] = info["play"]
        return result
    assert max(len(a.prompt) + a.max_new for a in script.arrivals) == context
    spans = info["spans"]  # every bucket used, and each boundary crossed from one step to the next
    assert sorted(set(spans)) == span_buckets(context) == [64, 128, 256]
    assert {(a, b) for a, b in zip(spans, spans[1:]) if a != b} >= {(64, 128), (128, 256), (256, 128)}
    return result


@pytest.mark.parametrize("world_size,all_reduce", [(2, "shm"), (3, "shm"), (2, "gloo")])
def test_even_split_matches_unsharded_over_the_whole_context(tiny_model_dir, world_size, all_reduce):
    assert_equivalent(tiny_model_dir, world_size, all_reduce)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_uneven_split_matches_unsharded_over_the_whole_context(five_head_model_dir, world_size):
    result = assert_equivalent(five_head_model_dir, world_size)
    assert result["heads"] == {2: [3, 2], 3: [2, 2, 1], 4: [2, 1, 1, 1]}[world_size]


@pytest.mark.parametrize("world_size,model", [(2, "even"), (3, "uneven")])
def test_chunked_prefill_matches_unsharded(tiny_model_dir, five_head_model_dir, world_size, model):
    model_dir = tiny_model_dir if model == "even" else five_head_model_dir
    script = chunked_script(model_dir)
    result = assert_equivalent(model_dir, world_size, script=script)
    play = result["play"]
    long_prompt = len(next(a for a in script.arrivals if a.seq_id == "long").prompt)
    assert play.chunks >= long_prompt // script.prefill_budget  # the long prompt took many steps
    assert play.evicted_pending == ["doomed"] and play.pending_shifted >= 1
    assert play.overtaken >= 1  # a prompt finished ahead of one that held a slot before it
