#!/usr/bin/env bash
# Our p2p all-reduce (issue #13, serve_tp/engine/p2p_all_reduce.py) on a 2-GPU device machine, one call:
#   run(command="bash scripts/gpu_p2p.sh", carry=[".whl"], kind="nvidia-h200-x2", timeout_s=600)
# 1. allreduce_bench.py: NCCL against the p2p kernel inside CUDA graphs, fp16/bf16, 1-256 rows
#    (SKIP_BENCH=1 skips it).
# 2. pytest -m gpu -k "$TESTS" (default: the p2p tests but the HTTP app's): fp32 p2p = one
#    process; fp16 p2p logits bitwise NCCL's at every step (control: NCCL against itself)
#    (SKIP_TESTS=1 skips it).
# 3. the HTTP app test over p2p between Ray rank actors (SKIP_HTTP=1 skips it); when it fails,
#    the Ray workers' tracebacks go to $OUT/ray_errors.log.
# 4. gpu_profile.py with what is left: the decode step, $SHAPES, TP 1 and 2, NCCL against p2p,
#    compile $COMPILE, batches $BATCHES.
source scripts/device_call.sh
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== all-reduce microbenchmark ($(left) s left)"
  timeout ${BENCH_S:-60} python3 scripts/allreduce_bench.py --groups nccl,serve_tp_p2p --dtypes float16,bfloat16 \
    --rows 1,8,32,128,256 --widths 768,1280,1600 --time-limit-s 40 --group-timeout-s 50 \
    --json "$OUT/allreduce_p2p.json" --md "$OUT/allreduce_p2p.md" 2>&1 | grep -v "$FILTER" | grep "float16 | 1 \|float16 | 256 "
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== tests ($(left) s left)"
  SERVE_TP_GPU_MODEL=$M timeout ${TESTS_S:-130} python3 -m pytest -m gpu tests/test_gpu.py -k "${TESTS:-p2p and not http}" \
    -q -s -p no:cacheprovider 2>&1 | grep "passed\|failed\|Error\|assert\|error" | tail -20 | tee "$OUT/p2p_tests.log"
fi
if [ "${SKIP_HTTP:-0}" != 1 ]; then
  echo "== HTTP app over p2p ($(left) s left)"
  SERVE_TP_GPU_MODEL=$M timeout ${HTTP_S:-240} python3 -m pytest -m gpu tests/test_gpu.py -k "http_app and p2p" \
    -q -s -p no:cacheprovider 2>&1 | grep "passed\|failed\|Error\|assert\|ranks:" | tail -12 | tee "$OUT/p2p_http.log"
  grep -q " passed" "$OUT/p2p_http.log" || grep -h -A25 "Traceback" /tmp/ray/session_*/logs/*.err 2>/dev/null \
    | grep -v "$FILTER" | tail -80 > "$OUT/ray_errors.log"
fi
echo "== profile ($(left) s left)"
timeout $(left 5) python3 scripts/gpu_profile.py --shapes ${SHAPES:-gpt2,gpt2-large,gpt2-xl,gpt2-medium} \
  --tp 1,2 --batches ${BATCHES:-1,32,128} --context 128 --steps ${STEPS:-30} --compile ${COMPILE:-on} \
  --all-reduce nccl,p2p --run-timeout-s 120 --time-limit-s $(left 50) \
  --json "$OUT/profile_p2p.jsonl" 2>&1 | grep -v "$FILTER" | tee "$OUT/profile_p2p.md" | grep "^|" | tail -30
find "$OUT" -type f | sort
