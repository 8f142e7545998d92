#!/usr/bin/env bash
# The DDP tests N times in a row, stopping at the first failure; run by hand, not in CI. A race at a
# run's exit shows in one run of dozens, which a single test run does not catch. Best run under
# load (another job on the cores), where such races show most:
#
#     nice -n 19 python -c "while True: pass" &  scripts/ddp_stress.sh 50; kill %1
#
# Arguments: N (default 50) and the pytest -k expression (default: every DDP test).
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-50}"
k="${2:-ddp}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for i in $(seq 1 "$n"); do
  if ! python -m pytest -q -x -p no:cacheprovider test_cocomix.py -k "$k" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "ddp_stress: run $i of $n failed (load $(cut -d' ' -f1 /proc/loadavg))"
    exit 1
  fi
  echo "ddp_stress: run $i of $n passed (load $(cut -d' ' -f1 /proc/loadavg))"
done
echo "ddp_stress: $n of $n runs passed"
