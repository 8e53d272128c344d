# Sourced by the one-call GPU scripts (gpu_async_triton.sh, gpu_kernels.sh, gpu_p2p.sh,
# gpu_fused.sh): the device's wheels, NVLink multicast off in every process (Ray workers
# inherit it), $OUT, `left [margin]`: seconds of $BUDGET_S (default 570, under the call's 600)
# still unspent, so each part can bound itself and the call returns its files; the GPUs and
# torch/triton versions printed, the tiny test model in $M, and $FILTER for log noise.
set -uo pipefail
source .whl/install.sh >/dev/null 2>&1; export SERVE_TP_WHEELS_INSTALLED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-570}
left() { echo $(( BUDGET_S - SECONDS - ${1:-0} )); }
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
M=models/tiny-gpt2
[ -f $M/config.json ] || python3 -m serve_tp.model.tiny_model $M >/dev/null 2>&1
FILTER="Warning\|warn\|DeepSpeed\|^\[\|^INFO"
