#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the test suite.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -k reference    # extra arguments go to pytest
#
# Fails when pytest fails and also when no test ran (pytest exit code 5).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

bash scripts/setup.sh || { echo "[test] ERROR: scripts/setup.sh failed" >&2; exit 1; }

export HF_HUB_OFFLINE=1
echo "[test] .venv/bin/python -P -m pytest tests -q $*"
T0=$(date +%s)
# -P: the repository root stays off sys.path, as in a real deployment (its
# triton_kernels/ directory must not shadow the OpenAI package vLLM imports).
"$ROOT/.venv/bin/python" -P -m pytest tests -q "$@"
rc=$?
echo "[test] pytest exit code $rc after $(( $(date +%s) - T0 )) s"
if [ "$rc" -eq 5 ]; then
    echo "[test] ERROR: no test ran" >&2
    exit 1
fi
exit "$rc"
