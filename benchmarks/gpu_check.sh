#!/usr/bin/env bash
# The GPU check of issue 14 in one command (see benchmarks/gpu_check.py): GPU parity tests,
# level and pipeline benchmarks, bf16-vs-fp32 Dice on real images, each figure beside its target.
#
#   bash benchmarks/gpu_check.sh OUT [--rehearse] [--budget-s 330]
#
# Installs nothing: it runs with the Python given as $PYTHON (else the first of python3, python
# that imports torch) and this checkout on PYTHONPATH. Prepared real inputs in .cache/gpu-check-data (python benchmarks/gpu_check.py
# --prepare .cache/gpu-check-data, where the data packages are installed) are used when present.
# Exit status: 0 when every test passed and every section ran; the figures' verdicts are in
# OUT/summary.md either way.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT [--rehearse] [--budget-s SECONDS]" >&2
  exit 2
fi
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null && "$cand" -c "import torch" 2>/dev/null; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu_check: no Python with torch found; set PYTHON=/path/to/python" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
