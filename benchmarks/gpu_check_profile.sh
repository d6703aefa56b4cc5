#!/usr/bin/env bash
# Nsight Compute profiles of the fused kernels, for the GPU time left after benchmarks/gpu_check.sh:
# one 8192^2 bf16 level step of kernel v1 and of kernel v2 (and, with --3d, 256^3), each in its
# own process, the warm-up launches skipped, the full section set; reports written to OUT.
#
#   bash benchmarks/gpu_check_profile.sh OUT [--3d]
#
# Needs ncu on PATH (or $NCU) and the same Python as gpu_check.sh ($PYTHON or python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash benchmarks/gpu_check_profile.sh OUT [--3d]}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
NCU="${NCU:-ncu}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OCTREENCA_CACHE="${OCTREENCA_CACHE:-$OUT/cubins}"
cases=('{"backend": "cuda", "size": 8192, "dtype": "bfloat16", "dims": 2, "preset": "pathology", "steps": 3, "device": "cuda"}')
if [ "${2:-}" = "--3d" ]; then
  cases+=('{"backend": "cuda", "size": 256, "dtype": "bfloat16", "dims": 3, "preset": "radiology", "steps": 3, "device": "cuda"}')
fi
status=0
for kernel in v1 v2; do
  for i in "${!cases[@]}"; do
    name="nca_${kernel}_case$i"
    echo "== $name: ${cases[$i]}"
    # The first 3 launches (steps) of a case are the 8^dims warm-up: skip them, profile the next two.
    OCTREENCA_CUDA_KERNEL=$kernel "$NCU" --kernel-name regex:'nca2?_step' --launch-skip 3 --launch-count 2 \
      --set full --export "$OUT/$name" --force-overwrite \
      "$PY" -m napari_octreenca.bench --case "${cases[$i]}" > "$OUT/$name.log" 2>&1 || status=1
    tail -n 3 "$OUT/$name.log"
    "$NCU" --import "$OUT/$name.ncu-rep" --page details --csv > "$OUT/$name.csv" 2>/dev/null || true
  done
done
exit $status
