"""A decode layer's GEMMs as Triton kernels with their neighbours fused in (`fused_decode`).

Replayed as a CUDA graph, a decode step of up to 32 rows is bound by how many kernels it
runs, not by the bytes they read: a compiled GPT-2 layer still launches 9 kernels at TP=1 and
10 at TP=2, at ~4 µs each on H200 (docs/gpu.md, "Kernels per decode step"). cuBLAS takes no
layer norm in its prologue and no all-reduce in its epilogue, so these kernels do both:

- `ln_linear`: layer norm in the GEMM's prologue (each program normalises the rows it
  multiplies: the rows are few, the width at most a few thousand), bias and GELU in its
  epilogue. A layer's Q|K|V and its c_fc are one launch each.
- `linear_sum`: the row-parallel GEMM, rank 0's bias, the sum over the ranks and the
  residual add in one launch. With a peer exchange (the p2p all-reduce's symmetric buffers,
  serve_tp/engine/p2p_all_reduce.py), each column tile's last program writes the tile of
  this rank's partial into its buffer, raises a flag in each peer's signal pad, waits for
  theirs, and sums the same tile of every rank's partial in rank order: the all-reduce of
  one tile overlaps the GEMM of the others, and no separate all-reduce kernel runs.

With Triton's attention kernel (decode_attention.py) a layer is five launches at any TP.

Numerics mirror the eager step's roundings: the normalised rows are rounded to the model's
dtype before the GEMM (F.layer_norm's output), the GEMM accumulates in float32 and rounds
once after its bias (addmm), GELU runs on that rounded value, and the sum over the ranks
is the p2p kernel's (float32 in rank order, rounded once), the residual added after it.
What differs is the order of the float32 additions inside the GEMM and the norm; fp32
models multiply in IEEE fp32 (no TF32). tests/test_fused_linear.py holds them to the
eager path within what rounding alone does.

Split-K (`plan`): where a GEMM's column tiles are too few to occupy the GPU (N 1280 at 64
columns is 20 tiles for 132 SMs), K is cut into chunks, one program each; every program
stores its float32 partial tile in a workspace and counts itself in, and the tile's last
program sums the chunks in chunk order (the result does not depend on which came last) and
runs the epilogue, the exchange included.

The flag protocol (raise 0 -> 1 in the peer's pad, take 1 -> 0 in one's own; column tile t
meets column tile t) and the two alternating buffer slots are p2p_all_reduce.py's; its
docstring says why they are safe. The plan depends only on K and N, so it is the same on
every rank.

Measured on one H200 (docs/gpu.md, "Fused decode layers", split-K): a step runs 40-49%
fewer kernels than the compiled step with Triton attention (gpt2-large 328 -> 187), and
split-K made the narrow GEMMs faster than cuBLAS (gpt2-large's TP=1 MLP projection 8.0 µs
against 10.2; unsplit 12.9) and the fused TP=1 step 13-21% shorter than unsplit on -medium,
-large and -xl (gpt2: within ±4%). Each kernel still costs ~4-5 µs beyond its bytes, so the
TP=1 step is within -8..+11% of the compiled one on those shapes (gpt2: -4..+27%) and
fused_decode stays off; the TP=2 step with split-K is not measured (no two-GPU machine in
that session).
"""

from __future__ import annotations

import sys
from typing import NamedTuple, Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: fused_decode is refused there (config.py)
    triton = tl = None

MAX_ROWS = 32  # steps of more rows take the unfused path: the tile holds every row
# Launch settings, module-level so scripts/fused_linear_bench.py can sweep them; BLOCK_K,
# NUM_WARPS, NUM_STAGES and ONE_PASS_STATS won its first sweep on H200 (gpt2-large's pieces,
# one row, weights from DRAM: docs/results/h200x2/fused/call3/). BLOCK_K 128 with a two-pass
# norm, the first guess, took about twice as long.
BLOCK_K = 256
NUM_WARPS = 4
NUM_STAGES = 4
ONE_PASS_STATS = True  # the layer norm's statistics from one read of the rows (_row_stats)
# Split-K: a launch aims at PROGRAMS programs (H100/H200 have 132 SMs) by cutting K into
# chunks of whole BLOCK_Ks when its column tiles alone are too few (`plan`); 0 never splits.
# BLOCK_N: columns a tile, or None for plan's rule.
PROGRAMS = 132
BLOCK_N: Optional[int] = None
STAGED_BYTES = 160 * 1024  # shared memory for the pipeline's buffered tiles (H100/H200 have 227 KB a block)
WORKSPACE_TILES = 1024  # split partials held per device: tiles x splits, BLOCK_M x BLOCK_N each
GELU = {"none": 0, "tanh": 1, "erf": 2}


def block_rows(rows: int) -> int:
    """The tile's rows: tl.dot needs 16 or more."""
    return 16 if rows <= 16 else 32


def block_cols(width: int) -> int:
    """Output columns per program without split-K: enough programs to cover H100/H200's 132
    SMs where the width allows (16 columns is tl.dot's least)."""
    for cols in (64, 32):
        if -(-width // cols) >= 96:
            return cols
    return 16


class Plan(NamedTuple):
    """How one launch covers x [rows, K] @ W [K, N]: `tiles` column tiles of `block_n`, each
    cut into `splits` chunks of `chunk` rows of W (a whole number of BLOCK_Ks); program p
    takes tile p % tiles, chunk p // tiles. Depends on K and N only, so it is the same on
    every rank of a group."""
    block_n: int
    tiles: int
    splits: int
    chunk: int


def plan(k: int, n: int) -> Plan:
    """64-column tiles; where they are fewer than half of PROGRAMS, 32-column tiles if those
    come to three quarters of it, else K cut into as many chunks as bring the grid up to
    PROGRAMS. Why, from the second sweep (docs/results/h200/splitk/, gpt2-large's pieces):
    a narrow, deep GEMM (the MLP's projection, N 1280: 20 tiles) keeps 20 of 132 SMs reading
    its weights, and cut into 5 chunks takes 8.0 µs against cuBLAS's 10.2 and unsplit 12.8;
    but where narrower tiles alone fill the GPU (TP=1's Q|K|V, N 3840: 120 tiles of 32)
    they beat a split (7.8 against 8.8 µs), which pays its fix-up and, in ln_linear, reads
    the norm's rows once per chunk. PROGRAMS 0: the first kernels' rule, K whole."""
    if BLOCK_N:
        block_n = BLOCK_N
    elif not PROGRAMS:
        block_n = block_cols(n)
    else:
        block_n = 32 if -(-n // 64) < PROGRAMS // 2 and -(-n // 32) >= 3 * PROGRAMS // 4 else 64
    tiles = -(-n // block_n)
    splits = max(1, min(PROGRAMS // tiles, -(-k // BLOCK_K)))
    chunk = -(-(-(-k // splits)) // BLOCK_K) * BLOCK_K
    return Plan(block_n, tiles, -(-k // chunk), chunk)


def launch_options(dtype: torch.dtype, block_m: int, block_n: int) -> dict:
    """Warps and pipeline stages: NUM_STAGES, fewer where the buffered x and W tiles would
    outgrow STAGED_BYTES (fp32's do: a 32 x 64 tile with BLOCK_K 256 buffers 96 KB a stage,
    and Triton refuses a launch past the GPU's 227 KB)."""
    stage = BLOCK_K * (block_m + block_n) * torch.tensor([], dtype=dtype).element_size()
    return dict(num_warps=NUM_WARPS, num_stages=max(1, min(NUM_STAGES, 1 + STAGED_BYTES // stage)))


def resident_programs(device: torch.device) -> int:
    """Programs sure to run at once: one a SM on a GPU (each takes at most one SM's
    resources), where nothing else runs beside the step and every rank of a group has the
    same GPU (a TP group's ranks share one node's kind); the interpreter runs them one by
    one, in order, and needs no bound."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return sys.maxsize


_workspaces: dict = {}


def workspace(device: torch.device):
    """This device's (float32 partials, int32 arrival counts) for split-K launches, made at
    its first call. The counts are zero between launches (each tile's last program resets
    its own); one stream runs the launches one after another, so one set serves them all.
    A CUDA graph replays the addresses it captured, so the first call must come before any
    capture: GPT2Forward makes it at start-up."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one workspace
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _workspaces:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fused_linear.workspace must be made before a CUDA graph capture")
        _workspaces[device] = (torch.empty(WORKSPACE_TILES * MAX_ROWS * 64, dtype=torch.float32, device=device),
                               torch.zeros(WORKSPACE_TILES, dtype=torch.int32, device=device))
    return _workspaces[device]


def precision(dtype: torch.dtype) -> str:
    """fp32 models multiply in IEEE fp32: TF32 would round each input to 10 bits."""
    return "ieee" if dtype == torch.float32 else "tf32"


if triton is not None:

    @triton.jit
    def raise_flag(flag_ptr, SEM: tl.constexpr):
        """Set a peer's flag 0 -> 1 (with SEM "release": after this program's earlier stores);
        spin while the peer has not yet reset the previous call's flag."""
        old = tl.atomic_cas(flag_ptr, 0, 1, sem=SEM, scope="sys")
        while old != 0:
            old = tl.atomic_cas(flag_ptr, 0, 1, sem=SEM, scope="sys")

    @triton.jit
    def take_flag(flag_ptr, SEM: tl.constexpr):
        """Wait for a peer's flag in this rank's pad and reset it 1 -> 0 (with SEM "acquire":
        before this program's later loads)."""
        old = tl.atomic_cas(flag_ptr, 1, 0, sem=SEM, scope="sys")
        while old != 1:
            old = tl.atomic_cas(flag_ptr, 1, 0, sem=SEM, scope="sys")

    @triton.jit
    def _row_stats(x_ptr, x_stride, rows, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   ONE_PASS: tl.constexpr):
        """Each row's mean and 1/sqrt(variance + eps) over its K values in fp32: two passes
        (mean, then the centred squares), or ONE_PASS (sums of x and x^2 from one read: half
        the loads before the GEMM starts, a variance that cancels where |mean| >> spread)."""
        m = tl.arange(0, BLOCK_M)
        row_ok = m < rows
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        squares = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (k < K)[None, :]
            x = tl.load(x_ptr + m[:, None] * x_stride + k[None, :], mask=ok, other=0.0).to(tl.float32)
            total += tl.sum(x, axis=1)
            if ONE_PASS:
                squares += tl.sum(x * x, axis=1)
        mean = total / K
        if ONE_PASS:
            variance = tl.maximum(squares / K - mean * mean, 0.0)
        else:
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                ok = row_ok[:, None] & (k < K)[None, :]
                x = tl.load(x_ptr + m[:, None] * x_stride + k[None, :], mask=ok, other=0.0).to(tl.float32)
                centred = tl.where(ok, x - mean[:, None], 0.0)
                squares += tl.sum(centred * centred, axis=1)
            variance = squares / K
        return mean, 1.0 / tl.sqrt(variance + eps)

    @triton.jit
    def _gemm_tile(x_ptr, x_stride, rows, k_begin, k_end, w_ptr, w_stride_k, w_stride_n, N, n0, mean, rstd,
                   ln_w_ptr, ln_b_ptr, NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """[BLOCK_M, BLOCK_N] float32: rows of x (layer-normed when NORM, rounded to the weight's
        dtype as F.layer_norm's output is) times columns n0.. of W [K, N], over k_begin..k_end."""
        m = tl.arange(0, BLOCK_M)
        n = n0 + tl.arange(0, BLOCK_N)
        row_ok = m < rows
        n_ok = n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < k_end
            x = tl.load(x_ptr + m[:, None] * x_stride + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM:
                gain = tl.load(ln_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                shift = tl.load(ln_b_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                x = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * gain[None, :] + shift[None, :]
                x = x.to(w_ptr.dtype.element_ty)
            w = tl.load(w_ptr + k[:, None] * w_stride_k + n[None, :] * w_stride_n,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _partial_tile(partials_ptr, tile, split, tiles, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Where chunk `split` of column tile `tile` keeps its [BLOCK_M, BLOCK_N] float32
        partial in the workspace: the one layout _arrive writes and _gather reads."""
        tile_offsets = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        return partials_ptr + (split * tiles + tile) * (BLOCK_M * BLOCK_N) + tile_offsets

    @triton.jit
    def _arrive(acc, partials_ptr, counts_ptr, tile, split, tiles, splits, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
        """Store this chunk's partial tile and count it in: True for the tile's last program,
        which alone goes on to the epilogue. Release (after every thread's stores, the
        barrier) and acquire (before the last program's loads) are the count's, at GPU scope."""
        tl.store(_partial_tile(partials_ptr, tile, split, tiles, BLOCK_M, BLOCK_N), acc)
        tl.debug_barrier()
        arrived = tl.atomic_add(counts_ptr + tile, 1, sem="acq_rel", scope="gpu")
        return arrived == splits - 1

    @triton.jit
    def _gather(partials_ptr, counts_ptr, tile, tiles, splits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The tile's sum over its chunks, in chunk order whichever program came last (so the
        result does not depend on timing), and its count back to zero for the next launch."""
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for split in range(0, splits):
            total += tl.load(_partial_tile(partials_ptr, tile, split, tiles, BLOCK_M, BLOCK_N), cache_modifier=".cg")
        tl.store(counts_ptr + tile, 0)
        return total

    @triton.jit
    def _gelu(x, KIND: tl.constexpr):
        """GPT-2's GELU in float32: tanh's approximation (gelu_new) or erf's (gelu)."""
        if KIND == 1:
            inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi); a global must be constexpr
            tanh = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)  # tanh, overflow-safe: exp -> inf gives 1
            return 0.5 * x * (1.0 + tanh)
        else:
            return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    @triton.jit
    def _ln_linear_epilogue(acc, bias_ptr, out_ptr, rows, N, n0, GELU_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        m = tl.arange(0, BLOCK_M)
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < N
        element = out_ptr.dtype.element_ty
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        result = acc.to(element)  # addmm's rounding
        if GELU_KIND != 0:
            result = _gelu(result.to(tl.float32), GELU_KIND).to(element)
        tl.store(out_ptr + m[:, None] * N + n[None, :], result, mask=(m < rows)[:, None] & n_ok[None, :])

    @triton.jit
    def ln_linear_kernel(x_ptr, x_stride, rows, K, eps, ln_w_ptr, ln_b_ptr, w_ptr, w_stride_k, w_stride_n, bias_ptr,
                         out_ptr, N, tiles, splits, chunk, partials_ptr, counts_ptr, GELU_KIND: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PRECISION: tl.constexpr, ONE_PASS: tl.constexpr, SPLIT: tl.constexpr):
        program = tl.program_id(0)
        tile, split = program % tiles, program // tiles
        n0 = tile * BLOCK_N
        k_begin = split * chunk
        # the norm's statistics over the whole row, whichever chunk of K this program multiplies
        mean, rstd = _row_stats(x_ptr, x_stride, rows, K, eps, BLOCK_M, BLOCK_K, ONE_PASS)
        acc = _gemm_tile(x_ptr, x_stride, rows, k_begin, tl.minimum(K, k_begin + chunk), w_ptr, w_stride_k,
                         w_stride_n, N, n0, mean, rstd, ln_w_ptr, ln_b_ptr, True, BLOCK_M, BLOCK_N, BLOCK_K,
                         PRECISION)
        if SPLIT:
            if _arrive(acc, partials_ptr, counts_ptr, tile, split, tiles, splits, BLOCK_M, BLOCK_N):
                acc = _gather(partials_ptr, counts_ptr, tile, tiles, splits, BLOCK_M, BLOCK_N)
                _ln_linear_epilogue(acc, bias_ptr, out_ptr, rows, N, n0, GELU_KIND, BLOCK_M, BLOCK_N)
        else:
            _ln_linear_epilogue(acc, bias_ptr, out_ptr, rows, N, n0, GELU_KIND, BLOCK_M, BLOCK_N)

    @triton.jit
    def _linear_sum_epilogue(acc, bias_ptr, residual_ptr, out_ptr, rows, N, n0, tile, buffer_ptrs, pad_ptrs,
                             slot_offset, RANK: tl.constexpr, WORLD: tl.constexpr, HAS_BIAS: tl.constexpr,
                             HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        m = tl.arange(0, BLOCK_M)
        n = n0 + tl.arange(0, BLOCK_N)
        ok = (m < rows)[:, None] & (n < N)[None, :]
        offsets = m[:, None] * N + n[None, :]
        element = out_ptr.dtype.element_ty
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        part = acc.to(element)  # this rank's partial, rounded as its GEMM's output would be
        if WORLD > 1:
            mine = tl.load(buffer_ptrs + RANK).to(tl.pointer_type(element)) + slot_offset
            tl.store(mine + offsets, part, mask=ok)
            tl.debug_barrier()  # every thread's stores precede the flag's release
            own_pad = tl.load(pad_ptrs + RANK).to(tl.pointer_type(tl.int32))
            for peer in tl.static_range(WORLD):
                if peer != RANK:
                    pad = tl.load(pad_ptrs + peer).to(tl.pointer_type(tl.int32))
                    raise_flag(pad + tile * WORLD + RANK, "release")
            for peer in tl.static_range(WORLD):
                if peer != RANK:
                    take_flag(own_pad + tile * WORLD + peer, "acquire")
            tl.debug_barrier()  # every thread's loads follow the flags
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for source in tl.static_range(WORLD):
                if source == RANK:
                    total += part.to(tl.float32)
                else:
                    theirs = tl.load(buffer_ptrs + source).to(tl.pointer_type(element)) + slot_offset
                    total += tl.load(theirs + offsets, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            part = total.to(element)
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            part = (residual + part.to(tl.float32)).to(element)
        tl.store(out_ptr + offsets, part, mask=ok)

    @triton.jit
    def linear_sum_kernel(x_ptr, x_stride, rows, K, w_ptr, w_stride_k, w_stride_n, bias_ptr, residual_ptr, out_ptr, N,
                          tiles, splits, chunk, partials_ptr, counts_ptr, buffer_ptrs, pad_ptrs, slot_offset,
                          RANK: tl.constexpr, WORLD: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr):
        """The tile's last program (the only one without SPLIT) does the epilogue, exchange
        included: the flags are the tile's, so tile t meets tile t on every rank."""
        program = tl.program_id(0)
        tile, split = program % tiles, program // tiles
        n0 = tile * BLOCK_N
        k_begin = split * chunk
        acc = _gemm_tile(x_ptr, x_stride, rows, k_begin, tl.minimum(K, k_begin + chunk), w_ptr, w_stride_k,
                         w_stride_n, N, n0, None, None, None, None, False, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        if SPLIT:
            if _arrive(acc, partials_ptr, counts_ptr, tile, split, tiles, splits, BLOCK_M, BLOCK_N):
                acc = _gather(partials_ptr, counts_ptr, tile, tiles, splits, BLOCK_M, BLOCK_N)
                _linear_sum_epilogue(acc, bias_ptr, residual_ptr, out_ptr, rows, N, n0, tile, buffer_ptrs, pad_ptrs,
                                     slot_offset, RANK, WORLD, HAS_BIAS, HAS_RESIDUAL, BLOCK_M, BLOCK_N)
        else:
            _linear_sum_epilogue(acc, bias_ptr, residual_ptr, out_ptr, rows, N, n0, tile, buffer_ptrs, pad_ptrs,
                                 slot_offset, RANK, WORLD, HAS_BIAS, HAS_RESIDUAL, BLOCK_M, BLOCK_N)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    rows, width = x.shape
    if rows > MAX_ROWS:
        raise ValueError(f"fused linear takes at most {MAX_ROWS} rows, got {rows}")
    if weight.shape[0] != width or x.stride(1) != 1 or x.dtype != weight.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} does not multiply weight {tuple(weight.shape)} {weight.dtype}")


def _launch(x: torch.Tensor, weight: torch.Tensor) -> dict:
    """The grid and the arguments every launch shares: the plan's, and the split workspace."""
    _check(x, weight)
    rows, k = x.shape
    block_m, launch_plan = block_rows(rows), plan(k, weight.shape[1])
    partials, counts = workspace(x.device)
    if launch_plan.splits > 1 and (launch_plan.tiles > counts.numel() or launch_plan.tiles * launch_plan.splits
                                   * block_m * launch_plan.block_n > partials.numel()):
        raise ValueError(f"{launch_plan} of {rows} rows outgrows the split workspace "
                         f"({WORKSPACE_TILES} counts, {partials.numel()} partial values)")
    return dict(grid=(launch_plan.tiles * launch_plan.splits,), args=(launch_plan.tiles, launch_plan.splits,
                launch_plan.chunk, partials, counts), constants=dict(
                    BLOCK_M=block_m, BLOCK_N=launch_plan.block_n, BLOCK_K=BLOCK_K, PRECISION=precision(x.dtype),
                    SPLIT=launch_plan.splits > 1, **launch_options(x.dtype, block_m, launch_plan.block_n)))


def ln_linear(x: torch.Tensor, norm: torch.nn.LayerNorm, weight: torch.Tensor, bias: torch.Tensor,
              gelu: str = "none") -> torch.Tensor:
    """GELU?(layer_norm(x) @ weight + bias) in one launch: x [rows, K] (rows <= MAX_ROWS),
    weight [K, N] (Conv1D's layout), bias [N]. Returns [rows, N] in x's dtype."""
    launch = _launch(x, weight)
    rows, width = x.shape
    out_width = weight.shape[1]
    out = torch.empty((rows, out_width), dtype=x.dtype, device=x.device)
    ln_linear_kernel[launch["grid"]](
        x, x.stride(0), rows, width, norm.eps, norm.weight, norm.bias, weight, weight.stride(0), weight.stride(1),
        bias, out, out_width, *launch["args"], GELU_KIND=GELU[gelu], ONE_PASS=ONE_PASS_STATS, **launch["constants"])
    return out


def linear_sum(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               residual: Optional[torch.Tensor] = None, exchange: Optional[tuple] = None) -> torch.Tensor:
    """residual + sum over the ranks of (x @ weight + bias), in one launch.

    Without `exchange`: this rank's x @ weight (+ bias) (+ residual) alone. With it, the
    p2p all-reduce's `(buffer_ptrs, pad_ptrs, slot_offset, rank, world)` (p2p_all_reduce.py
    makes it, and owns the slot rule): every rank of the group must make the same call."""
    launch = _launch(x, weight)
    rows, width = x.shape
    out_width = weight.shape[1]
    out = torch.empty((rows, out_width), dtype=x.dtype, device=x.device)
    buffer_ptrs, pad_ptrs, slot_offset, rank, world = exchange or (x, x, 0, 0, 1)
    linear_sum_kernel[launch["grid"]](
        x, x.stride(0), rows, width, weight, weight.stride(0), weight.stride(1),
        bias if bias is not None else x, residual.contiguous() if residual is not None else x, out, out_width,
        *launch["args"], buffer_ptrs, pad_ptrs, slot_offset, RANK=rank, WORLD=world, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, **launch["constants"])
    return out
