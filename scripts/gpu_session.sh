#!/usr/bin/env bash
# Every GPU step of a session, in one call on a 2-GPU device machine:
#   run(command="bash scripts/gpu_session.sh", carry=[".whl"], kind="nvidia-h100-x2")
# SKIP_CHECK=1, SKIP_PROFILE=1, SKIP_BENCH=1 leave out a part (a call may run 10 minutes).
# Builds a GPT-2-small-shaped model (12 layers, 12 heads, 768 wide, vocab 50257: the device
# has no Hub; filler tokens give every id visible text), trained TRAIN_STEPS steps on the
# shipped corpus on GPU 0 so its logits are peaked like a real model's, proves TP=2
# correctness, profiles the decode step, then benchmarks the service against the
# tutorial's serving and plain HF generate.
set -uo pipefail
source .whl/install.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
nvidia-smi -L
python3 -c "import torch, ray, deepspeed, transformers; print('torch', torch.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
M=/tmp/gpt2-small-shape
python3 -m serve_tp.model.tiny_model $M --layers 12 --heads 12 --embd 768 --positions 1024 --model-vocab 50257 \
  --train-steps ${TRAIN_STEPS:-200} --batch-size 16 --device cuda >/dev/null && cat $M/training.json
if [ "${SKIP_CHECK:-0}" != 1 ]; then
  echo "== correctness"; python3 scripts/gpu_check.py --model $M --steps 32 2>&1 | grep -v "WARNING\|Warning\|warn" | tee "$OUT/gpu_check.log" | tail -25
fi
if [ "${SKIP_PROFILE:-0}" != 1 ]; then
  echo "== profile: decode steps of the engine's batch, CUDA graphs vs eager"
  for TP in 1 2; do
    python3 scripts/gpu_profile.py --model $M --tp $TP --batches 1,8,32,128 2>&1 | grep "^|\|^graph\|Error\|error" | tee -a "$OUT/profile.md"
  done
fi
[ "${SKIP_BENCH:-0}" = 1 ] && exit 0
B="python3 benchmarks/bench_serving.py --model $M --tensor-parallel-size 2 --device cuda --prompt-tokens 32 --max-tokens 64 --level-timeout-s 45"
echo "== benchmark: serve_tp and one-process HF generate"
$B --targets serve_tp,hf --start-serve-tp --serve-tp-arg max_batch_size=128 --serve-tp-arg max_ongoing_requests=256 \
   --concurrency ${LEVELS:-1,8,32,128} --requests-per-client ${RPC:-4} --out "$OUT/bench_serve_tp" 2>&1 | grep -v "WARNING\|Warning\|^INFO\|raylet\|ServeReplica\|ServeController" | tail -22
echo "== benchmark: the tutorial's serving (one request at a time, generate per request)"
$B --targets tutorial --concurrency ${TUTORIAL_LEVELS:-1,8,32} --requests-per-client 1 --out "$OUT/bench_tutorial" 2>&1 | grep -v "WARNING\|Warning" | tail -10
