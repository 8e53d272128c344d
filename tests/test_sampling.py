"""The batched sampler: distributions, seeds, logit edits, logprobs and hostile rows.

Statistics compare thousands of draws (one row per draw, each with its own seed, in one
batch) with the filtered softmax of the tiny model's Hugging Face logits, written plainly
in float64 below. The seeds are fixed, so every check here is deterministic.
"""

import dataclasses
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from serve_tp.engine.batch import compact
from serve_tp.engine.sampling import Sampler, prompt_logprobs, random_seed
from serve_tp.engine.sampling_ops import counter_uniform, inverse_cdf, nucleus_size, to_int64
from serve_tp.messages import SamplingParams

EOS = 0
PROMPT = "The quick brown fox jumps over the lazy dog"


def make_sampler(slots: int, vocab: int, context: int = 64, avoid_host_sync: bool = False) -> Sampler:
    return Sampler(slots, vocab, "cpu", eos_token_id=EOS, max_logprobs=20, context_length=context,
                   avoid_host_sync=avoid_host_sync)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    """(prompt ids, logits [T, V]) of the tiny model's Hugging Face forward."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPT).input_ids
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits[0]


# ---- statistics against a plain reference ----
def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """vLLM's chain for one row in float64: temperature, min_p, top_k, then top_p renormalised."""
    probs = torch.softmax(logits.double() / p.temperature, -1)
    if p.min_p > 0:
        probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
    if 0 < p.top_k < probs.numel():
        probs = torch.where(probs >= probs.sort(descending=True).values[p.top_k - 1], probs, 0.0)
    probs = probs / probs.sum()
    if p.top_p < 1:
        ordered, order = probs.sort(descending=True)
        keep_sorted = (ordered.cumsum(0) - ordered) < p.top_p
        keep_sorted[0] = True
        probs = torch.where(torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted), probs, 0.0)
    return probs / probs.sum()


def tv_bound(probs: torch.Tensor, draws: int) -> float:
    """Total variation an honest empirical distribution of `draws` stays under.

    E|count_i/N - p_i| <= sqrt(2/pi) sigma_i (normal approximation; smaller for rare ids)
    and the sum of the deviations has a standard deviation below sqrt(sum sigma_i^2):
    the bound is the mean plus six of those.
    """
    sigma = (probs * (1 - probs) / draws).sqrt()
    return float(0.5 * (math.sqrt(2 / math.pi) * sigma.sum() + 6 * (sigma ** 2).sum().sqrt()))


def empirical(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def draw_many(logits_row: torch.Tensor, params: SamplingParams, draws: int, slots: int = 2048,
              avoid_host_sync: bool = False) -> torch.Tensor:
    """`draws` tokens: `slots` seeds, each sampling draws/slots steps (a new position each)."""
    slots = min(slots, draws)
    sampler = make_sampler(slots, logits_row.numel(), avoid_host_sync=avoid_host_sync)
    for slot in range(slots):
        sampler.admit(slot, params, seed=slot, prompt_ids=[1])
    batch = logits_row.expand(slots, -1).contiguous()
    return torch.cat([sampler.sample(batch).tokens for _ in range(draws // slots)])


DRAWS = 32768


@pytest.mark.parametrize("params, avoid_host_sync", [
    (SamplingParams(temperature=1.0), False),
    (SamplingParams(temperature=2.0), False),
    (SamplingParams(temperature=0.7, top_k=20), False),
    (SamplingParams(temperature=1.5, top_p=0.8), False),
    (SamplingParams(temperature=1.5, top_p=0.8), True),
    (SamplingParams(temperature=1.0, min_p=0.05), False),
    (SamplingParams(temperature=1.3, top_k=40, top_p=0.9, min_p=0.02), False),
    (SamplingParams(temperature=1.2, min_p=0.01, top_p=0.7), True),
], ids=["t1", "t2", "topk", "topp", "topp-radix", "minp", "topk-topp-minp", "minp-topp-radix"])
def test_draws_follow_the_filtered_softmax(hf, params, avoid_host_sync):
    _, logits = hf
    row = logits[-1]
    expected = reference_probs(row, params)
    tokens = draw_many(row, params, DRAWS, avoid_host_sync=avoid_host_sync)
    bound = tv_bound(expected, DRAWS)

    outside = set(tokens.tolist()) - set(expected.nonzero().flatten().tolist())
    assert not outside, f"drew ids the filter removes: {sorted(outside)[:10]}"
    tv = 0.5 * (empirical(tokens, row.numel()) - expected).abs().sum().item()
    assert tv < bound, f"TV {tv:.4f} vs bound {bound:.4f}"
    # Control: honest draws of the same size land under the same bound...
    honest = torch.multinomial(expected, DRAWS, replacement=True, generator=torch.Generator().manual_seed(7))
    assert 0.5 * (empirical(honest, row.numel()) - expected).abs().sum().item() < bound
    # ...and is tight enough to see a temperature 30% off: a sampler drawing from `wrong`
    # has an expected empirical TV of at least TV(wrong, expected) (TV is convex).
    wrong = reference_probs(row, dataclasses.replace(params, temperature=params.temperature * 1.3))
    assert 0.5 * (wrong - expected).abs().sum().item() > bound


@pytest.mark.parametrize("avoid_host_sync", [False, True], ids=["candidates", "radix"])
@pytest.mark.parametrize("vocab, top_p", [(600, 0.95), (3000, 0.5), (50257, 0.9)])
def test_a_wide_nucleus_is_cut_exactly(vocab, top_p, avoid_host_sync):
    """Flat rows whose nucleus reaches far past the 64 candidates (the radix select)."""
    logits = -1e-4 * torch.arange(vocab, dtype=torch.float32)  # strictly decreasing, near uniform
    params = SamplingParams(temperature=1.0, top_p=top_p)
    kept = int(reference_probs(logits, params).count_nonzero())
    tokens = draw_many(logits, params, 1024, slots=256, avoid_host_sync=avoid_host_sync)
    assert int(tokens.max()) < kept  # nothing past the nucleus
    assert int(tokens.max()) >= kept - 30 * kept // 1000  # and not cut short: its last tokens come up


def test_both_top_p_routes_cut_the_same_nucleus(hf):
    """Candidates (+ radix for the rows they miss) and radix for every row: the same tokens."""
    _, logits = hf
    params = [SamplingParams(temperature=t, top_p=p, min_p=m)
              for t in (0.6, 1.0, 1.7) for p in (0.3, 0.8, 0.97) for m in (0.0, 0.02)]
    rows = logits.repeat(len(params) * 4 // logits.shape[0] + 1, 1)[:len(params) * 4]
    routes = []
    for avoid_host_sync in (False, True):
        sampler = make_sampler(rows.shape[0], rows.shape[1], avoid_host_sync=avoid_host_sync)
        for slot in range(rows.shape[0]):
            sampler.admit(slot, params[slot % len(params)], seed=slot, prompt_ids=[1])
        routes.append(torch.stack([sampler.sample(rows).tokens for _ in range(8)]))
    assert torch.equal(routes[0], routes[1])


# ---- seeds ----
def run_alone(params, seed, rows, prompt=(3, 4)):
    sampler = make_sampler(1, rows.shape[1])
    sampler.admit(0, params, seed, prompt)
    return [int(sampler.sample(row[None]).tokens[0]) for row in rows]


NEIGHBOURS = [
    SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=1.0),
    SamplingParams(temperature=1.1, top_p=0.5), SamplingParams(temperature=0.9, min_p=0.1, logprobs=2),
    SamplingParams(temperature=1.0, frequency_penalty=1.0, logit_bias=((2, 5.0),), min_tokens=3),
]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=8),
    SamplingParams(temperature=1.3, top_p=0.6), SamplingParams(temperature=1.0, min_p=0.05, top_p=0.9),
    SamplingParams(temperature=0.9, repetition_penalty=1.4, presence_penalty=0.5, min_tokens=4, stop_token_ids=(9,)),
], ids=["plain", "topk", "topp", "minp-topp", "penalties"])
def test_a_seed_gives_the_same_tokens_alone_in_a_batch_and_after_moves(params):
    vocab, steps = 80, 12
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(steps, vocab, generator=gen) * 2
    alone = run_alone(params, 1234, rows)
    assert run_alone(params, 1234, rows) == alone
    assert run_alone(params, 1235, rows) != alone

    sampler = make_sampler(8, vocab)
    order = [f"n{i}" for i in range(3)] + ["target"] + [f"n{i}" for i in range(3, len(NEIGHBOURS))]
    for slot, name in enumerate(order):
        is_target = name == "target"
        sampler.admit(slot, params if is_target else NEIGHBOURS[int(name[1:])], 1234 if is_target else slot,
                      (3, 4) if is_target else (5,))
    together = []
    for step in range(steps):
        logits = torch.randn(len(order), vocab, generator=gen) * 2
        logits[order.index("target")] = rows[step]
        together.append(int(sampler.sample(logits).tokens[order.index("target")]))
        if step in (3, 7):  # neighbours leave: the batch refills their slots from the end
            order, moves = compact(order, [order[0], order[-1]] if step == 3 else [order[1]])
            for source, target in moves:
                sampler.move(source, target)
    assert together == alone


def test_counter_uniform_is_splitmix64():
    mask = (1 << 64) - 1

    def reference(seed, position):
        z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    assert reference(0, 0) == 0xE220A8397B1DCDAF  # splitmix64's published first output for seed 0
    seeds = [0, 1, -1, 2**63 - 1, -(2**63), 2**64 + 5, 12345678901234567]
    positions = list(range(0, 2000, 97)) + [2**40]
    pairs = [(s, q) for s in seeds for q in positions]
    got = counter_uniform(torch.tensor([to_int64(s) for s, _ in pairs]), torch.tensor([q for _, q in pairs]))
    assert got.tolist() == [(reference(s, q) >> 40) / 2**24 for s, q in pairs]


def test_random_seeds_differ():
    assert len({random_seed() for _ in range(100)}) == 100


# ---- logit edits against a per-row reference ----
def reference_processed(logits, p: SamplingParams, prompt, generated):
    out = logits.clone()
    for token, bias in dict(p.logit_bias).items():
        out[token] += bias
    if len(generated) < p.min_tokens:
        for token in {EOS, *p.stop_token_ids}:
            out[token] = float("-inf")
    for token in set(prompt) | set(generated):
        out[token] = out[token] / p.repetition_penalty if out[token] > 0 else out[token] * p.repetition_penalty
    for token in set(generated):
        out[token] -= p.frequency_penalty * generated.count(token) + p.presence_penalty
    return out


EDITED = {
    "bias": SamplingParams(temperature=0, logit_bias=((4, 3.0), (7, -100.0))),
    "min_tokens": SamplingParams(temperature=0, min_tokens=4, stop_token_ids=(5, 6)),
    "repetition": SamplingParams(temperature=0, repetition_penalty=1.8),
    "freq_presence": SamplingParams(temperature=0, frequency_penalty=0.6, presence_penalty=0.9),
    "sampled_all": SamplingParams(temperature=1.0, seed=3, repetition_penalty=0.7, frequency_penalty=-0.5,
                                  presence_penalty=1.5, logit_bias=((1, 2.0),), min_tokens=2, ignore_eos=True),
    "none": SamplingParams(temperature=0),
}


def test_bias_min_tokens_and_penalties_match_a_plain_reference():
    vocab = 12
    gen = torch.Generator().manual_seed(5)
    base = {name: torch.randn(vocab, generator=gen) * 3 for name in [*EDITED, "late"]}
    base["min_tokens"][EOS] = base["min_tokens"][5] = 50.0  # the ban is what keeps them out
    prompts = {name: [i + 1, i + 2, i + 1] for i, name in enumerate([*EDITED, "late"])}
    params = dict(EDITED, late=SamplingParams(temperature=0))  # joins a slot a penalised row left
    generated = {name: [] for name in params}
    sampler = make_sampler(len(EDITED), vocab)
    order = list(EDITED)
    for slot, name in enumerate(order):
        sampler.admit(slot, params[name], seed=slot, prompt_ids=prompts[name])
    for step in range(10):
        if step == 5:
            order, moves = compact(order, ["repetition"])
            for source, target in moves:
                sampler.move(source, target)
            order.append("late")
            sampler.admit(len(order) - 1, params["late"], seed=9, prompt_ids=prompts["late"])
        logits = torch.stack([base[name] for name in order])
        expected = torch.stack([reference_processed(base[name], params[name], prompts[name], generated[name])
                                for name in order])
        torch.testing.assert_close(sampler.state.process(logits, len(order)), expected, rtol=0, atol=1e-5)
        tokens = sampler.sample(logits).tokens.tolist()
        for row, name in enumerate(order):
            if params[name].greedy:
                assert tokens[row] == int(expected[row].argmax()), (name, step)
            generated[name].append(tokens[row])
    assert EOS not in generated["min_tokens"][:4] and generated["min_tokens"][4] in (EOS, 5)
    assert len(set(generated["freq_presence"])) > 1  # the penalties moved greedy off its first choice
    assert sampler.state.process(logits, len(order)) is not logits  # edits never touch the caller's logits


# ---- logprobs ----
def test_logprobs_are_the_raw_distribution_best_first(hf):
    _, logits = hf
    row = logits[-1]
    sampler = make_sampler(3, row.numel())
    sampler.admit(0, SamplingParams(temperature=0.5, logprobs=5, logit_bias=((3, 10.0),), repetition_penalty=1.5),
                  seed=1, prompt_ids=[3, 4])
    sampler.admit(1, SamplingParams(temperature=0, logprobs=0), seed=2, prompt_ids=[3])
    sampler.admit(2, SamplingParams(temperature=1.0), seed=3, prompt_ids=[3])
    result = sampler.sample(row.expand(3, -1).contiguous())
    first, second, third = result.token_logprobs()
    reference = torch.log_softmax(row.double(), -1)
    best = reference.topk(5)
    assert abs(first.logprob - reference[first.token_id].item()) < 1e-4
    assert [i for i, _ in first.top] == best.indices.tolist()
    assert max(abs(v - r) for (_, v), r in zip(first.top, best.values.tolist())) < 1e-4
    assert [v for _, v in first.top] == sorted((v for _, v in first.top), reverse=True)
    assert second.token_id == int(row.argmax()) and second.top == () and third is None
    # Control: float32 rounding alone stays far inside 1e-4, while the processed
    # distribution (what we must not report) is far outside it.
    assert (torch.log_softmax(row, -1).double() - reference).abs().max() < 1e-5
    processed = torch.log_softmax((row.double() + torch.nn.functional.one_hot(torch.tensor(3), row.numel()) * 10) / 0.5, -1)
    assert abs(processed[first.token_id] - reference[first.token_id]) > 1e-2


def test_prompt_logprobs_score_each_prompt_token_under_the_previous_position(hf):
    ids, logits = hf
    entries = prompt_logprobs(logits, ids, 3)
    assert len(entries) == len(ids) and entries[0] is None
    reference = torch.log_softmax(logits.double(), -1)
    for t in range(1, len(ids)):
        entry = entries[t]
        assert entry.token_id == ids[t]
        assert abs(entry.logprob - reference[t - 1, ids[t]].item()) < 1e-4
        assert [i for i, _ in entry.top] == reference[t - 1].topk(3).indices.tolist()
    assert all(e.top == () for e in prompt_logprobs(logits, ids, 0)[1:])
    assert prompt_logprobs(logits[:1], ids[:1], 3) == [None]


# ---- edges ----
@pytest.mark.parametrize("avoid_host_sync", [False, True], ids=["candidates", "radix"])
def test_hostile_rows_get_some_token_and_leave_their_neighbours_alone(avoid_host_sync):
    vocab, gen = 40, torch.Generator().manual_seed(2)
    good = torch.randn(4, vocab, generator=gen)
    kinds = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=5),
             SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=0.8, min_p=0.2)]
    alone = make_sampler(4, vocab, avoid_host_sync=avoid_host_sync)
    for slot, p in enumerate(kinds):
        alone.admit(slot, p, seed=slot, prompt_ids=[1])
    expected = alone.sample(good).tokens.tolist()

    bad = torch.full((4, vocab), float("nan"))
    bad[1] = float("-inf")
    bad[2] = torch.randn(vocab, generator=gen)
    bad[2, 7] = float("inf")
    bad[3, 11] = float("nan")
    # Good rows in even slots (seeds 0..3, their own kinds), hostile rows in odd ones.
    mixed = make_sampler(8, vocab, avoid_host_sync=avoid_host_sync)
    for slot in range(8):
        mixed.admit(slot, kinds[slot // 2], seed=slot // 2 if slot % 2 == 0 else 50 + slot, prompt_ids=[1])
    logits = torch.stack([good[slot // 2] if slot % 2 == 0 else bad[slot // 2] for slot in range(8)])
    tokens = mixed.sample(logits).tokens.tolist()
    assert tokens[0::2] == expected
    assert all(0 <= t < vocab for t in tokens)


@pytest.mark.parametrize("avoid_host_sync", [False, True], ids=["candidates", "radix"])
def test_top_p_that_rounds_to_nothing_keeps_the_best_token(avoid_host_sync):
    vocab = 50
    logits = torch.randn(64, vocab, generator=torch.Generator().manual_seed(3))
    for params in (SamplingParams(temperature=1.0, top_p=1e-8), SamplingParams(temperature=1.0, top_p=1e-300),
                   SamplingParams(temperature=1.5, top_k=10, top_p=1e-8)):
        sampler = make_sampler(64, vocab, avoid_host_sync=avoid_host_sync)
        for slot in range(64):
            sampler.admit(slot, params, seed=slot, prompt_ids=[1])
        assert sampler.sample(logits).tokens.tolist() == logits.argmax(-1).tolist()


def test_top_k_of_one_is_greedy_and_past_the_vocabulary_is_off():
    vocab = 30
    logits = torch.randn(16, vocab, generator=torch.Generator().manual_seed(4))

    def tokens(**kwargs):
        sampler = make_sampler(16, vocab)
        for slot in range(16):
            sampler.admit(slot, SamplingParams(**kwargs), seed=slot, prompt_ids=[1])
        return sampler.sample(logits).tokens.tolist()

    assert tokens(temperature=1.5, top_k=1) == logits.argmax(-1).tolist()
    assert tokens(temperature=1.0, top_k=vocab + 5) == tokens(temperature=1.0, top_k=-1) == tokens(temperature=1.0)


def test_inverse_cdf_never_lands_on_a_zero_weight():
    weights = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(6, -1).contiguous()
    uniforms = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.9, 1 - 2**-24])
    column, ok = inverse_cdf(weights.cumsum(-1), weights, uniforms)
    assert column.tolist() == [1, 1, 1, 3, 3, 3] and bool(ok.all())


def test_nucleus_is_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).expand(3, -1)
    size = nucleus_size(probs, torch.tensor([0.7, 0.81, 1e-30]))
    assert size.tolist() == [2, 3, 1]


class PassLog(TorchDispatchMode):
    """The torch ops a block runs, and its passes over the vocabulary: ops that make a new
    tensor of at least `wide` elements, or reduce rows of one (argmax, topk, sort)."""

    REDUCTIONS = {"argmax", "topk", "sort", "max", "amax"}

    def __init__(self, wide: int):
        super().__init__()
        self.wide, self.ops, self.passes = wide, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops.append(name)
        fresh = isinstance(out, torch.Tensor) and not func.is_view and out is not args[0] and not name.endswith("_")
        reduces = name in self.REDUCTIONS and args[0].numel() >= self.wide
        if reduces or (fresh and out.numel() >= self.wide):
            self.passes.append(name)
        return out


@pytest.mark.parametrize("params, passes", [
    (SamplingParams(temperature=0), ["argmax"]),
    (SamplingParams(temperature=1.0), ["softmax", "pad"]),
    (SamplingParams(temperature=0.7, top_k=50), ["div", "topk"]),
    (SamplingParams(temperature=0, presence_penalty=0.5, logit_bias=((1, 1.0),)), ["clone", "argmax"]),
    (SamplingParams(temperature=0.9, top_p=0.9, min_p=0.01, frequency_penalty=0.5, logit_bias=((1, 1.0),),
                    min_tokens=2, stop_token_ids=(4,)), None),
], ids=["greedy", "temperature", "top_k", "greedy-penalties", "everything-no-host-read"])
def test_a_step_makes_only_the_vocabulary_passes_its_rows_need(params, passes):
    """All greedy costs one argmax, as before; no host read (nonzero, item) ever, even for
    top-p on the route CUDA runs, whose nucleus comes from one batched sort; no sort otherwise."""
    vocab, rows = 1000, 8
    sampler = make_sampler(rows, vocab, avoid_host_sync=passes is None)
    for slot in range(rows):
        sampler.admit(slot, params, seed=slot, prompt_ids=[1, 2])
    logits = torch.randn(rows, vocab)
    sampler.sample(logits)
    with PassLog(wide=rows * vocab) as log:
        sampler.sample(logits)
    assert passes is None or log.passes == passes
    assert not {"nonzero", "_local_scalar_dense", "item"} & set(log.ops)
    assert passes is None or "sort" not in log.ops
    if passes is None:
        assert log.passes.count("sort") == 1  # one batched sort for the whole step, not one per row


def test_bad_params_are_refused_naming_the_field():
    sampler = make_sampler(2, 10)
    for params, field in [(SamplingParams(top_p=0.0), "top_p"), (SamplingParams(temperature=-1), "temperature"),
                          (SamplingParams(logit_bias=((10, 1.0),)), "logit_bias"),
                          (SamplingParams(repetition_penalty=0), "repetition_penalty"),
                          (SamplingParams(logprobs=21), "logprobs")]:
        with pytest.raises(ValueError, match=field):
            sampler.admit(0, params, seed=1, prompt_ids=[1])
