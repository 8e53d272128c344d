"""A scripted serving session for the sampler: sequences join and leave (slot moves), batch
sizes change, every feature set comes and goes, and each step's outputs are recorded.

Two samplers fed the same script must give the same record bit for bit: the eager chain
against its fixed-shape form (CPU, tests/test_sampling_graphs.py) and against its CUDA
graph replays (tests/test_gpu.py). Each phase keeps its rows for a few steps, so plans
recur and graphs get captured and then replayed.
"""

from __future__ import annotations

import numpy as np
import torch

from serve_tp.engine.batch import compact
from serve_tp.engine.sampling import Sampler
from serve_tp.messages import SamplingParams

EOS = 0
FEATURES = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=1.0, top_p=0.95),
    SamplingParams(temperature=0.7, top_p=0.8),
    SamplingParams(temperature=0.8, top_k=20),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=1.1, top_k=10, top_p=0.8, min_p=0.02),
    SamplingParams(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.3),
    SamplingParams(temperature=0, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, logprobs=3),
    SamplingParams(temperature=0, logprobs=0),
    SamplingParams(temperature=0.9, top_p=0.9, logit_bias=((5, 3.0), (7, -2.0)), min_tokens=3, stop_token_ids=(9,)),
]


def make(slots: int, vocab: int, device, **kwargs) -> Sampler:
    return Sampler(slots, vocab, device, eos_token_id=EOS, max_logprobs=20, context_length=128, **kwargs)


def run_script(sampler: Sampler, *, vocab: int, dtype=torch.float32, phases: int = 14, steps_per_phase: int = 3,
               seed: int = 0, seed_offset: int = 0) -> list:
    """Per step: (row names, tokens, per row None or (chosen logprob, ((id, logprob), ...))).

    `seed_offset` shifts every row's sampling seed (a control: the record must then change).
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    device = sampler.state.device
    rows: list[str] = []
    record, serial = [], 0
    for phase in range(phases):
        leaving = [r for r in rows if rng.random() < 0.4]
        rows, moves = compact(rows, leaving)
        for source, target in moves:
            sampler.move(source, target)
        # sizes sweep small and large batches, and some repeat, so plans recur
        size = int(rng.choice([1, 1, 2, 3, 5, 8, sampler.slots]))
        while len(rows) < size:
            params = FEATURES[int(rng.integers(len(FEATURES)))] if phase % 3 else FEATURES[phase % len(FEATURES)]
            prompt = rng.integers(1, vocab, size=int(rng.integers(1, 12))).tolist()
            sampler.admit(len(rows), params, seed=1000 + serial + seed_offset, prompt_ids=prompt)
            rows.append(f"s{serial}")
            serial += 1
        for _ in range(steps_per_phase):
            logits = (torch.randn(len(rows), vocab, generator=gen) * 3).to(device=device, dtype=dtype)
            result = sampler.sample(logits)
            entries = result.token_logprobs()
            record.append((list(rows), result.tokens.tolist(), [None if e is None else (e.logprob, e.top) for e in entries]))
    return record
