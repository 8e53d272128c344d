#!/usr/bin/env bash
# TP=2 on CPU with each all-reduce, shm then gloo then shm ... (the order alternates per
# round, so drift in a shared machine's load does not favour one): ROUNDS rounds of
# bench_serving.py at 1 and 16 clients, then one all-reduce micro-benchmark.
# Results: $OUT/<round>-<kind>/results.{json,md}; the summary: benchmarks/report_all_reduce.py.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-/tmp/bench-tiny}
OUT=${OUT:-benchmarks/results/cpu_all_reduce}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-8011}
[ -d "$MODEL" ] || python -m serve_tp.model.tiny_model "$MODEL"
for round in $(seq 1 "$ROUNDS"); do
  order="shm gloo"; [ $((round % 2)) -eq 0 ] && order="gloo shm"
  for kind in $order; do
    python benchmarks/bench_serving.py --model "$MODEL" --tensor-parallel-size 2 --device cpu \
      --targets serve_tp --start-serve-tp --serve-port "$PORT" --concurrency 1,16 \
      --requests-per-client 4 --prompt-tokens 32 --max-tokens 32 \
      --serve-tp-arg "cpu_all_reduce=$kind" --out "$OUT/$round-$kind" 2>&1 | tail -8
  done
done
python -m benchmarks.all_reduce_latency | tee "$OUT/all_reduce_latency.md"
