"""GPU proof: TP=2 over NCCL gives the tokens of one unsharded process, engine and HTTP.

    python scripts/gpu_check.py --model DIR [--steps 32]

1. one unsharded process on cuda:0, greedy by full forward passes (no KV cache);
2. the TP engine on 2 GPUs (NCCL, ranks started by rank_setup.setup_rank as served, our forward
   over the static KV cache), the prompts decoded together as one batch, in fp32 and
   fp16, decode steps replayed as CUDA graphs and launched eagerly; where a prompt departs
   from the reference, the reference's top-2 logit gap at that step (a near-tie or not);
3. the real Serve app (TP=2, device=cuda) over HTTP, in fp32 and fp16;
4. a control: fp16 unsharded with its KV cache (HF generate) against fp16 without cache,
   to show how far fp16 rounding alone moves greedy tokens on this model.
Prints a table; exits non-zero if fp32 TP=2 tokens differ from the unsharded ones.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PROMPTS = ["Hello, my name is", "The capital of France is", "Tensor parallelism splits every layer",
           "Once upon a time", "café naïve 🙂", "A serving system receives requests from many clients"]


def unsharded_greedy(model_dir, dtype, prompts, steps):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=getattr(torch, dtype)).cuda().eval()
    out, gaps = [], []
    with torch.inference_mode():
        for ids in prompts:
            seq, gap = list(ids), []
            for _ in range(steps):
                logits = model(torch.tensor([seq], device="cuda")).logits[0, -1].float()
                top2 = logits.topk(2).values
                gap.append(float(top2[0] - top2[1]))  # how close greedy was to a tie
                seq.append(int(logits.argmax()))
            out.append(seq[len(ids):])
            gaps.append(gap)
    del model
    torch.cuda.empty_cache()
    return out, gaps


def first_divergence(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from tests.tp_ranks import run_tp

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    print(f"GPUs: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
    rows, ok = [], True
    refs = {}
    gaps = {}
    for dtype, graphs in (("float32", True), ("float32", False), ("float16", True), ("float16", False)):
        if dtype not in refs:
            refs[dtype], gaps[dtype] = unsharded_greedy(args.model, dtype, prompts, args.steps)
        t = time.monotonic()
        got = run_tp(args.model, 2, prompts, args.steps, device="cuda", dtype=dtype, cuda_graphs=graphs)
        tp_tokens = got[0][0]
        same = sum(a == b for a, b in zip(tp_tokens, refs[dtype]))
        ranks_agree = got[1][0] == tp_tokens
        divs = [first_divergence(a, b) for a, b in zip(tp_tokens, refs[dtype])]
        # At a divergence, the reference's own top-2 logit gap: a near-tie that rounding can flip?
        tie_gaps = [None if d is None else round(gaps[dtype][i][d], 4) for i, d in enumerate(divs)]
        mode = "CUDA graphs" if graphs else "eager"
        rows.append(f"| engine TP=2 NCCL, {mode} | {dtype} | {same}/{len(prompts)} | {divs} | {ranks_agree} "
                    f"| {time.monotonic()-t:.1f}s | {tie_gaps} |")
        print(rows[-1], flush=True)
        if dtype == "float32" and same != len(prompts):
            ok = False
    for dtype in refs:
        all_gaps = sorted(g for gap in gaps[dtype] for g in gap)
        print(f"reference {dtype}: top-2 logit gap over all steps: min {all_gaps[0]:.4f}, "
              f"median {all_gaps[len(all_gaps) // 2]:.4f}", flush=True)

    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(args.model, torch_dtype=torch.float16).cuda().eval()
    cached = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=args.steps, min_new_tokens=args.steps,
                             do_sample=False, pad_token_id=0, attention_mask=torch.ones(1, len(ids), device="cuda"))
        cached.append(out[0, len(ids):].tolist())
    del model
    torch.cuda.empty_cache()
    same = sum(a == b for a, b in zip(cached, refs["float16"]))
    divs = [first_divergence(a, b) for a, b in zip(cached, refs["float16"])]
    rows.append(f"| control: unsharded HF generate (KV cache) | float16 | {same}/{len(prompts)} | {divs} | - | - | - |")
    print(rows[-1], flush=True)

    import httpx
    import ray
    from ray import serve

    from serve_tp.api.app import build_app

    ray.init(num_gpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    for dtype in ("float32", "float16"):
        t = time.monotonic()
        serve.run(build_app({"model": args.model, "tensor_parallel_size": 2, "device": "cuda", "dtype": dtype}),
                  name="serve_tp", route_prefix="/")
        startup = time.monotonic() - t
        health = httpx.get("http://127.0.0.1:8000/health", timeout=30).json()
        texts = []
        for p in PROMPTS:
            r = httpx.post("http://127.0.0.1:8000/v1/completions", timeout=120, json={
                "prompt": p, "max_tokens": args.steps, "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            texts.append(r.json()["choices"][0]["text"])
        ref_texts = [tokenizer.decode(r, skip_special_tokens=True) for r in refs[dtype]]
        same = sum(a == b for a, b in zip(texts, ref_texts))
        rows.append(f"| HTTP serve_tp TP=2 (NCCL, 2 rank actors) | {dtype} | {same}/{len(prompts)} (text) | - | - "
                    f"| startup {startup:.1f}s | - |")
        print(rows[-1], flush=True)
        print("ranks:", [(r["rank"], r["device"], r["cuda_visible_devices"], r["backend"], r.get("cuda_graphs"), r.get("kv_cache_mib"), r.get("load_s")) for r in health["ranks"]])
        if dtype == "float32" and same != len(prompts):
            ok = False
        serve.delete("serve_tp")
    import subprocess

    print(subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.used", "--format=csv"],
                         capture_output=True, text=True).stdout)
    print("| path | dtype | greedy tokens equal to unsharded | first divergence per prompt | ranks agree | time "
          "| reference top-2 gap at divergence |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    serve.shutdown()
    ray.shutdown()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
