#!/usr/bin/env bash
# Create .venv with everything serve_tp needs (and, with --dev, its tests).
# DeepSpeed builds from source against the torch already installed, so torch goes first
# and DeepSpeed is built without build isolation (isolation would fetch another torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || pip install -q "torch==${TORCH_VERSION:-2.13.0}"
pip install -q wheel setuptools ninja hjson py-cpuinfo psutil einops msgpack tqdm packaging numpy pydantic
DS_BUILD_OPS=0 pip install -q --no-build-isolation "$(grep -E '^deepspeed==' requirements.txt)"
if [ "${1:-}" = "--dev" ]; then
  pip install -q -r requirements-dev.txt
else
  pip install -q -r requirements.txt
fi
python -c "import ray, deepspeed, transformers, torch; print('ray', ray.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)" 2>&1 | tail -1
