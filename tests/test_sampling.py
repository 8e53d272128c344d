"""Per-row sampling inside a batch."""

import torch

from serve_tp.engine.sampling import SamplingParams, filter_logits, make_generator, sample_tokens


def test_greedy_rows_take_the_argmax_and_sampled_rows_follow_their_seed():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0)]
    first = sample_tokens(logits, params, [make_generator(p) for p in params])
    again = sample_tokens(logits, params, [make_generator(p) for p in params])
    assert first == again
    assert first[0] == int(logits[0].argmax()) and first[2] == int(logits[2].argmax())


def test_top_k_one_is_greedy():
    logits = torch.randn(4, 30)
    params = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(4)]
    assert sample_tokens(logits, params, [make_generator(p) for p in params]) == logits.argmax(-1).tolist()


def test_top_p_that_rounds_to_zero_keeps_the_top_token():
    logits = torch.tensor([1.0, 3.0, 2.0])
    kept = filter_logits(logits, top_k=0, top_p=1e-300)
    assert torch.isfinite(kept).tolist() == [False, True, False]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.7)).tolist()
    assert kept == [True, True, False, False]
