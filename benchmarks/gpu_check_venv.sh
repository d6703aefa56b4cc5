#!/usr/bin/env bash
# A virtual environment holding only the GPU machine's package set (issue 14), for rehearsing
# benchmarks/gpu_check.py on a CPU: torch, numpy, scipy, scikit-image, tifffile, safetensors,
# pytest, numba, cuda-bindings 13 and NVRTC 13; no zarr, dask, nibabel, napari or Qt.
#
#   bash benchmarks/gpu_check_venv.sh [DIR]      # default .cache/gpu-check-venv; idempotent
#
# Differences from the GPU machine, on purpose: Python 3.11 and the CPU build of torch 2.13 (the
# GPU machine has Python 3.12 and torch 2.11+cu130). `pip install torch` on 3.12 would pull a
# multi-GB CUDA build from PyPI; the only CPU wheel at hand is /opt/wheels' cp311 one, and a CPU
# build is what a rehearsal needs. triton is left out (GPU-only, unused by the engine).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.cache/gpu-check-venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ -x "$DIR/bin/python" ] && "$DIR/bin/python" -c "import torch, numba, skimage, tifffile, safetensors, pytest, scipy, cuda.bindings" 2>/dev/null; then
  exit 0
fi
"$PY" -m venv "$DIR"
TORCH=torch
[ -f /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl ] && [ "$("$DIR/bin/python" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" = True ] \
  && TORCH=/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
"$DIR/bin/python" -m pip install -q "$TORCH" numpy scipy scikit-image tifffile safetensors pytest numba \
  "cuda-bindings>=13,<14" "nvidia-cuda-nvrtc>=13.0,<13.1"
echo "GPU-check rehearsal environment ready in $DIR"
