#!/usr/bin/env bash
# Create .venv with everything serve_tp needs (and, with --dev, its tests).
# DeepSpeed builds from source against the torch already installed, so torch goes first
# and DeepSpeed is built without build isolation (isolation would fetch another torch).
#   --oldest   build .venv-oldest instead, held to requirements-oldest.txt (the oldest
#              transformers, tokenizers and huggingface-hub serve_tp supports)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv DEV= OLDEST=()
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --oldest) VENV=.venv-oldest OLDEST=(-r requirements-oldest.txt) ;;
    *) echo "usage: $0 [--dev] [--oldest]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -d "$VENV" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || pip install -q "torch==${TORCH_VERSION:-2.13.0}"
pip install -q wheel setuptools ninja hjson py-cpuinfo psutil einops msgpack tqdm packaging numpy pydantic
DS_BUILD_OPS=0 pip install -q --no-build-isolation "$(grep -E '^deepspeed==' requirements.txt)"
# With --oldest, its exact pins resolve within requirements.txt's ranges to the lower bounds.
pip install -q -r "requirements${DEV:+-dev}.txt" "${OLDEST[@]}"
# --dev on a CPU build of torch: Triton, for its CPU interpreter, which runs our GPU kernels in
# the tests (tests/test_p2p_all_reduce.py, tests/test_decode_attention.py); 3.9, as 3.6's cannot
# loop over tensor bounds. A CUDA build of torch pins the Triton it was built with: left alone.
if [ -n "$DEV" ] && python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
  pip install -q "triton==${TRITON_VERSION:-3.9.0}"
fi
python -c "import ray, deepspeed, transformers, tokenizers, huggingface_hub, torch; print('ray', ray.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| tokenizers', tokenizers.__version__, '| huggingface-hub', huggingface_hub.__version__, '| torch', torch.__version__)" 2>&1 | tail -1
