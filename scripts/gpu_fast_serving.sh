#!/usr/bin/env bash
# The fast decode path under the serving app (issue #13 -> defaults), on 2 GPUs in one call (~8 min):
#   run(command="bash scripts/gpu_fast_serving.sh", carry=[".whl"], kind="nvidia-h200-x2", timeout_s=595)
# The fixed workload (32-token prompts, 64 tokens, greedy and sampled, 1/32/128 users, $RPC
# requests a user: 16, so the first wave's warm-up is a sixteenth of a level, not a quarter),
# TP=2 behind HAProxy: today's defaults, then compile_decode=true + decode_attention=triton.
# Each half is bounded by what is left of BUDGET_S, so the call returns its files.
set -uo pipefail
source .whl/install.sh >/dev/null 2>&1; export SERVE_TP_WHEELS_INSTALLED=1
OUT=${OUT:-/tmp/out}; BUDGET_S=${BUDGET_S:-580}
left() { echo $(( BUDGET_S - SECONDS - ${1:-0} )); }
for variant in default fast; do
  T=$(left 5); [ "$T" -lt 90 ] && { echo "SKIP $variant: $T s left"; continue; }
  echo "== serving, fixed, HAProxy, $variant ($T s left)"
  ARGS=""; TAG=""
  [ $variant = fast ] && ARGS="compile_decode=true decode_attention=triton" TAG=_fast
  OUT=$OUT timeout $T env SKIP_TESTS=1 SKIP_DTYPES=1 SKIP_ALLREDUCE=1 SKIP_PROFILE=1 SKIP_CEILING=1 SKIP_TUTORIAL=1 \
    SKIP_LAYOUT=1 SKIP_REALISTIC=1 FIXED_TARGETS=serve_tp RPC=${RPC:-16} TRAIN_STEPS=${TRAIN_STEPS:-100} \
    SERVE_TP_ARGS="$ARGS" RUN_TAG=$TAG SERVE_ENV="RAY_SERVE_ENABLE_HA_PROXY=1" bash scripts/gpu_session.sh 2>&1 \
    | grep "^|\|SKIP\|rror" | tail -10
done
find "$OUT" -type f -name "*.md" | sort
