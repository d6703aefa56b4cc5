#!/usr/bin/env bash
# GPU check in one command: the GPU parity tests, then the GPU benchmarks; everything is
# appended to benchmarks/RESULTS.md (or the file given as $1) with the machine and the date.
#
#   bash benchmarks/gpu_check.sh [results.md]
#
# Needs a CUDA build of PyTorch and `pip install "cuda-bindings==12.9.*" nvidia-cuda-nvrtc-cu12`
# (no CUDA toolkit). Exits non-zero when a test fails; the benchmarks run either way.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-benchmarks/RESULTS.md}"
PY="${PYTHON:-python}"
export OCTREENCA_REQUIRE_GPU=1 OCTREENCA_REQUIRE_NVRTC=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: PyTorch sees no CUDA GPU; nothing measured" >&2
    exit 2
fi

LOG="$(mktemp)"
GPU_NAME="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
TORCH_INFO="$("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"
NVRTC_INFO="$("$PY" -c 'from napari_octreenca.backends.cuda.nvrtc import nvrtc_version as v; print("NVRTC %d.%d" % v())')"
FENCE='```'
{
    echo
    echo "### GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Machine: ${GPU_NAME}; ${TORCH_INFO}; ${NVRTC_INFO}"
    echo "Command: bash benchmarks/gpu_check.sh"
    echo
    echo "Tests: pytest tests/gpu tests/test_cuda_compile.py"
    echo "$FENCE"
} | tee -a "$LOG"

"$PY" -m pytest -q -p no:cacheprovider tests/gpu tests/test_cuda_compile.py 2>&1 | tail -n 15 | tee -a "$LOG"
TEST_STATUS=${PIPESTATUS[0]}
echo "$FENCE" | tee -a "$LOG"

bench() {  # one benchmark table, its command line shown above it
    echo | tee -a "$LOG"
    echo "octreenca bench $*" | tee -a "$LOG"
    echo | tee -a "$LOG"
    "$PY" -m napari_octreenca.bench "$@" 2>&1 | grep -v '^#' | tee -a "$LOG"
}
# One 2D level at 8192^2 (target: >= 1e10 cell-steps/s on an H100).
bench --device cuda --backends cuda,torch --sizes 8192 --dtypes float32,bfloat16 --steps 20
# 3D level at 256^3 (radiology network).
bench --device cuda --backends cuda,torch --dims 3 --preset radiology --sizes 256 --dtypes float32,bfloat16 --steps 10
# Pathology preset end to end at 13600^2 = 184.96 MP (target: <= 0.5 s, <= 70 bytes/pixel in bf16).
bench --device cuda --backends cuda --mode pipeline --sizes 13600 --dtypes bfloat16,float32
bench --device cuda --backends torch --mode pipeline --sizes 4096 --dtypes bfloat16
# bf16 and fp32 segmentations agree on real inputs (Dice).
echo | tee -a "$LOG"
"$PY" benchmarks/bench_dice.py --device cuda 2>&1 | tee -a "$LOG"

cat "$LOG" >> "$RESULTS"
rm -f "$LOG"
echo "gpu_check: appended to $RESULTS (tests exit status $TEST_STATUS)"
exit "$TEST_STATUS"
