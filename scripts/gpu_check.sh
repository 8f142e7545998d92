#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py says what it runs). One command, no network:
#   bash scripts/gpu_check.sh                      # on a one-GPU machine: about 6 minutes
#   bash scripts/gpu_check.sh --dry_run            # the real run's budget, then smoke-test sizes
#   bash scripts/gpu_check.sh --compare_minutes=M  # then reproduce.py's comparison (COCOMIX_DATA)
# Offline, TIKTOKEN_CACHE_DIR names a folder holding tiktoken's gpt2 files (docs/usage.md).
# Writes out/gpu_check/gpu_check.json and gpu_check.md after every part; exit status 1 if a part
# failed.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m scripts.gpu_check "$@"
