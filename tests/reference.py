"""The one unsharded Hugging Face reference every correctness test compares against.

Exact maths is approximated by float64 (eager attention, no KV cache, no padding, one
sequence at a time). The control for every tolerance is what rounding alone does to one
unsharded process: Hugging Face's own float32 forward against that float64 one
(`rounding_control`). A path we own (the engine, TP over gloo) passes when its float32
error against float64 is of the same size as Hugging Face's float32 error.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import torch

# Our float32 error may be this many times the control's (HF float32 vs float64) on the
# same sequences: summation orders differ (all-reduce of partial sums, our attention
# kernels), so errors of the same size, not the same bits, are what equivalence means.
BOUND_FACTOR = 4.0


@lru_cache(maxsize=8)
def hf_model(model_dir: str, dtype: str = "float64", attn: str = "eager"):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation=attn)
    return model.to(getattr(torch, dtype)).eval()


@lru_cache(maxsize=4)
def tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@torch.inference_mode()
def logits_along(model_dir: str, ids: Sequence[int], dtype: str = "float64", attn: str = "eager") -> torch.Tensor:
    """Next-token logits [len(ids), V] after every prefix of `ids`: one forward, no cache."""
    model = hf_model(model_dir, dtype, attn)
    return model(torch.tensor([list(ids)])).logits[0].double()


def greedy(model_dir: str, prompt_ids: Sequence[int], n: int, stop_at_eos: bool = False) -> list[int]:
    """Greedy tokens of one sequence: argmax of a full float64 forward per step."""
    eos = hf_model(model_dir).config.eos_token_id
    seq = list(prompt_ids)
    for _ in range(n):
        seq.append(int(logits_along(model_dir, seq)[-1].argmax()))
        if stop_at_eos and seq[-1] == eos:
            break
    return seq[len(prompt_ids):]


def greedy_text(model_dir: str, prompt: str, n: int) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of a greedy completion that stops at EOS, as the API answers."""
    tok = tokenizer(model_dir)
    new = greedy(model_dir, tok.encode(prompt), n, stop_at_eos=True)
    finish = "stop" if new and new[-1] == tok.eos_token_id else "length"
    return tok.decode(new, skip_special_tokens=True), finish, len(new)


def rounding_control(model_dir: str, sequences: Sequence[Sequence[int]]) -> dict:
    """What rounding alone does to one unsharded process, on these sequences (every position).

    `fp32_vs_fp64`: max |HF float32 (SDPA) - float64| logit, the bound's unit.
    `eager_vs_sdpa`: max |HF float32 eager - HF float32 SDPA|, two correct kernels.
    """
    fp32, kernels = 0.0, 0.0
    for ids in sequences:
        exact = logits_along(model_dir, ids)
        sdpa = logits_along(model_dir, ids, "float32", "sdpa")
        fp32 = max(fp32, float((sdpa - exact).abs().max()))
        kernels = max(kernels, float((logits_along(model_dir, ids, "float32", "eager") - sdpa).abs().max()))
    return {"fp32_vs_fp64": fp32, "eager_vs_sdpa": kernels}


@dataclass
class GreedyCheck:
    max_error: float  # max |our logits - float64| over every generated step
    near_ties: int  # steps where float64's top two were within the bound (either pick is right)


def check_greedy_run(model_dir: str, prompt: Sequence[int], tokens: Sequence[int],
                     logits: Optional[torch.Tensor], bound: float) -> GreedyCheck:
    """Our greedy run of `prompt` against float64, step by step, teacher-forced on our tokens.

    `logits[i]` are our logits that chose `tokens[i]`. Each must be within `bound` of
    float64's at that position, and each token float64's argmax, unless float64's top two
    are within `bound` there (a tie rounding may break either way). When no step is such a
    tie, this is the statement "our greedy tokens equal the exact model's".
    """
    exact = logits_along(model_dir, list(prompt) + list(tokens)[:-1])[len(prompt) - 1:]
    assert exact.shape[0] == len(tokens)
    max_error = 0.0
    if logits is not None:
        ours = torch.as_tensor(logits).double()
        max_error = float((ours - exact).abs().max())
        assert max_error <= bound, f"logits off by {max_error:.3g} > bound {bound:.3g}"
    near_ties = 0
    for step, (token, row) in enumerate(zip(tokens, exact)):
        best = float(row.max())
        if int(row.argmax()) == token:
            continue
        assert best - float(row[token]) <= bound, (
            f"step {step}: chose {token} (logit {float(row[token]):.4f}), exact argmax {int(row.argmax())} "
            f"({best:.4f}): not a tie within {bound:.3g}"
        )
        near_ties += 1
    return GreedyCheck(max_error, near_ties)
