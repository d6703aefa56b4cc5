#!/usr/bin/env bash
# Reproduce one bundled model end to end: train, calibrate its quality estimate, write its card.
#   bash scripts/reproduce_model.sh brain_mri|he_epidermis|davis_video
# Each step is one command of its own (see the card's "Reproduce" section); training resumes from its
# checkpoint when rerun with --resume. 1 torch thread: the machine this ran on was shared.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 PYTHONPATH="${PYTHONPATH:-$(cd .. && pwd)}"
PY="${PYTHON:-python}"
case "${1:-}" in
  brain_mri)
    "$PY" train_brain_synth.py --out ../models/brain_mri.safetensors --iterations 4000 --batch 2 --synthetic 0 --real 48 --seed 2 --threads 2
    "$PY" calibrate_quality.py brain_mri ../models/brain_mri.safetensors ;;
  he_epidermis)
    "$PY" train_epidermis.py --out ../models/he_epidermis.safetensors --iterations 600 --batch 4 --crop 96 --seed 0
    "$PY" calibrate_quality.py he_epidermis ../models/he_epidermis.safetensors ;;
  davis_video)
    "$PY" train_davis.py --out ../models/davis_video.safetensors --iterations 4000 --batch 2 --seed 1 --threads 2 --validation libby --features motion
    "$PY" calibrate_quality.py davis_video ../models/davis_video.safetensors ;;
  *) echo "usage: bash scripts/reproduce_model.sh brain_mri|he_epidermis|davis_video" >&2; exit 2 ;;
esac
"$PY" model_card.py "$1"
