#!/usr/bin/env bash
# The decode fast paths on the device: correctness, then the profile table (issue #13).
#   source .whl/install.sh && bash scripts/gpu_fastpath.sh        (results under $OUT)
# TESTS_S / PROFILE_S bound each part; SHAPES, BATCHES, COMPILE pick the profile's rows.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
M=${SERVE_TP_GPU_MODEL:-models/tiny-gpt2}
[ -f $M/config.json ] || python3 -m serve_tp.model.tiny_model $M >/dev/null  # the trained tiny test model, ~20 s
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  SERVE_TP_GPU_MODEL=$M timeout ${TESTS_S:-110} python3 -m pytest -m gpu tests/test_gpu.py -q -x -s -p no:cacheprovider \
    -k "symm_mem or compiled or fp32_tp2_nccl" 2>&1 | grep -v "Warning\|warn\|DeepSpeed\|^\[" | tail -25 | tee "$OUT/gpu_tests.log"
fi
timeout ${PROFILE_S:-170} python3 scripts/gpu_profile.py --shapes ${SHAPES:-gpt2,gpt2-large} --tp 1,2 \
  --batches ${BATCHES:-1,32} --context 128 --steps ${STEPS:-30} --compile ${COMPILE:-off,on} \
  --run-timeout-s 90 --time-limit-s $(( ${PROFILE_S:-170} - 60 )) --json "$OUT/profile_fastpath.jsonl" 2>&1 \
  | grep -v "Warning\|warn\|DeepSpeed\|^\[\|^INFO" | tail -60 | tee "$OUT/profile_fastpath.md"
