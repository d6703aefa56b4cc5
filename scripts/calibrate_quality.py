#!/usr/bin/env python
"""Calibrate the quality estimate (``napari_octreenca.run.quality``) of a bundled model.

Segments held-out inputs on which the model is known to do well ("good") and inputs on which it is
known to fail ("failing": another source where its Dice is low, or another modality), each with
``quality.DEFAULT_RUNS`` runs, and stores the threshold between the two groups' scores in the
model file's provenance (``quality``: threshold, metric, runs and every case with its score).
The weights are not touched. None of these inputs is used for training or model selection.

    python scripts/calibrate_quality.py he_epidermis models/he_epidermis.safetensors
    python scripts/calibrate_quality.py brain_mri models/brain_mri.safetensors

Cases (all installed by scripts/setup.sh, except the DAVIS frame from ../shared/data):
- he_epidermis: good = the held-out right third of skin.tif and its upper and lower halves;
  failing = the annotated region of cmu_small_region.svs (another slide; Dice 0.67 before the HED
  retrain), a Colin27 MRI slice as RGB and a DAVIS 2016 video frame (other modalities).
- brain_mri: good = the ITK subject's head scan; failing = the ITK subject with inverted contrast
  (T2-like) and the H&E skin section stacked into a volume (other modalities). Also measured, not
  used for the threshold: the ITK subject skull-stripped (a failure of this model, Dice 0.50, that
  the runs agree on, so the spread cannot flag it) and Colin27 (its training subject).

Groups other than good and failing ("measured") are scored and stored but do not set the threshold.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_octreenca.data_sources import (
    ITK_DATA,
    MRICRON,
    cmu_epidermis_region,
    load_nifti_zyx,
    skin_sample,
)
from napari_octreenca.nca.modelfile import load_model, read_extra, save_model
from napari_octreenca.run.quality import DEFAULT_RUNS, calibrate_threshold
from napari_octreenca.run.resample import segment_at_model_spacing

DAVIS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "davis2016"
Case = Callable[[], tuple[np.ndarray, tuple[float, ...], str]]


def _skin_right(rows: slice = slice(None)) -> Case:
    def load() -> tuple[np.ndarray, tuple[float, ...], str]:
        img, _ = skin_sample()
        return np.ascontiguousarray(img[rows, 853:]), (1.0, 1.0), "YXC"

    return load


def _mri_slice_rgb() -> tuple[np.ndarray, tuple[float, ...], str]:
    t1, _ = load_nifti_zyx(MRICRON / "ch2.nii.gz")
    sl = (t1[90] / t1.max() * 255).astype(np.uint8)
    return np.repeat(sl[..., None], 3, -1), (1.0, 1.0), "YXC"


def _davis_frame() -> tuple[np.ndarray, tuple[float, ...], str]:
    from skimage.io import imread

    frame = sorted((DAVIS / "blackswan" / "images").glob("*.jpg"))[0]
    return imread(frame)[..., :3], (1.0, 1.0), "YXC"


def _cmu() -> tuple[np.ndarray, tuple[float, ...], str]:
    return cmu_epidermis_region()[0], (1.0, 1.0), "YXC"


def _itk(stripped: bool = False, inverted: bool = False) -> Case:
    def load() -> tuple[np.ndarray, tuple[float, ...], str]:
        img, sp = load_nifti_zyx(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz")
        if stripped:
            img = img * (load_nifti_zyx(ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz")[0] > 0)
        if inverted:
            img = np.where(img > 10, 255 - img, 0).astype(np.float32)
        return img, sp, "ZYX"

    return load


def _colin() -> tuple[np.ndarray, tuple[float, ...], str]:
    return load_nifti_zyx(MRICRON / "ch2.nii.gz") + ("ZYX",)


def _skin_stack() -> tuple[np.ndarray, tuple[float, ...], str]:
    img, _ = skin_sample()
    grey = img.mean(-1)[::4, ::4].astype(np.float32)
    return np.repeat(grey[None], 40, 0), (3.0, 3.0, 3.0), "ZYX"


CASES: dict[str, dict[str, dict[str, Case]]] = {
    "he_epidermis": {
        "good": {
            "skin.tif right third": _skin_right(),
            "skin.tif right third, upper half": _skin_right(slice(0, 480)),
            "skin.tif right third, lower half": _skin_right(slice(480, None)),
        },
        "failing": {
            "cmu_small_region.svs annotated region": _cmu,
            "Colin27 MRI slice as RGB": _mri_slice_rgb,
            "DAVIS 2016 blackswan frame 0": _davis_frame,
        },
    },
    "brain_mri": {
        "good": {"ITK subject, head": _itk()},
        "failing": {
            "ITK subject, inverted contrast (T2-like)": _itk(inverted=True),
            "H&E skin section stacked as a volume": _skin_stack,
        },
        "measured": {
            "ITK subject, skull-stripped (Dice about 0.5: a confident failure)": _itk(stripped=True),
            "Colin27 ch2, 1 mm whole head (training subject)": _colin,
        },
    },
}


def score(model: Any, case: Case, runs: int) -> tuple[float, bool]:
    """(quality score, whether anything was segmented) of one case."""
    img, spacing, axes = case()
    seg = segment_at_model_spacing(model, img, spacing, axes=axes, runs=runs, seed=0)
    return float(seg.quality["score"]), bool(seg.quality["segmented"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", choices=sorted(CASES))
    ap.add_argument("model", help="model file to calibrate (rewritten in place unless --dry-run)")
    ap.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    ap.add_argument("--dry-run", action="store_true", help="print the scores, do not write")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    scores: dict[str, dict[str, float]] = {}
    empty: list[str] = []  # flagged anyway: nothing segmented; they do not set the threshold
    for group, cases in CASES[args.cases].items():
        scores[group] = {}
        for name, case in cases.items():
            value, segmented = score(model, case, args.runs)
            scores[group][name] = round(value, 5)
            if not segmented:
                empty.append(name)
            print(f"{group:8s} {value:.5f}  {name}" + ("  (nothing segmented)" if not segmented else ""), flush=True)
    usable = {g: [v for n, v in c.items() if n not in empty] for g, c in scores.items()}
    threshold = round(calibrate_threshold(usable["good"], usable["failing"]), 5)
    print(f"threshold {threshold}", flush=True)
    if args.dry_run:
        return
    entry = {
        "threshold": threshold,
        "metric": "mean over voxels of the std of sigmoid(logit) between runs",
        "runs": args.runs,
        "seeds_from": 0,
        "calibrated_on": scores,
        "nothing_segmented": empty,
        "rule": "geometric mean of the largest good and the smallest failing score",
    }
    prov = dict(model.config.provenance, quality=entry)
    model.config = model.config.replace(provenance=prov)
    save_model(model, args.model, extra=read_extra(args.model))
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
