#!/usr/bin/env bash
# The test command: set up .venv with dev dependencies, then run the whole suite on CPU
# (a real local Ray cluster, the Serve app with TP=2 over HTTP, gloo ranks).
#   bash scripts/test.sh [pytest args]            newest releases requirements.txt allows
#   bash scripts/test.sh --oldest [pytest args]   oldest supported (requirements-oldest.txt),
#                                                 in .venv-oldest
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv SETUP=(--dev)
if [ "${1:-}" = --oldest ]; then
  VENV=.venv-oldest SETUP=(--dev --oldest)
  shift
fi
bash scripts/setup.sh "${SETUP[@]}"
. "$VENV/bin/activate"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
exec python -m pytest "$@"
