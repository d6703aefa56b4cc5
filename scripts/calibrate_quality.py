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
- brain_mri: two signals, the spread and the agreement with the ``otsu-brain`` baseline (Dice on the
  model's grid), each with a one-sided threshold (``quality.one_sided_threshold``): the spread's just
  beyond every good case, half-way to the nearest failing one; the agreement's likewise, towards the
  failing cases the spread misses. A failing case needs to be caught by one of them.
  The ITK subject is the held-out test and sets nothing. Calibration inputs (Debian mricron-data
  and nilearn's bundled template): good = Colin27 ch2 (the training subject; no other head T1 with a
  mask ships in a package registry) as it is and transformed (2x2x3 mm thick slices, plus noise, a
  smooth bias field, a 10 degree rotation), its skull strips ch2bet (1 mm, 2x2x3 mm; trained on
  too) and ch2better (0.5 mm, never trained on), and the MNI152 template (brain-only; the model
  selection source); failing = the INIA19 macaque brain template (another species: a brain a
  third of the size), Colin27 with inverted contrast (T2-like) and the H&E skin section stacked
  into a volume (other modalities). When the spread separates these groups on its own, the
  agreement is not used. Test (scored and stored, never used for the thresholds): the ITK subject's
  head scan, the same skull-stripped, with inverted contrast and with its voxel size given 2x too
  large and too small, and another H&E slide stacked into a volume.

- davis_video: the spread (one-sided, as for brain_mri; the largest good score where no failing one
  lies above it) and a coverage floor (``min_fraction``: the
  geometric mean of the smallest good coverage and the largest failing one below it; on DAVIS every
  clip holds the object, so a result with almost nothing labelled is a miss). Good = the first 40
  frames of each of the 11 training sequences (no other annotated clips are available); failing = a
  still clip (a training frame repeated: nothing moves), training frames in shuffled order, Colin27
  MRI slices as frames and a panned H&E section (other modalities). Test (sets nothing): the first 40
  frames of the 3 held-out sequences and of the validation sequence, from ../shared/data/davis2016.

Groups other than good and failing ("measured", "test") are scored and stored but set nothing.
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
    mni152_path,
    skin_sample,
)
from napari_octreenca.nca.modelfile import load_model, read_extra, save_model
from napari_octreenca.run.quality import DEFAULT_MAX_FRACTION, DEFAULT_RUNS, calibrate_threshold, one_sided_threshold
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


def _itk(stripped: bool = False, inverted: bool = False, zooms: float = 1.0) -> Case:
    def load() -> tuple[np.ndarray, tuple[float, ...], str]:
        img, sp = load_nifti_zyx(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz")
        if stripped:
            img = img * (load_nifti_zyx(ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz")[0] > 0)
        if inverted:
            img = np.where(img > 10, 255 - img, 0).astype(np.float32)
        return img, tuple(s * zooms for s in sp), "ZYX"  # zooms != 1: a header with wrong voxel sizes

    return load


def _thick(img: np.ndarray, spacing: tuple[float, ...], to: tuple[float, ...]) -> np.ndarray:
    """``img`` as if scanned at voxel size ``to`` (blur along the coarser axes, then linear down-sampling)."""
    from scipy import ndimage

    f = [t / s for t, s in zip(to, spacing)]
    return ndimage.zoom(ndimage.gaussian_filter(img, [0.4 * x for x in f]), [1 / x for x in f], order=1)


def _template(
    name: str, thick: bool = False, noise: float = 0.0, bias: bool = False, rotate: float = 0.0, inverted: bool = False
) -> Case:
    """A Debian mricron-data template (Colin27 ch2, its skull strips, INIA19), optionally degraded."""

    def load() -> tuple[np.ndarray, tuple[float, ...], str]:
        from scipy import ndimage

        img, sp = load_nifti_zyx(MRICRON / f"{name}.nii.gz")
        rng = np.random.default_rng(0)
        if rotate:
            img = ndimage.rotate(img, rotate, axes=(0, 1), reshape=False, order=1)
        if bias:  # a smooth multiplicative field, 0.7-1.4 across the head (coil inhomogeneity)
            z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in img.shape], indexing="ij")
            img = img * np.exp(0.35 * (0.6 * z - 0.8 * y + 0.5 * x * y))
        if thick:
            sp_new = (3.0, 2.0, 2.0)
            img, sp = _thick(img, sp, sp_new), sp_new
        if noise:
            img = np.clip(img + rng.normal(0, noise * float(img.max()), img.shape), 0, None)
        if inverted:
            img = np.where(img > 10, img.max() - img, 0)
        return np.asarray(img, np.float32), sp, "ZYX"

    return load


def _slide_as_volume(rgb: np.ndarray) -> tuple[np.ndarray, tuple[float, ...], str]:
    """An H&E image in grey, every 4th pixel, stacked 40 times: another modality for an MRI model."""
    grey = rgb.mean(-1)[::4, ::4].astype(np.float32)
    return np.repeat(grey[None], 40, 0), (3.0, 3.0, 3.0), "ZYX"


def _cmu_stack() -> tuple[np.ndarray, tuple[float, ...], str]:
    return _slide_as_volume(cmu_epidermis_region()[0])


def _mni152() -> tuple[np.ndarray, tuple[float, ...], str]:
    img, sp = load_nifti_zyx(mni152_path())
    return img, sp, "ZYX"


def _skin_stack() -> tuple[np.ndarray, tuple[float, ...], str]:
    return _slide_as_volume(skin_sample()[0])


#: Frames of each DAVIS clip the video calibration segments (whole sequences take 2-3 times as long).
DAVIS_FRAMES = 40
DAVIS_TRAINING = (
    "bmx-trees breakdance cows drift-chicane drift-straight goat horsejump-high motocross-jump "
    "paragliding-launch scooter-black soapbox"
).split()


def _davis(name: str, still: bool = False, shuffled: bool = False) -> Case:
    """The first DAVIS_FRAMES frames of a DAVIS 2016 sequence; ``still``: its first frame repeated
    (nothing moves), ``shuffled``: in a fixed random order (the motion is meaningless)."""

    def load() -> tuple[np.ndarray, tuple[float, ...], str]:
        from napari_octreenca.data_sources import davis_sequence

        frames = davis_sequence(DAVIS, name)[0][:DAVIS_FRAMES]
        if still:
            frames = np.repeat(frames[:1], len(frames), 0)
        if shuffled:
            frames = frames[np.random.default_rng(0).permutation(len(frames))]
        return np.ascontiguousarray(frames), (1.0, 1.0, 1.0), "TYXC"

    return load


def _mri_clip() -> tuple[np.ndarray, tuple[float, ...], str]:
    t1, _ = load_nifti_zyx(MRICRON / "ch2.nii.gz")
    clip = (t1[40:160:3] / t1.max() * 255).astype(np.uint8)  # 40 axial slices, bottom to top
    return np.repeat(clip[..., None], 3, -1), (1.0, 1.0, 1.0), "TYXC"


def _skin_pan() -> tuple[np.ndarray, tuple[float, ...], str]:
    img, _ = skin_sample()
    return np.stack([img[:480, 8 * i : 8 * i + 854] for i in range(DAVIS_FRAMES)]), (1.0, 1.0, 1.0), "TYXC"


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
        "good": {
            "Colin27 ch2, 1 mm head (training subject)": _template("ch2"),
            "Colin27 ch2 at 2x2x3 mm (thick slices)": _template("ch2", thick=True),
            "Colin27 ch2 at 2x2x3 mm, noise 3 %": _template("ch2", thick=True, noise=0.03),
            "Colin27 ch2, bias field": _template("ch2", bias=True),
            "Colin27 ch2, rotated 10 degrees": _template("ch2", rotate=10.0),
            "Colin27 ch2bet, skull-stripped, 1 mm": _template("ch2bet"),
            "Colin27 ch2bet, skull-stripped, 2x2x3 mm": _template("ch2bet", thick=True),
            "Colin27 ch2better, skull-stripped, 0.5 mm": _template("ch2better"),
            "MNI152 2009a template, brain-only (nilearn; validation source)": _mni152,
        },
        "failing": {
            "INIA19 macaque T1 brain (another species, skull-stripped)": _template("inia19-t1-brain"),
            "Colin27 ch2, inverted contrast (T2-like)": _template("ch2", inverted=True),
            "H&E skin section stacked as a volume": _skin_stack,
        },
        "test": {
            "ITK subject, head": _itk(),
            "ITK subject, skull-stripped": _itk(stripped=True),
            "ITK subject, inverted contrast (T2-like)": _itk(inverted=True),
            "ITK subject, spacing given 2x too large": _itk(zooms=2.0),
            "ITK subject, spacing given 2x too small": _itk(zooms=0.5),
            "cmu_small_region.svs (another H&E slide), grey, stacked as a volume": _cmu_stack,
        },
    },
}

CASES["davis_video"] = {
    "good": {f"{n}, first {DAVIS_FRAMES} frames (training sequence)": _davis(n) for n in DAVIS_TRAINING},
    "failing": {
        "cows, first frame repeated (nothing moves)": _davis("cows", still=True),
        "cows, frames shuffled": _davis("cows", shuffled=True),
        "goat, frames shuffled": _davis("goat", shuffled=True),
        "Colin27 MRI axial slices as frames": _mri_clip,
        "H&E skin section panned (a camera moving over a slide)": _skin_pan,
    },
    "test": {
        f"{n}, first {DAVIS_FRAMES} frames ({why})": _davis(n)
        for n, why in (
            ("blackswan", "held out"),
            ("car-roundabout", "held out"),
            ("dance-twirl", "held out"),
            ("libby", "validation"),
        )
    },
}

#: Models whose estimate has a coverage floor besides the spread (``min_fraction``; see ``_floor``).
FLOOR = {"davis_video"}

#: Models whose estimate also compares the result with a classical baseline (``quality.baseline_agreement``).
AGREEMENT: dict[str, dict[str, str]] = {"brain_mri": {"baseline": "otsu-brain", "label": "brain"}}


def measure(model: Any, case: Case, runs: int) -> dict[str, Any]:
    """The quality estimate (``Quality.to_dict()``) of one case."""
    img, spacing, axes = case()
    seg = segment_at_model_spacing(model, img, spacing, axes=axes, runs=runs, seed=0)
    return dict(seg.quality)


def _flags(
    q: dict[str, Any], threshold: float, agree_at: float | None, max_fraction: float, min_fraction: float | None = None
) -> list[str]:
    """Which checks flag a measured case under the calibrated thresholds (the rules of ``quality.assess``)."""
    out = []
    if not q["segmented"]:
        out.append("nothing segmented")
    elif max(q["coverage"].values()) > max_fraction:
        out.append("coverage")
    elif min_fraction is not None and max(q["coverage"].values()) < min_fraction:
        out.append("almost nothing segmented")
    else:
        if q["score"] > threshold:
            out.append("spread")
        if agree_at is not None and q["agreement"] and min(q["agreement"].values()) < agree_at:
            out.append("baseline agreement")
    return out


def _thresholds(measured: dict[str, dict[str, dict[str, Any]]], two_signals: bool) -> tuple[float, float | None]:
    """(spread threshold, agreement threshold or None) from the good and failing groups.

    With two signals the spread (the primary, published metric) is set first; the agreement threshold
    is then placed between the good cases and the failing ones the spread misses, so a failing case
    that the spread already catches does not push it towards the good ones. When the spread misses
    none, the agreement has nothing to be set against: the spread alone is used (agreement None).
    """
    usable = {g: [q for q in c.values() if q["segmented"]] for g, c in measured.items()}
    good_s = [q["score"] for q in usable["good"]]
    bad_s = [q["score"] for q in usable["failing"]]
    if two_signals:
        spread_t, caught = one_sided_threshold(good_s, bad_s, flag_above=True)
        missed = [q for i, q in enumerate(usable["failing"]) if i not in caught]
        two_signals = bool(missed)  # the spread alone separates the groups: no second signal to set
    if not two_signals:  # from the scores as stored (5 decimals), as this rule always was
        return calibrate_threshold([round(v, 5) for v in good_s], [round(v, 5) for v in bad_s]), None
    good_a = [min(q["agreement"].values()) for q in usable["good"]]
    agree_t, _ = one_sided_threshold(good_a, [min(q["agreement"].values()) for q in missed], flag_above=False)
    return spread_t, agree_t


def _floor(measured: dict[str, dict[str, dict[str, Any]]]) -> float:
    """The coverage floor: the geometric mean of the smallest good coverage and the largest failing
    coverage below it (an error if no failing case lies below every good one)."""
    good = [max(q["coverage"].values()) for q in measured["good"].values() if q["segmented"]]
    below = [max(q["coverage"].values()) for q in measured["failing"].values() if q["segmented"]]
    below = [c for c in below if c < min(good)]
    if not below:
        raise SystemExit("no failing case covers less than every good one: a coverage floor separates none")
    return float(np.sqrt(min(good) * max(max(below), 1e-6)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", choices=sorted(CASES))
    ap.add_argument("model", help="model file to calibrate (rewritten in place unless --dry-run)")
    ap.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    ap.add_argument("--dry-run", action="store_true", help="print the scores, do not write")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    agreement = AGREEMENT.get(args.cases)
    # Measure with no thresholds yet (agreement threshold 0: its Dice is recorded, nothing flagged by it).
    probe = {"agreement": dict(agreement, threshold=0.0)} if agreement else {}
    model.config = model.config.replace(provenance=dict(model.config.provenance, quality=probe))
    measured: dict[str, dict[str, dict[str, Any]]] = {}
    for group, cases in CASES[args.cases].items():
        measured[group] = {}
        for name, case in cases.items():
            q = measured[group][name] = measure(model, case, args.runs)
            agree = "" if not q.get("agreement") else f"  agreement {min(q['agreement'].values()):.3f}"
            empty = "" if q["segmented"] else "  (nothing segmented)"
            print(f"{group:8s} {q['score']:.5f}{agree}  {name}{empty}", flush=True)
    if args.cases in FLOOR:
        floor = round(_floor(measured), 5)
        good_s = [q["score"] for q in measured["good"].values()]
        try:
            spread_t, _ = one_sided_threshold(
                good_s, [q["score"] for q in measured["failing"].values() if q["segmented"]], flag_above=True
            )
        except ValueError:  # no failing score above the good ones: the spread only flags what no good result had
            spread_t = max(good_s)
        spread_t = round(spread_t, 5)
        print(f"threshold {spread_t}, coverage floor {floor}", flush=True)
        entry = _floor_entry(measured, spread_t, floor, args.runs)
    else:
        spread_t, agree_t = _thresholds(measured, agreement is not None)
        if agree_t is None:
            agreement = None
        spread_t = round(spread_t, 5)
        agree_t = None if agree_t is None else round(agree_t, 3)
        print(f"threshold {spread_t}" + ("" if agree_t is None else f", agreement threshold {agree_t}"), flush=True)
        entry = _entry(measured, spread_t, agree_t, agreement, args.runs)
    print(json.dumps(entry, indent=1))
    if args.dry_run:
        return
    prov = dict(model.config.provenance, quality=entry)
    model.config = model.config.replace(provenance=prov)
    save_model(model, args.model, extra=read_extra(args.model))


def _floor_entry(
    measured: dict[str, dict[str, dict[str, Any]]], spread_t: float, floor: float, runs: int
) -> dict[str, Any]:
    """The ``quality`` entry of a model checked by the spread and a coverage floor."""
    calibrated_on = {
        g: {
            n: {
                "score": round(q["score"], 5),
                "coverage": round(max(q["coverage"].values()), 4),
                "flagged_by": _flags(q, spread_t, None, DEFAULT_MAX_FRACTION, floor),
            }
            for n, q in c.items()
        }
        for g, c in measured.items()
    }
    return {
        "threshold": spread_t,
        "metric": "mean over voxels of the std of sigmoid(logit) between runs",
        "runs": runs,
        "seeds_from": 0,
        "min_fraction": floor,
        "calibrated_on": calibrated_on,
        "rule": (
            "spread: half-way between the largest good score and the nearest failing score above it, or the largest "
            "good score where no failing score is above it; coverage floor: the geometric mean of the smallest good "
            "coverage and the largest failing coverage below it; a result is flagged when either fires"
        ),
        "missed": [n for n, v in calibrated_on["failing"].items() if not v["flagged_by"]],
        "nothing_segmented": [n for c in measured.values() for n, q in c.items() if not q["segmented"]],
    }


def _entry(
    measured: dict[str, dict[str, dict[str, Any]]],
    spread_t: float,
    agree_t: float | None,
    agreement: dict[str, str] | None,
    runs: int,
) -> dict[str, Any]:
    """The model file's ``quality`` entry: thresholds, how they were set, and every case measured."""
    entry: dict[str, Any] = {
        "threshold": spread_t,
        "metric": "mean over voxels of the std of sigmoid(logit) between runs",
        "runs": runs,
        "seeds_from": 0,
    }
    if agreement is None:
        entry["calibrated_on"] = {g: {n: round(q["score"], 5) for n, q in c.items()} for g, c in measured.items()}
        entry["rule"] = "geometric mean of the largest good and the smallest failing score"
    else:
        entry["agreement"] = dict(
            agreement,
            threshold=agree_t,
            metric="Dice between the median labels and the baseline's mask, both on the model's grid",
        )
        entry["calibrated_on"] = {
            g: {
                n: {
                    "score": round(q["score"], 5),
                    "agreement": round(min(q["agreement"].values()), 3) if q.get("agreement") else None,
                    "flagged_by": _flags(q, spread_t, agree_t, DEFAULT_MAX_FRACTION),
                }
                for n, q in c.items()
            }
            for g, c in measured.items()
        }
        entry["rule"] = (
            "spread: half-way between the largest good score and the nearest failing score above it; agreement: "
            "half-way between the lowest good agreement and the nearest failing case below it that the spread "
            "misses (arithmetic means); a result is flagged when either signal flags it"
        )
        entry["missed"] = [n for n, v in entry["calibrated_on"]["failing"].items() if not v["flagged_by"]]
    entry["nothing_segmented"] = [n for c in measured.values() for n, q in c.items() if not q["segmented"]]
    return entry


if __name__ == "__main__":
    main()
