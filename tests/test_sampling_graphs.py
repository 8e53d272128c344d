"""The fixed-shape sampling chain a CUDA graph captures, run eagerly on CPU.

On GPU the sampler replays each step's chain from a graph keyed by its `SamplePlan`
(tests/test_gpu.py checks the replays bit for bit). What a graph needs can be checked
here: the plans that key it (equal plans across a steady batch, one plan for any
all-greedy batch), a chain that never reads the device mid-way, and fixed shapes (the
penalties' full history) that change no token or logprob.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from serve_tp.messages import SamplingParams
from tests.sampler_script import FEATURES, make, run_script

VOCAB = 1000


@pytest.mark.parametrize("avoid_host_sync", [True, False], ids=["sort-nucleus", "radix-nucleus"])
def test_fixed_shapes_give_the_eager_tokens_and_logprobs_bit_for_bit(avoid_host_sync):
    eager = run_script(make(16, VOCAB, "cpu", avoid_host_sync=avoid_host_sync), vocab=VOCAB)
    fixed_sampler = make(16, VOCAB, "cpu", avoid_host_sync=avoid_host_sync, static_shapes=True)
    fixed = run_script(fixed_sampler, vocab=VOCAB)
    assert fixed == eager
    # control: the comparison sees a change of noise, and the script did sample
    assert run_script(make(16, VOCAB, "cpu", avoid_host_sync=avoid_host_sync), vocab=VOCAB, seed_offset=1) != eager
    assert len({len(rows) for rows, _, _ in eager}) >= 4  # several batch sizes
    assert any(entry is not None and entry[1] for _, _, entries in eager for entry in entries)  # top logprobs
    assert fixed_sampler.graphs is None  # graphs exist on CUDA only


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_chain_a_graph_captures_never_reads_the_device():
    """What a capture would refuse: a host read (item, nonzero) inside `run_plan`."""
    sampler = make(16, VOCAB, "cpu", avoid_host_sync=True, static_shapes=True)
    chain, log = sampler.run_plan, OpLog()

    def logged(plan, logits):
        assert not plan.reads_host
        with log:
            return chain(plan, logits)

    sampler.run_plan = logged
    run_script(sampler, vocab=VOCAB)
    assert {"sort", "topk", "scatter_add_"} <= log.ops  # top-p, top-k and the penalties all ran
    assert not {"nonzero", "_local_scalar_dense", "item"} & log.ops


def test_a_steady_batch_keeps_one_plan_and_every_greedy_batch_shares_one():
    sampler = make(4, VOCAB, "cpu", static_shapes=True)
    for slot, params in enumerate([FEATURES[2], FEATURES[7], FEATURES[9], FEATURES[4]]):
        sampler.admit(slot, params, seed=slot, prompt_ids=[1, 2, 3])
    logits = torch.randn(4, VOCAB)
    plans = set()
    for _ in range(5):
        plans.add(sampler.plan(4, logits.dtype))
        sampler.sample(logits)
    assert len(plans) == 1  # the penalties' history grows, but a graph reads all of it
    eager = make(4, VOCAB, "cpu")
    eager.admit(0, FEATURES[7], seed=0, prompt_ids=[1, 2, 3])
    assert eager.plan(1, logits.dtype).history == 3 and sampler.plan(4, logits.dtype).history == 128  # control

    greedy = set()
    for params in [SamplingParams(temperature=0), SamplingParams(temperature=0, top_p=0.5, top_k=3, min_p=0.1)]:
        sampler.admit(0, params, seed=0, prompt_ids=[1])
        greedy.add(sampler.plan(1, logits.dtype))
    assert len(greedy) == 1 and next(iter(greedy)).all_greedy
