#!/usr/bin/env bash
# Async scheduling and the Triton decode attention on a 2-GPU device machine, in one call (~9 min):
#   run(command="bash scripts/gpu_async_triton.sh", carry=[".whl"], kind="nvidia-h200-x2", timeout_s=590)
# 1. pytest -m gpu -k "async or triton": async == synchronous outputs over NCCL, decode graphs
#    and sampler graphs; Triton attention == SDPA in fp32, eager and in CUDA graphs; then
#    tests/test_decode_attention.py against the compiled kernel
# 2. gpu_profile: sdpa vs triton attention, gpt2 and gpt2-large, TP 1 and 2, batch 1 and 32,
#    kernels per step
# 3. the fixed serving benchmark behind HAProxy, synchronous (async_scheduling=false), then async
# Each part is bounded by what is left of BUDGET_S, so the call returns its files.
source scripts/device_call.sh
echo "== tests ($(left) s left)"
SERVE_TP_GPU_MODEL=$M timeout 170 python3 -m pytest -m gpu tests/test_gpu.py -k "async or triton" -q -s -p no:cacheprovider 2>&1 \
  | grep "passed\|failed\|Error\|assert" | tail -12 | tee "$OUT/new_paths_tests.log"
timeout 60 python3 -m pytest tests/test_decode_attention.py -q -p no:cacheprovider 2>&1 | tail -3 | tee -a "$OUT/new_paths_tests.log"
echo "== profile: sdpa vs triton attention ($(left) s left)"
timeout 130 python3 scripts/gpu_profile.py --shapes gpt2,gpt2-large --tp 1,2 --batches 1,32 --context 256 --steps 100 \
  --compile off --all-reduce nccl --attention sdpa,triton --run-timeout-s 80 --time-limit-s 100 \
  --json "$OUT/profile_attention.jsonl" 2>&1 | grep "^|" | tee "$OUT/profile_attention.md" | tail -12
for mode in sync async; do
  T=$(left 10); [ "$T" -lt 60 ] && { echo "SKIP serving $mode: $T s left"; continue; }
  echo "== serving, fixed, HAProxy, $mode ($T s left)"
  export ASYNC_SCHEDULING=$([ $mode = async ] && echo 1 || echo 0)  # sync: files under sync_scheduling/
  OUT=$OUT timeout $T env SKIP_TESTS=1 SKIP_DTYPES=1 SKIP_ALLREDUCE=1 SKIP_PROFILE=1 SKIP_CEILING=1 SKIP_TUTORIAL=1 \
    SKIP_LAYOUT=1 SKIP_REALISTIC=1 FIXED_TARGETS=serve_tp RPC=${RPC:-4} TRAIN_STEPS=${TRAIN_STEPS:-100} \
    SERVE_ENV="RAY_SERVE_ENABLE_HA_PROXY=1" bash scripts/gpu_session.sh 2>&1 | grep "^|\|SKIP\|rror" | tail -12
done
find "$OUT" -type f | sort
