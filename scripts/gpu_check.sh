#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py says what it runs). One command, no network:
#   bash scripts/gpu_check.sh --data_root=DIR [--minutes=8]      # on a one-GPU machine
#   bash scripts/gpu_check.sh --dry_run                          # smoke-test sizes, CPU without a GPU (CI runs this)
# Writes out/gpu_check/gpu_check.json and gpu_check.md; exit status 1 if a part failed.
set -euo pipefail
cd "$(dirname "$0")/.."
export TIKTOKEN_CACHE_DIR="${TIKTOKEN_CACHE_DIR:-$(cd .. && pwd)/shared/tiktoken}"
exec python -m scripts.gpu_check "$@"
