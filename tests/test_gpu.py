"""GPU proof (`pytest -m gpu`, 2 CUDA GPUs): TP=2 over NCCL gives one unsharded process's tokens.

Skipped without 2 GPUs (CI runs on CPU). On the device machine:

    SERVE_TP_GPU_MODEL=/tmp/gpt2-small-shape python -m pytest -m gpu tests/test_gpu.py -s

Asserted: async scheduling hands out the synchronous loop's outputs over NCCL and graphs;
rank 0's sampler replaying its chain as CUDA graphs gives the eager sampler's
tokens and logprobs bit for bit (one GPU); in fp32, the TP engine's greedy tokens (our forward over the static KV cache,
NCCL all-reduces) equal one unsharded process's (full forward passes, no cache), with
decode steps replayed as CUDA graphs and launched eagerly alike; the real Serve app over
HTTP answers the same text; on one GPU, decode_attention="triton" (one Triton kernel for the
cache write + attention) gives "sdpa"'s greedy tokens and its logits within fp32 rounding,
eager and in CUDA graphs. fp16 and bf16 are recorded, not asserted exact: rounding
moves near-ties, and the printed control (one unsharded process with HF's KV cache
against the same without) shows how far rounding alone moves greedy tokens there.
`SERVE_TP_GPU_MODEL` picks the model (default: the tiny test model).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.tp_ranks import run_tp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pytest -m gpu on the device machine)"),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

PROMPTS = ["Hello, my name is", "The capital of France is", "Tensor parallelism splits every layer",
           "Once upon a time", "café naïve 🙂", "A serving system receives requests from many clients"]
STEPS = 32


@pytest.fixture(scope="module")
def gpu_model(tiny_model_dir) -> str:
    return os.environ.get("SERVE_TP_GPU_MODEL") or tiny_model_dir


@pytest.fixture(scope="module")
def prompts(gpu_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpu_model)
    return [tokenizer.encode(p) for p in PROMPTS]


def unsharded_greedy(model_dir, dtype, prompts, steps, kv_cache=False):
    """One process on cuda:0: greedy tokens, and the top-2 logit gap at each step (a near-tie?).

    Without the cache every step is a full forward pass over the whole sequence: the
    reference shares no code with the engine's cached decode.
    """
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=getattr(torch, dtype)).cuda().eval()
    tokens, gaps = [], []
    with torch.inference_mode():
        for ids in prompts:
            if kv_cache:
                out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=steps, min_new_tokens=steps,
                                     do_sample=False, pad_token_id=0,
                                     attention_mask=torch.ones(1, len(ids), device="cuda"))
                tokens.append(out[0, len(ids):].tolist())
                continue
            seq, gap = list(ids), []
            for _ in range(steps):
                logits = model(torch.tensor([seq], device="cuda")).logits[0, -1].float()
                top2 = logits.topk(2).values
                gap.append(float(top2[0] - top2[1]))
                seq.append(int(logits.argmax()))
            tokens.append(seq[len(ids):])
            gaps.append(gap)
    del model
    torch.cuda.empty_cache()
    return tokens, gaps


def first_divergence(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@pytest.fixture(scope="module")
def fp32_reference(gpu_model, prompts):
    return unsharded_greedy(gpu_model, "float32", prompts, STEPS)[0]


@pytest.fixture(scope="module")
def fp32_graphs(gpu_model, prompts):
    return run_tp(gpu_model, 2, prompts, STEPS, device="cuda", dtype="float32", cuda_graphs=True)


@two_gpus
def test_fp32_tp2_nccl_matches_one_process(fp32_reference, fp32_graphs):
    tokens = fp32_graphs[0][0]
    divergences = [first_divergence(a, b) for a, b in zip(tokens, fp32_reference)]
    assert tokens == fp32_reference, f"first divergence per prompt: {divergences}"
    assert fp32_graphs[1][0] == tokens  # both ranks decoded the same sequences


@two_gpus
def test_fp32_cuda_graphs_equal_eager(gpu_model, prompts, fp32_graphs):
    eager = run_tp(gpu_model, 2, prompts, STEPS, device="cuda", dtype="float32", cuda_graphs=False)
    assert eager[0][0] == fp32_graphs[0][0]
    assert eager[1][0] == eager[0][0]


@two_gpus
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_recorded_with_its_control(gpu_model, prompts, dtype):
    """Printed, not asserted exact: TP vs one process, and one process cached vs uncached."""
    reference, gaps = unsharded_greedy(gpu_model, dtype, prompts, STEPS)
    cached, _ = unsharded_greedy(gpu_model, dtype, prompts, STEPS, kv_cache=True)
    got = run_tp(gpu_model, 2, prompts, STEPS, device="cuda", dtype=dtype, cuda_graphs=True)
    tokens = got[0][0]
    divs = [first_divergence(a, b) for a, b in zip(tokens, reference)]
    tie_gaps = [None if d is None else round(gaps[i][d], 4) for i, d in enumerate(divs)]
    control = [first_divergence(a, b) for a, b in zip(cached, reference)]
    same = sum(a == b for a, b in zip(tokens, reference))
    same_control = sum(a == b for a, b in zip(cached, reference))
    print(f"\n| {dtype} | TP=2 NCCL CUDA graphs vs one process: {same}/{len(prompts)} equal, first divergence "
          f"{divs}, reference top-2 gap there {tie_gaps} | control, one process HF KV cache vs no cache: "
          f"{same_control}/{len(prompts)} equal, first divergence {control} |")
    assert got[1][0] == tokens  # NCCL gives every rank the same sums: the ranks never disagree
    assert all(len(t) == STEPS for t in tokens)


@two_gpus
@pytest.mark.parametrize("gpu_all_reduce", ["nccl", "p2p"])
def test_http_app_fp32_matches_one_process(ray_cluster, gpu_model, prompts, fp32_reference, gpu_all_reduce):
    """The real Serve app (TP=2 rank actors on 2 GPUs: each sees only its own over NCCL, both
    over p2p) over HTTP: the same greedy text, with the decode sums over NCCL or our p2p kernel."""
    import httpx
    from ray import serve
    from transformers import AutoTokenizer

    from tests.conftest import deploy

    tokenizer = AutoTokenizer.from_pretrained(gpu_model)
    base = deploy("serve_tp_gpu", "/gpu", model=gpu_model, tensor_parallel_size=2, device="cuda", dtype="float32",
                  gpu_all_reduce=gpu_all_reduce)
    try:
        health = httpx.get(f"{base}/health", timeout=30).json()
        print("\nranks:", [(r.get("rank"), r.get("device"), r.get("backend"), r.get("cuda_graphs"),
                            r.get("decode_all_reduce")) for r in health["ranks"]])
        assert all(r["decode_all_reduce"].startswith(gpu_all_reduce) for r in health["ranks"]), health["ranks"]
        texts = []
        for p in PROMPTS:
            r = httpx.post(f"{base}/v1/completions", timeout=120, json={
                "prompt": p, "max_tokens": STEPS, "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            texts.append(r.json()["choices"][0]["text"])
    finally:
        serve.delete("serve_tp_gpu")
    assert texts == [tokenizer.decode(t, skip_special_tokens=True) for t in fp32_reference]


def _tokens_and_info(gpu_model, prompts, dtype, **settings):
    from tests.tp_ranks import Script, run_tp_script

    got = run_tp_script(gpu_model, 2, Script.together(prompts, STEPS), "cuda", dtype, True, **settings)
    out, info = got[0]
    seqs = [out[str(i)] for i in range(len(prompts))]
    other = [got[1][0][str(i)].tokens for i in range(len(prompts))]
    import numpy as np

    every_step = torch.from_numpy(np.stack([np.stack(s.logits) for s in seqs]))  # prefill, then decode steps
    return [s.tokens for s in seqs], every_step, other, info


@two_gpus
@pytest.mark.parametrize("kind", ["symm_mem", "p2p"])
def test_fp32_peer_memory_all_reduce_matches_one_process(gpu_model, prompts, fp32_reference, kind):
    """The decode step's all-reduce over peer memory in CUDA graphs: torch's one-shot, or our
    p2p kernel (residual fused): one process's tokens."""
    tokens, _, other, info = _tokens_and_info(gpu_model, prompts, "float32", gpu_all_reduce=kind)
    assert info["decode_all_reduce"].startswith(kind), info
    assert tokens == fp32_reference, [first_divergence(a, b) for a, b in zip(tokens, fp32_reference)]
    assert other == tokens


@two_gpus
@pytest.mark.parametrize("kind", ["symm_mem", "p2p"])
def test_fp16_peer_memory_all_reduce_is_bitwise_nccl(gpu_model, prompts, kind):
    """fp16 summed in float32 and rounded once (symm_mem stages it into a float32 buffer, p2p
    sums in registers and adds the residual, rounding as the eager add does) is NCCL's
    correctly rounded two-rank sum: the same tokens and, first, the same logits bit for bit
    (control: NCCL against itself)."""
    nccl_tokens, nccl_logits, _, nccl_info = _tokens_and_info(gpu_model, prompts, "float16", gpu_all_reduce="nccl")
    again_tokens, again_logits, _, _ = _tokens_and_info(gpu_model, prompts, "float16", gpu_all_reduce="nccl")
    tokens, logits, other, info = _tokens_and_info(gpu_model, prompts, "float16", gpu_all_reduce=kind)
    assert nccl_info["decode_all_reduce"].startswith("nccl") and info["decode_all_reduce"].startswith(kind)
    assert torch.equal(again_logits, nccl_logits), "control: NCCL is not deterministic run to run here"
    assert torch.equal(logits, nccl_logits)
    assert tokens == nccl_tokens and other == tokens


@two_gpus
def test_compiled_decode_fp32_matches_one_process_over_p2p(gpu_model, prompts, fp32_reference):
    """torch.compile'd decode pieces captured in our CUDA graphs, over the p2p all-reduce (auto)."""
    tokens, _, other, info = _tokens_and_info(gpu_model, prompts, "float32", gpu_all_reduce="auto",
                                              compile_decode=True)
    assert info["compiled_decode"] is True and info["decode_all_reduce"].startswith("p2p"), info
    assert tokens == fp32_reference, [first_divergence(a, b) for a, b in zip(tokens, fp32_reference)]
    assert other == tokens


@two_gpus
def test_fused_decode_fp32_matches_one_process_over_p2p(gpu_model, prompts, fp32_reference):
    """fused_decode (serve_tp/model/fused_linear.py) at TP=2 in CUDA graphs: each row-parallel
    GEMM sums its tiles over the ranks through the p2p buffers in its own kernel."""
    tokens, _, other, info = _tokens_and_info(gpu_model, prompts, "float32", gpu_all_reduce="p2p",
                                              fused_decode=True)
    assert info["fused_decode"] is True and info["decode_all_reduce"].startswith("p2p"), info
    assert tokens == fp32_reference, [first_divergence(a, b) for a, b in zip(tokens, fp32_reference)]
    assert other == tokens


@two_gpus
def test_fp16_fused_decode_sums_in_the_gemm_as_nccl_sums_after_it(gpu_model, prompts):
    """The fused GEMM's sum over the ranks (float32 in rank order, rounded once, then the
    residual) is NCCL's correctly rounded two-rank sum followed by the eager residual add:
    fused_decode over p2p gives the logits of fused_decode over NCCL bit for bit (the same
    GEMM kernel makes each partial). Control: NCCL against itself."""
    nccl_tokens, nccl_logits, _, nccl_info = _tokens_and_info(gpu_model, prompts, "float16", gpu_all_reduce="nccl",
                                                              fused_decode=True)
    _, again_logits, _, _ = _tokens_and_info(gpu_model, prompts, "float16", gpu_all_reduce="nccl", fused_decode=True)
    tokens, logits, other, info = _tokens_and_info(gpu_model, prompts, "float16", gpu_all_reduce="p2p",
                                                   fused_decode=True)
    assert nccl_info["fused_decode"] and info["fused_decode"] and info["decode_all_reduce"].startswith("p2p")
    assert torch.equal(again_logits, nccl_logits), "control: NCCL is not deterministic run to run here"
    assert torch.equal(logits, nccl_logits)
    assert tokens == nccl_tokens and other == tokens


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_sampler_graph_replays_equal_the_eager_sampler_bit_for_bit(dtype):
    """Every feature set, batch sizes 1..32, slot moves between steps, GPT-2's vocabulary.

    The eager side reads the penalties' history only up to its longest row; the graphs
    read all of it at a fixed shape: the comparison covers that too.
    """
    from tests.sampler_script import make, run_script

    vocab, script = 50257, dict(phases=24, steps_per_phase=4)
    eager = run_script(make(32, vocab, "cuda"), vocab=vocab, dtype=dtype, **script)
    sampler = make(32, vocab, "cuda", graphs=True)
    graphed = run_script(sampler, vocab=vocab, dtype=dtype, **script)
    graphs = sampler.graphs
    print(f"\nsampler graphs ({dtype}): {graphs.count} captured in {graphs.capture_s:.2f}s, {graphs.refused} "
          f"refused, {graphs.replays} of {len(graphed)} steps replayed")
    first = next((i for i, (a, b) in enumerate(zip(graphed, eager)) if a != b), None)
    assert first is None, f"step {first} of {len(eager)} differs: graphs {graphed[first]} eager {eager[first]}"
    assert graphs.refused == 0 and graphs.replays >= len(graphed) // 3
    # control: the record follows the seeds, so an equal record is not an empty check
    assert run_script(make(32, vocab, "cuda"), vocab=vocab, dtype=dtype, seed_offset=1, **script) != eager


@two_gpus
def test_async_scheduling_gives_the_synchronous_outputs_on_cuda(gpu_model):
    """The CPU test's mixed workload (tests/test_async_scheduling.py) over NCCL with decode
    and sampler graphs: rank 0 decodes from the device buffer, the follower from the NCCL
    broadcast, the tokens come back through pinned copies; the outputs are the synchronous
    loop's. (Async scheduling with the eager sampler is tested on CPU only.)"""
    from tests import reference
    from tests.test_async_scheduling import assert_same_outputs, mixed_jobs
    from tests.tp_ranks import run_tp_engine

    jobs, _ = mixed_jobs(gpu_model)
    jobs = [job for job in jobs if job.seq_id != "eos"]  # the ranks' EOS is the model's own
    settings = dict(device="cuda", dtype="float32", max_batch_size=4, max_prefill_tokens=7,
                    sampler_graphs=True)
    sync = run_tp_engine(gpu_model, 2, jobs, **settings)
    ahead = run_tp_engine(gpu_model, 2, jobs, async_scheduling=True, **settings)
    greedy = next(job for job in jobs if job.seq_id == "greedy")
    control = reference.rounding_control(gpu_model, [greedy.prompt + tuple(sync[0][0]["greedy"].tokens)])
    lead, follower = ahead[0][1], ahead[1][1]
    print(f"\nasync scheduling (sampler graphs): {lead['overlapped_steps']} of "
          f"{lead['sampled_steps']} steps read after the next launch; rounding control {control}")
    assert_same_outputs(ahead[0][0], sync[0][0], 2 * control["fp32_vs_fp64"])
    assert follower["shared"] == lead["shared"] > 0
    assert lead["overlapped_steps"] == lead["sampled_steps"] > 0


def _decode_record(forward, prompts, steps, cuda_graphs):
    """Greedy steps through SequenceBatch (graphs captured as rank_setup does), a row evicted
    halfway (a slot move and a smaller bucket): every step's logits, on the host."""
    from serve_tp.engine.batch import SequenceBatch

    batch = SequenceBatch(forward, len(prompts), min(256, forward.shard.config.n_positions), cuda_graphs=cuda_graphs)
    batch.capture()
    logits, _ = batch.admit([str(i) for i in range(len(prompts))], prompts)
    record, next_token = [], dict(zip(batch.seq_ids, logits.argmax(-1).tolist()))
    for step in range(steps):
        if step == steps // 2:
            batch.evict(["0"])
        logits = batch.decode([next_token[sid] for sid in batch.seq_ids])
        record.append(logits.float().cpu())
        next_token = dict(zip(batch.seq_ids, logits.argmax(-1).tolist()))
    return record


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_triton_decode_attention_fp32_matches_sdpa(gpu_model, cuda_graphs):
    """decode_attention="triton" against "sdpa" on one GPU, fp32, eager and replayed as CUDA
    graphs: the same greedy tokens, logits within a small multiple of the control (the "sdpa"
    step in float64: what fp32 rounding alone moves them by). Rows reach past 128 positions,
    so they cross the kernel's 64-position blocks, at different lengths in one batch."""
    tokens, sdpa_tokens, err, control = _against_float64(gpu_model, cuda_graphs, decode_attention="triton")
    print(f"\ntriton vs float64 {err:.2e}, sdpa vs float64 (control) {control:.2e}")
    assert tokens == sdpa_tokens
    assert err <= 4 * control, (err, control)


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_fused_decode_fp32_within_rounding_of_the_eager_step(gpu_model, cuda_graphs):
    """fused_decode on one GPU, fp32 (IEEE: no TF32), against float64: within a small multiple
    of the eager step's own error (the control), the same greedy tokens; rows cross the
    attention kernel's 64-position blocks at different lengths in one batch."""
    tokens, eager_tokens, err, control = _against_float64(gpu_model, cuda_graphs, fused_decode=True)
    print(f"\nfused vs float64 {err:.2e}, eager vs float64 (control) {control:.2e}")
    assert tokens == eager_tokens
    assert err <= 4 * control, (err, control)


def _against_float64(gpu_model, cuda_graphs, **settings):
    """A GPT2Forward with `settings` and the default one, fp32 on one GPU, each against the
    default step in float64: (its greedy tokens, the default's, its error, the default's error:
    the control, what fp32 rounding alone moves the logits by). Rows reach past 128 positions,
    at different lengths in one batch."""
    from serve_tp.model.forward import GPT2Forward
    from serve_tp.model.loader import load_shard

    shard = load_shard(gpu_model, "float32", torch.device("cuda", 0), 0, 1)
    prompts = [[5 + (i * 7) % 40 for i in range(n)] for n in (3, 70, 120, 1)]
    tried = _decode_record(GPT2Forward(shard, **settings), prompts, 40, cuda_graphs)
    default = _decode_record(GPT2Forward(shard), prompts, 40, cuda_graphs)
    exact = _decode_record(GPT2Forward(shard.double()), prompts, 40, False)  # .double() last: it is in place

    def err(record):
        return max((r.double() - e.double()).abs().max().item() for r, e in zip(record, exact))

    def tokens(record):
        return [r.argmax(-1).tolist() for r in record]

    return tokens(tried), tokens(default), err(tried), err(default)
