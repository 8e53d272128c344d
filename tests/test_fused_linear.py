"""The fused decode kernels (serve_tp/model/fused_linear.py, `fused_decode`) against the eager step.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before
triton is first imported, as tests/test_decode_attention.py does); with one, on CUDA. Skipped
where triton is not installed (`scripts/setup.sh --dev` installs it beside a CPU torch).

Each check has a control: the eager path (F.layer_norm, addmm, F.gelu) in the same dtype
against float64 is what rounding alone does; the kernels must be within a small multiple of
it. The sum over ranks through peer buffers is tests/test_p2p_all_reduce.py's (fused case),
and on GPUs tests/test_gpu.py's.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.triton_kernels import kernel_device, use_interpreter_without_gpu

use_interpreter_without_gpu()  # before the kernels' module imports triton

from serve_tp.model import fused_linear  # noqa: E402

DEVICE = kernel_device()


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _operands(rows, k, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen) * 3 + 1  # a mean and spread for the norm to remove
    norm = SimpleNamespace(weight=1 + 0.2 * torch.randn(k, generator=gen), bias=0.2 * torch.randn(k, generator=gen),
                           eps=1e-5)  # what ln_linear reads of a LayerNorm
    weight = torch.randn(k, n, generator=gen) / k ** 0.5
    bias = 0.5 * torch.randn(n, generator=gen)
    return x, norm, weight, bias


def _cast(norm, **to):
    return SimpleNamespace(weight=norm.weight.to(**to), bias=norm.bias.to(**to), eps=norm.eps)


def _eager_ln_linear(x, norm, weight, bias, gelu):
    out = torch.addmm(bias, F.layer_norm(x, (x.shape[1],), norm.weight, norm.bias, norm.eps), weight)
    return out if gelu == "none" else F.gelu(out, approximate="tanh" if gelu == "tanh" else "none")


# unsplit: one program per column tile of the block_cols rule, all of K (the first kernels);
# split: K in chunks of 32 (here 3-9 chunks, the last one short where K is no multiple of 32),
# summed by each tile's last program
LAUNCHES = {"unsplit": dict(PROGRAMS=0), "split": dict(BLOCK_K=32, BLOCK_N=64)}


def _launch_settings(monkeypatch, name):
    for setting, value in LAUNCHES[name].items():
        monkeypatch.setattr(fused_linear, setting, value)


@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass-stats", "one-pass-stats"])
@pytest.mark.parametrize("gelu", ["none", "tanh", "erf"])
@pytest.mark.parametrize("rows,k,n", [(1, 130, 200), (5, 96, 40), (20, 257, 17)],
                         ids=["1-row", "5-rows", "20-rows"])
@pytest.mark.parametrize("launch", LAUNCHES)
def test_ln_linear_is_eager_within_rounding(rows, k, n, gelu, one_pass, launch, monkeypatch):
    """Widths that are no multiple of the kernel's blocks (K of 32-256, N of 16-64), tiles of
    16 and 32 rows, every epilogue, both ways of the norm's statistics, K whole or split. fp32
    multiplies in IEEE fp32 (TF32 would round each input to 10 bits)."""
    monkeypatch.setattr(fused_linear, "ONE_PASS_STATS", one_pass)
    _launch_settings(monkeypatch, launch)
    assert (fused_linear.plan(k, n).splits > 1) == (launch == "split")
    x, norm, weight, bias = _operands(rows, k, n, torch.float32)
    exact = _eager_ln_linear(x.double(), _cast(norm, dtype=torch.float64), weight.double(), bias.double(), gelu)
    control = _err(_eager_ln_linear(x, norm, weight, bias, gelu), exact)
    device = [t.to(DEVICE) for t in (x, weight, bias)]
    got = fused_linear.ln_linear(device[0], _cast(norm, device=DEVICE), device[1], device[2], gelu).cpu()
    assert got.shape == (rows, n)
    assert _err(got, exact) <= 4 * control + 1e-6, (_err(got, exact), control)


def test_split_launches_repeat_bitwise_and_leave_their_counts_at_zero(monkeypatch):
    """Each tile's last program sums the chunks in chunk order and resets the tile's count:
    a second launch (of another kernel too) starts from zero and gives the same bits."""
    _launch_settings(monkeypatch, "split")
    x, norm, weight, bias = _operands(3, 200, 130, torch.float32, seed=3)
    x, weight, bias = (t.to(DEVICE) for t in (x, weight, bias))
    norm = _cast(norm, device=DEVICE)
    first = fused_linear.ln_linear(x, norm, weight, bias, "tanh")
    summed = fused_linear.linear_sum(first, weight.t().contiguous(), None, x)
    assert torch.equal(first, fused_linear.ln_linear(x, norm, weight, bias, "tanh"))
    assert torch.equal(summed, fused_linear.linear_sum(first, weight.t().contiguous(), None, x))
    _, counts = fused_linear.workspace(x.device)
    assert int(counts.abs().sum()) == 0


@pytest.mark.parametrize("programs,block_k", [(132, 256), (264, 128), (0, 256), (7, 16)])
def test_the_plan_covers_k_in_whole_blocks_and_fills_the_programs_it_may(programs, block_k, monkeypatch):
    monkeypatch.setattr(fused_linear, "PROGRAMS", programs)
    monkeypatch.setattr(fused_linear, "BLOCK_K", block_k)
    for k in (16, 100, 768, 1280, 2560, 5120, 6400):
        for n in (17, 768, 1280, 1920, 3840, 6400):
            block_n, tiles, splits, chunk = fused_linear.plan(k, n)
            assert tiles == -(-n // block_n) and block_n in (16, 32, 64)
            assert chunk % block_k == 0 and (splits - 1) * chunk < k <= splits * chunk  # no empty chunk
            assert tiles * splits <= max(tiles, programs)
            if programs:  # at least half the programs it aims at, where K has the blocks for them
                assert 2 * tiles * splits >= min(programs, tiles * -(-k // block_k)), (k, n, tiles, splits)
            else:
                assert splits == 1


def test_launch_options_fit_the_pipeline_in_shared_memory():
    """fp32's 32 x 64 tiles buffer twice fp16's bytes a stage: fewer stages, so the launch fits."""
    assert fused_linear.launch_options(torch.float16, 32, 64)["num_stages"] == fused_linear.NUM_STAGES
    fp32 = fused_linear.launch_options(torch.float32, 32, 64)["num_stages"]
    assert 1 <= fp32 < fused_linear.NUM_STAGES
    assert (fp32 - 1) * fused_linear.BLOCK_K * (32 + 64) * 4 <= fused_linear.STAGED_BYTES


@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("with_bias,with_residual", [(True, True), (False, True), (True, False), (False, False)])
def test_linear_sum_on_one_rank_is_the_gemm_bias_and_residual(with_bias, with_residual, launch, monkeypatch):
    _launch_settings(monkeypatch, launch)
    x, _, weight, bias = _operands(7, 300, 130, torch.float32, seed=1)
    residual = torch.randn(7, 130)
    exact = x.double() @ weight.double()
    if with_bias:
        exact = exact + bias.double()
    if with_residual:
        exact = exact + residual.double()
    control = _err(residual * with_residual + torch.addmm(bias * with_bias, x, weight), exact)
    got = fused_linear.linear_sum(x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE) if with_bias else None,
                                  residual.to(DEVICE) if with_residual else None).cpu()
    assert _err(got, exact) <= 4 * control + 1e-6, (_err(got, exact), control)


def test_fp16_rounds_where_the_eager_step_rounds():
    """In fp16 the normalised rows, the GEMM + bias and the GELU each round to fp16 as the
    eager step's do: the kernel's error is of the eager fp16 step's size (its control)."""
    x, norm, weight, bias = _operands(3, 192, 64, torch.float32, seed=2)
    exact = _eager_ln_linear(x.double(), _cast(norm, dtype=torch.float64), weight.double(), bias.double(), "tanh")
    half = [t.half() for t in (x, weight, bias)]
    norm_half = _cast(norm, dtype=torch.float16)
    got = fused_linear.ln_linear(half[0].to(DEVICE), _cast(norm_half, device=DEVICE), half[1].to(DEVICE),
                                 half[2].to(DEVICE), "tanh").cpu()
    # the control: the same fp16 inputs through fp32 maths, rounded once to fp16
    reference = _eager_ln_linear(*(t.float() for t in half[:1]), _cast(norm_half, dtype=torch.float32),
                                 half[1].float(), half[2].float(), "tanh").half()
    assert got.dtype == torch.float16
    assert _err(got, exact) <= 3 * _err(reference, exact) + 2e-3, (_err(got, exact), _err(reference, exact))


def test_more_rows_than_a_tile_are_refused():
    x, norm, weight, bias = _operands(fused_linear.MAX_ROWS + 1, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="at most"):
        fused_linear.ln_linear(x.to(DEVICE), _cast(norm, device=DEVICE), weight.to(DEVICE), bias.to(DEVICE))


def _greedy(forward, steps=6):
    from serve_tp.engine.batch import SequenceBatch

    batch = SequenceBatch(forward, 4, 64, cuda_graphs=False)
    logits, _ = batch.admit(["a", "b", "c", "d"], [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [13]])
    tokens, every = [logits.argmax(-1).tolist()], []
    for _ in range(steps):
        logits = batch.decode(tokens[-1])
        every.append(logits)
        tokens.append(logits.argmax(-1).tolist())
    batch.evict(["a", "c"])  # a slot move and a smaller batch
    logits = batch.decode([tokens[-1][1], tokens[-1][3]])
    return tokens + [logits.argmax(-1).tolist()], torch.cat(every + [logits])


def test_fused_decode_gives_the_eager_steps_tokens(tiny_model_dir):
    """A trained tiny GPT-2, fp32, through SequenceBatch: the fused step's tokens are the eager
    step's, its logits within a small multiple of what fp32 rounding moves the eager step's
    (control: eager against float64)."""
    from serve_tp.model.forward import GPT2Forward
    from serve_tp.model.loader import load_shard

    shard = load_shard(tiny_model_dir, "float32", DEVICE, 0, 1)
    fused_forward = GPT2Forward(shard, fused_decode=True)
    assert fused_forward.fused is not None and fused_forward.decode_attention == "triton"
    tokens, fused = _greedy(fused_forward)
    eager_tokens, eager = _greedy(GPT2Forward(shard))
    exact_tokens, exact = _greedy(GPT2Forward(shard.double()))
    control = _err(eager, exact)
    assert tokens == eager_tokens == exact_tokens
    assert _err(fused, exact) <= 10 * control + 1e-6, (_err(fused, exact), control)
