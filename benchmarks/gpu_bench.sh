#!/usr/bin/env bash
# GPU figures for `mlpfuse bench` (issue 6). Usage: benchmarks/gpu_bench.sh OUT_DIR [--budget SECONDS]
# Writes OUT_DIR/<configuration>.json (the `mlpfuse bench --json` format) and OUT_DIR/summary.json.
# About 4 minutes on one H100 (configurations that no longer fit --budget, default 240 s, are skipped).
set -euo pipefail
out="${1:?usage: benchmarks/gpu_bench.sh OUT_DIR [--budget SECONDS]}"
shift
cd "$(dirname "$0")/.."
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" exec python benchmarks/gpu_bench.py "$out" "$@"
