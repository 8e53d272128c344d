#!/usr/bin/env bash
# Rank 0's sampler as CUDA graphs on one GPU, in one device call (~3 min):
#   run(command="bash scripts/gpu_sampler_graphs.sh", carry=[".whl"], kind="nvidia-h100-x2", timeout_s=240)
# 1. pytest: graph replays == the eager sampler, bit for bit (tests/test_gpu.py -k sampler)
# 2. benchmarks/bench_sampler.py --graphs both at batch 1, 32, 128 (eager and graphs side by side)
# 3. if time is left: bench_serving's fixed workload, greedy and sampled, 1 user (TPOT with graphs)
# Results in $OUT/<machine>/: copy them to docs/results/<machine>/.
set -uo pipefail
source .whl/install.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
OUT=${OUT:-/tmp/out}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9]\{3\}' | tr A-Z a-z)
R="$OUT/${GPU:-gpu}x$(nvidia-smi -L | wc -l)"; mkdir -p "$R"
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"
echo "== pytest: sampler graphs == eager"
timeout 90 python3 -m pytest -m gpu tests/test_gpu.py -k sampler -s -q -p no:cacheprovider 2>&1 | tail -25 | tee "$R/sampler_graphs_test.log"
echo "== bench_sampler, eager vs graphs"
for rows in 1 32 128; do
  timeout 60 python3 -m benchmarks.bench_sampler --device cuda --graphs both --rows $rows --logits zipf --repeats 30 2>&1
done | tee "$R/sampler_graphs.md"
LEFT=$((225 - SECONDS))
if [ "$LEFT" -gt 60 ] && [ "${SKIP_SERVING:-0}" != 1 ]; then
  echo "== bench_serving, fixed, greedy and sampled, 1 user ($LEFT s left)"
  M=/tmp/gpt2-small-shape
  timeout $((LEFT - 5)) bash -c "python3 -m serve_tp.model.tiny_model $M --layers 12 --heads 12 --embd 768 --positions 1024 \
      --model-vocab 50257 --train-steps 40 --batch-size 16 --device cuda >/dev/null && \
    python3 benchmarks/bench_serving.py --model $M --tensor-parallel-size 2 --device cuda --level-timeout-s 30 \
      --workload fixed --sampling greedy,sampled --prompt-tokens 32 --max-tokens 64 --targets serve_tp \
      --start-serve-tp --serve-tp-arg max_batch_size=128 --serve-tp-arg sampler_graphs=true --concurrency 1 --requests-per-client 4 \
      --out $R --out-name fixed_sampler_graphs" 2>&1 | grep -v "WARNING\|Warning\|^INFO\|raylet\|ServeReplica\|ServeController\|^\[rank" | tail -20
fi
ls -la "$R"
