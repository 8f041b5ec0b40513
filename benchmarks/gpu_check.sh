#!/usr/bin/env bash
# The GPU check (issue #19, part 5), in ONE run for a session with one GPU (about 8 minutes):
#   bash benchmarks/gpu_check.sh [--output benchmarks/gpu_check_results.json] [--quick] [--parts ...]
# Four parts, each under its own time limit (benchmarks/gpu_check.py: PART_LIMITS_S), results in
# one JSON file (written after every part). --quick with no GPU runs the plumbing on the CPU.
# PYTHON picks the interpreter (default: python3 on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
