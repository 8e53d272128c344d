"""The Triton decode-attention kernel against the path it replaces (index_put + SDPA).

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, numpy),
set here before the kernel module is imported (triton.jit decides then); with one, the
same checks run the compiled kernel on CUDA. Skipped where triton is not installed
(`scripts/setup.sh --dev` installs it beside a CPU build of torch, so CI runs these).

What must hold: the cache the kernel leaves equals the index_put's bit for bit (every slot
and position, not just the written ones); the attention output is as close to the exact
(float64) result as SDPA's is, within a small multiple of what rounding alone does (the
control: SDPA and SDPA's math backend against float64); in fp16/bf16 the kernel, which
accumulates in fp32 and rounds once, lies within half an ulp of the exact result.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.triton_kernels import kernel_device, use_interpreter_without_gpu

# no GPU: the kernel on CPU tensors, in numpy. Set before triton is first imported: its own
# library functions (tl.max...) are made interpreted or compiled when it is.
use_interpreter_without_gpu()

import serve_tp.model.decode_attention as kernel_module  # noqa: E402
from serve_tp.model.forward import sdpa_decode_attention, sdpa_decode_mask  # noqa: E402

DEVICE = kernel_device()
SCALE = 0.125  # 1 / sqrt(64)
MAX_LEN, SPAN = 256, 200  # a span that is no multiple of the kernel's block of positions


def _case(dtype, heads, positions, head_dim=64, slots=6, seed=0):
    """A cache full of random values (positions after a row's own must be ignored, not zero)
    with more slots than rows (the others must be left alone), and this step's Q|K|V."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn((slots, 2, heads, MAX_LEN, head_dim), generator=gen).to(dtype).to(DEVICE)
    qkv = torch.randn((len(positions), 3, heads, head_dim), generator=gen).to(dtype).to(DEVICE)
    return qkv, kv, torch.tensor(positions, device=DEVICE)


def _sdpa(qkv, kv, positions, dtype, math=False):
    """The decode step's "sdpa" path (forward.py) on copies in `dtype`: (output, cache)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cache = kv.clone().to(dtype)
    rows, mask = sdpa_decode_mask(positions, SPAN, dtype)
    with sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext():
        return sdpa_decode_attention(qkv.to(dtype), cache, rows, positions, mask, SPAN, SCALE), cache


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


ROWS = {
    "b1-first": [0],
    "b1-middle": [77],
    "b1-last": [SPAN - 1],
    "b4-block-edges": [0, 63, 64, SPAN - 1],  # the kernel's blocks are 64 positions
}


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("rows", list(ROWS.values()), ids=list(ROWS))
def test_fp32_kernel_matches_sdpa_within_rounding(rows, heads):
    qkv, kv, positions = _case(torch.float32, heads, rows)
    cache = kv.clone()
    out = kernel_module.decode_attention(qkv, cache, positions, SPAN, SCALE)
    reference, reference_cache = _sdpa(qkv, kv, positions, torch.float32)
    math, _ = _sdpa(qkv, kv, positions, torch.float32, math=True)
    exact, _ = _sdpa(qkv, kv, positions, torch.float64, math=True)
    assert out.shape == (len(rows), heads * 64) and out.dtype == torch.float32
    assert torch.equal(cache, reference_cache)
    assert not torch.equal(cache, kv)  # control: the step did write something
    control = max(_err(reference, math), _err(reference, exact), _err(math, exact))
    assert control < 1e-5, control
    if rows == [0]:
        # the output is V itself: the kernel's softmax over one position must give it exactly
        # (CPU's SDPA does too; CUDA's need not: its exp and division are approximate there)
        assert _err(out, exact) == 0, _err(out, exact)
    else:
        assert control > 0  # the control shows what rounding does, so the bounds below mean something
    assert _err(out, exact) <= 4 * control, (_err(out, exact), control)
    assert _err(out, reference) <= 4 * control, (_err(out, reference), control)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("rows", [ROWS["b1-last"], ROWS["b4-block-edges"]], ids=["b1-last", "b4-block-edges"])
def test_half_kernel_rounds_the_exact_result_once(rows, dtype):
    """fp32 accumulation, one rounding: within half an ulp of float64 (plus fp32's own error),
    what rounding the exact result alone allows; SDPA in `dtype` (printed) shows what it costs
    torch's own kernel."""
    qkv, kv, positions = _case(dtype, 4, rows)
    cache = kv.clone()
    out = kernel_module.decode_attention(qkv, cache, positions, SPAN, SCALE)
    reference, reference_cache = _sdpa(qkv, kv, positions, dtype)
    exact, _ = _sdpa(qkv, kv, positions, torch.float64, math=True)
    assert out.dtype == dtype and torch.equal(cache, reference_cache)
    binade = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(torch.finfo(dtype).tiny))))
    # the interpreter casts float32 to bfloat16 by truncation (numpy has no bfloat16), a GPU to nearest
    ulps = 1.0 if dtype == torch.bfloat16 and kernel_module.interpreting() else 0.5
    excess = ((out.double() - exact).abs() - ulps * torch.finfo(dtype).eps * binade - 1e-6).max().item()
    print(f"\n{dtype}: kernel vs float64 {_err(out, exact):.2e}, SDPA in {dtype} vs float64 {_err(reference, exact):.2e}")
    assert excess <= 0, excess


def test_head_dim_that_is_no_power_of_two():
    """GPT-2's shapes all have D=64; others pad D to a power of two inside the kernel (masked)."""
    qkv, kv, positions = _case(torch.float32, 3, [0, 100, SPAN - 1], head_dim=80)
    cache = kv.clone()
    out = kernel_module.decode_attention(qkv, cache, positions, SPAN, SCALE)
    reference, reference_cache = _sdpa(qkv, kv, positions, torch.float32)
    exact, _ = _sdpa(qkv, kv, positions, torch.float64, math=True)
    assert out.shape == (3, 3 * 80) and torch.equal(cache, reference_cache)
    assert _err(out, exact) <= 4 * _err(reference, exact), (_err(out, exact), _err(reference, exact))


def test_rows_share_no_state():
    """A row's output depends on its own slot and position only: the same row alone and
    beside others at other positions gives the same values bit for bit."""
    qkv, kv, positions = _case(torch.float32, 2, [150, 3, 64])
    together = kernel_module.decode_attention(qkv, kv.clone(), positions, SPAN, SCALE)
    alone = kernel_module.decode_attention(qkv[:1], kv.clone(), positions[:1], SPAN, SCALE)
    assert torch.equal(together[:1], alone)
    assert not torch.equal(together[1], together[0])  # control: rows do differ


def test_padding_rows_store_their_kv_and_read_nothing():
    """A CUDA graph's padding row (decode_runner.padded_inputs: the cache's last position, past
    the span) stores its K/V like the index_put does and skips attention: its output is its V."""
    from serve_tp.engine.decode_runner import padded_inputs

    _, pad_position = padded_inputs([7], [150], 2, MAX_LEN)[1]
    qkv, kv, positions = _case(torch.float32, 2, [150, pad_position])
    cache = kv.clone()
    out = kernel_module.decode_attention(qkv, cache, positions, SPAN, SCALE)
    reference, reference_cache = _sdpa(qkv, kv, positions, torch.float32)
    assert torch.equal(cache, reference_cache)
    assert torch.equal(out[1], qkv[1, 2].reshape(-1))
    assert _err(out[0], reference[0]) < 1e-5  # the real row beside it is unaffected


def test_shape_mismatch_is_refused():
    qkv, kv, positions = _case(torch.float32, 2, [5])
    with pytest.raises(ValueError, match="does not hold"):
        kernel_module.decode_attention(qkv, kv[:, :, :1], positions, SPAN, SCALE)
    with pytest.raises(ValueError, match="does not hold"):
        kernel_module.decode_attention(qkv.half(), kv, positions, SPAN, SCALE)


def _greedy(forward, prompts, steps):
    """Greedy decode through SequenceBatch (eager steps): every step's logits and the cache."""
    from serve_tp.engine.batch import SequenceBatch

    batch = SequenceBatch(forward, len(prompts), 128, cuda_graphs=False)
    logits, _ = batch.admit([str(i) for i in range(len(prompts))], prompts)
    every, tokens = [], logits.argmax(-1).tolist()
    for _ in range(steps):
        logits = batch.decode(tokens)
        every.append(logits)
        tokens = logits.argmax(-1).tolist()
    return torch.stack(every), batch.cache.kv


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile_decode"])
def test_gpt2_decode_with_the_kernel_gives_sdpa_logits(tiny_model_dir, compiled):
    """The whole decode step (trained tiny model, fp32) with decode_attention="triton" against
    "sdpa", also between compile_decode's pieces (attention stays outside them); control: the
    "sdpa" step in float64, what fp32 rounding alone moves the logits by. One prompt is long
    enough that its rows cross the kernel's 64-position blocks."""
    from serve_tp.model.forward import GPT2Forward
    from serve_tp.model.loader import load_shard

    shard = load_shard(tiny_model_dir, "float32", DEVICE, 0, 1)
    prompts = [[1, 2, 3], [(7 * i) % 90 + 5 for i in range(62)], [40, 41]]
    forward = GPT2Forward(shard, decode_attention="triton", compile_decode=compiled)
    assert (forward.compiled is not None) == compiled
    kernel, kernel_cache = _greedy(forward, prompts, 6)
    sdpa, sdpa_cache = _greedy(GPT2Forward(shard), prompts, 6)
    exact, exact_cache = _greedy(GPT2Forward(shard.double()), prompts, 6)
    control = _err(sdpa, exact)
    assert 0 < control < 1e-3, control
    assert torch.equal(kernel.argmax(-1), sdpa.argmax(-1))
    assert _err(kernel, exact) <= 4 * control, (_err(kernel, exact), control)
    assert _err(kernel_cache, exact_cache) <= 4 * max(_err(sdpa_cache, exact_cache), 1e-7)
