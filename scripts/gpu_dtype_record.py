"""How close TP comes to one process in fp32, fp16 and bf16, next to what rounding alone does.

    python scripts/gpu_dtype_record.py --models /tmp/gpt2-small-shape,/tmp/gpt2-medium-shape \\
        --device cuda --json $R/dtype_record.json --md $R/dtype_record.md

For each model and dtype, one batch of long and short prompts from the held-out corpus
(crossing every attention-span bucket, the longest ending near the context) is decoded
greedily by the TP engine (TP=2: NCCL on GPUs, CUDA graphs) and by the same engine on one
process (TP=1). The control is what rounding alone does in that dtype in one process:
Hugging Face's eager attention against its sdpa attention, both with HF's own KV cache.
Both comparisons report the same things: sequences whose tokens are all equal, the first
step where each pair diverges, the largest logit difference over the steps both still
share (identical inputs), and the reference's top-2 logit gap where they diverge (a
near-tie when small).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_tp.model.pretrain import split_corpus  # noqa: E402
from serve_tp.model.tiny_model import corpus_ids  # noqa: E402
from tests.tp_ranks import Script, run_tp_script  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")


def long_and_short_prompts(model_dir: str, new_tokens: int, lengths: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Held-out text cut to lengths that cross every span bucket; the longest ends `new_tokens`
    before the context does."""
    from transformers import AutoConfig, AutoTokenizer

    context = AutoConfig.from_pretrained(model_dir).n_positions
    _, text = split_corpus(corpus_ids(AutoTokenizer.from_pretrained(model_dir)))
    if lengths is None:
        longest = context - new_tokens
        lengths = [longest, longest * 2 // 3, longest // 4, 40, 9]
    prompts, start = [], 0
    for length in lengths:
        prompts.append([int(t) for t in text[start: start + length]])
        start += length
    if any(len(p) != n for p, n in zip(prompts, lengths)):
        raise ValueError(f"the held-out corpus ({len(text)} tokens) is too short for prompts of {list(lengths)}")
    return prompts


def engine_run(model_dir, world_size, prompts, new_tokens, device, dtype):
    """Rank 0's tokens and the float32 logits that chose each, per prompt."""
    got = run_tp_script(model_dir, world_size, Script.together(prompts, new_tokens), device, dtype, cuda_graphs=True)
    out, info = got[0]
    seqs = [out[str(i)] for i in range(len(prompts))]
    for rank in range(1, world_size):  # every rank fed the same tokens
        assert [got[rank][0][str(i)].tokens for i in range(len(prompts))] == [s.tokens for s in seqs]
    return [s.tokens for s in seqs], [np.stack(s.logits) for s in seqs], info


@torch.inference_mode()
def hf_run(model_dir, prompts, new_tokens, device, dtype, attn):
    """Hugging Face generate (its KV cache), greedy: tokens and the logits of each step."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation=attn, torch_dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    tokens, logits = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        tokens.append(out.sequences[0, len(prompt):].tolist())
        logits.append(torch.stack([s[0] for s in out.logits]).float().cpu().numpy())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return tokens, logits


def compare(tokens_a, logits_a, tokens_b, logits_b) -> dict:
    """Pairs of greedy runs over the same prompts, `a` the reference."""
    equal, divergences, gaps, max_diff = 0, [], [], 0.0
    for ta, la, tb, lb in zip(tokens_a, logits_a, tokens_b, logits_b):
        first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        equal += first is None
        divergences.append(first)
        shared = len(ta) if first is None else first + 1  # step `first` still had identical inputs
        max_diff = max(max_diff, float(np.abs(la[:shared].astype(np.float64) - lb[:shared]).max()))
        if first is None:
            gaps.append(None)
        else:
            top2 = np.sort(la[first])[-2:]
            gaps.append(round(float(top2[1] - top2[0]), 4))
    return {"equal": equal, "of": len(tokens_a), "first_divergence": divergences,
            "max_logit_diff_shared": float(f"{max_diff:.3g}"), "reference_top2_gap_at_divergence": gaps}


def record(model_dir, dtypes, new_tokens, device, world_size, lengths=None) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    prompts = long_and_short_prompts(model_dir, new_tokens, lengths)
    rows = []
    for dtype in dtypes:
        started = time.monotonic()
        tp_tokens, tp_logits, info = engine_run(model_dir, world_size, prompts, new_tokens, device, dtype)
        one_tokens, one_logits, _ = engine_run(model_dir, 1, prompts, new_tokens, device, dtype)
        sdpa_tokens, sdpa_logits = hf_run(model_dir, prompts, new_tokens, device, dtype, "sdpa")
        eager_tokens, eager_logits = hf_run(model_dir, prompts, new_tokens, device, dtype, "eager")
        rows.append({
            "dtype": dtype,
            "tp_vs_one_process": compare(one_tokens, one_logits, tp_tokens, tp_logits),
            "control_eager_vs_sdpa": compare(sdpa_tokens, sdpa_logits, eager_tokens, eager_logits),
            "one_process_vs_hf_sdpa": compare(sdpa_tokens, sdpa_logits, one_tokens, one_logits),
            "all_reduce": info.get("all_reduce"), "seconds": round(time.monotonic() - started, 1),
        })
        print(f"{Path(model_dir).name} {dtype}: {json.dumps(rows[-1])}", flush=True)
    return {"model": str(model_dir), "layers": config.n_layer, "heads": config.n_head, "embd": config.n_embd,
            "n_positions": config.n_positions, "tp": world_size, "new_tokens": new_tokens,
            "prompt_lengths": [len(p) for p in prompts], "rows": rows}


def markdown(result: dict) -> str:
    def cell(c):
        divs = ",".join("=" if d is None else str(d) for d in c["first_divergence"])
        gaps = [g for g in c["reference_top2_gap_at_divergence"] if g is not None]
        return (f"{c['equal']}/{c['of']} | {divs} | {c['max_logit_diff_shared']:.3g} | "
                f"{min(gaps) if gaps else '–'}")

    lines = [f"**{Path(result['model']).name}** ({result['layers']} layers, {result['heads']} heads, "
             f"{result['embd']} wide), prompts {result['prompt_lengths']} tokens, {result['new_tokens']} greedy "
             f"tokens each, TP={result['tp']} vs one process (same engine), control HF eager vs sdpa:", "",
             "| dtype | TP vs 1: equal | first divergence per prompt | max logit diff (shared steps) | smallest top-2 gap at a divergence "
             "| control: equal | first divergence | max logit diff | smallest top-2 gap |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['dtype']} | {cell(row['tp_vs_one_process'])} | {cell(row['control_eager_vs_sdpa'])} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="comma-separated model directories")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    a = p.parse_args()
    device_name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    results = [record(m, a.dtypes.split(","), a.new_tokens, a.device, a.tp) for m in a.models.split(",")]
    header = (f"# TP vs one process by dtype ({datetime.datetime.now().isoformat(timespec='seconds')}, "
              f"{device_name}, torch {torch.__version__})\n\n")
    text = header + "\n".join(markdown(r) for r in results)
    print(text)
    if a.md:
        Path(a.md).write_text(text)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                            "results": results}, indent=1))


if __name__ == "__main__":
    main()
