#!/usr/bin/env bash
# The test command: set up .venv with dev dependencies, then run the whole suite on CPU
# (a real local Ray cluster, the Serve app with TP=2 over HTTP, gloo ranks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
exec python -m pytest "$@"
