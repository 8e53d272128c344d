#!/usr/bin/env bash
# fused_decode (issue #13, serve_tp/model/fused_linear.py) on a 2-GPU device machine, one call:
#   run(command="bash scripts/gpu_fused.sh", carry=[".whl"], kind="nvidia-h200-x2", timeout_s=600)
# 1. fused_linear_bench.py: each fused kernel against the torch kernels it replaces, in CUDA
#    graphs, weights from DRAM, at every column block (SKIP_BENCH=1 skips it); SWEEP=1 runs its
#    sweep of launch settings instead (gpt2-large, one row; what set fused_linear's defaults).
# 2. pytest -m gpu -k "$TESTS" (default: the fused tests and the fp16 p2p-vs-NCCL one): fused fp32 =
#    float64 within the eager step's control on one GPU; fused TP=2 over p2p = one process; fp16
#    fused over p2p bitwise fused over NCCL (SKIP_TESTS=1 skips it).
# 3. gpu_profile.py: the decode step, $SHAPES, TP $TPS (default 1,2; 1 on a one-GPU kind),
#    batches $BATCHES, compile on, attention $ATTENTION (default triton against fused, split-K,
#    and fused-unsplit), NCCL and p2p, and the kernels each step launches.
source scripts/device_call.sh
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== fused kernels alone ($(left) s left)"
  timeout ${BENCH_S:-120} python3 scripts/fused_linear_bench.py $([ "${SWEEP:-0}" = 1 ] && echo --sweep) \
    --md "$OUT/fused_kernels.md" 2>&1 | grep -v "$FILTER" | tail -40
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== tests ($(left) s left)"
  SERVE_TP_GPU_MODEL=$M timeout ${TESTS_S:-200} python3 -m pytest -m gpu tests/test_gpu.py \
    -k "${TESTS:-fused or (fp16_peer_memory and p2p)}" -q -s -p no:cacheprovider 2>&1 \
    | grep "passed\|failed\|Error\|assert\|error\|vs float64" | tail -20 | tee "$OUT/fused_tests.log"
fi
echo "== profile ($(left) s left)"
timeout $(left 5) python3 scripts/gpu_profile.py --shapes ${SHAPES:-gpt2,gpt2-large,gpt2-xl,gpt2-medium} \
  --tp ${TPS:-1,2} --batches ${BATCHES:-1,32} --context 128 --steps ${STEPS:-30} --compile on \
  --attention ${ATTENTION:-triton,fused,fused-unsplit} \
  --all-reduce ${ALL_REDUCE:-nccl,p2p} --kernels --run-timeout-s 150 --time-limit-s $(left 50) \
  --json "$OUT/profile_fused.jsonl" 2>&1 | grep -v "$FILTER" | tee "$OUT/profile_fused.md" | grep "^|" | tail -40
find "$OUT" -type f | sort
