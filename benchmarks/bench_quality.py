"""The brain model's quality estimate beside its real Dice: does a flag mean a failure?

For inputs with a known brain mask, prints the spread, the agreement with ``otsu-brain`` (the two
signals of ``run.quality``), the model's Dice against the mask (3-run ensemble, input grid) and the
verdict, as a Markdown table. The thresholds are the ones stored in the model file
(``scripts/calibrate_quality.py``); nothing here changes them. Cases: the Colin27 inputs that
calibrated them (their Dice, which calibration does not need), the held-out ITK subject (head,
skull-stripped, inverted), and ITK variants that neither calibration nor the tests use.

``--he``: why ``he_epidermis`` has no baseline check: the agreement of its results with
``otsu-epidermis`` (on the model's grid, 1/3 resolution) on its good and failing calibration inputs.

    python benchmarks/bench_quality.py [--model models/brain_mri.safetensors]
    python benchmarks/bench_quality.py --he
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from napari_octreenca.data_sources import ITK_DATA, MRICRON, load_nifti_zyx
from napari_octreenca.nca.modelfile import load_model
from napari_octreenca.run.resample import segment_at_model_spacing
from napari_octreenca.run.training import hard_dice

Case = Callable[[], tuple[np.ndarray, tuple[float, ...], np.ndarray]]
MODEL = Path(__file__).resolve().parents[1] / "models" / "brain_mri.safetensors"


def _colin(stripped: bool = False, thick: bool = False, pad_mm: int = 0) -> Case:
    """Colin27 ch2 (or ch2 x its ch2bet mask), optionally at 2x2x3 mm or padded with air."""

    def load() -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
        from scipy import ndimage

        img, sp = load_nifti_zyx(MRICRON / "ch2.nii.gz")
        mask = load_nifti_zyx(MRICRON / "ch2bet.nii.gz")[0] > 0
        if stripped:
            img = img * mask
        if thick:  # as scripts/calibrate_quality.py makes it: blur along the coarser axes, down-sample
            f = [t / s for t, s in zip((3.0, 2.0, 2.0), sp)]
            img = ndimage.zoom(ndimage.gaussian_filter(img, [0.4 * x for x in f]), [1 / x for x in f], order=1)
            mask = ndimage.zoom(mask.astype(np.float32), [1 / x for x in f], order=1) > 0.5
            sp = (3.0, 2.0, 2.0)
        if pad_mm:
            img, mask = np.pad(img, pad_mm), np.pad(mask, pad_mm)
        return img.astype(np.float32), sp, mask

    return load


def _itk(change: str = "") -> Case:
    """The ITK subject (RAS+, ZYX) changed as ``change`` says."""

    def load() -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
        from scipy import ndimage

        img, sp = load_nifti_zyx(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz")
        mask = load_nifti_zyx(ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz")[0] > 0
        rng = np.random.default_rng(1)
        if change == "stripped":
            img = img * mask
        elif change == "inverted":
            img = np.where(img > 10, 255 - img, 0)
        elif change == "noise":
            img = np.clip(img + rng.normal(0, 0.05 * img.max(), img.shape), 0, None)
        elif change == "bias":
            y = np.linspace(-1, 1, img.shape[1])[None, :, None]
            img = img * np.exp(0.35 * y)
        elif change == "top cut":  # the upper 40 % of the slices blanked (a partial field of view)
            keep = np.arange(img.shape[0])[:, None, None] < int(img.shape[0] * 0.6)
            img, mask = np.where(keep, img, 0), mask & keep
        elif change == "stripped, eroded":
            mask = ndimage.binary_erosion(mask, iterations=2)
            img = img * mask
        elif change == "stripped, dilated":  # some skull left around the brain
            img = img * ndimage.binary_dilation(mask, iterations=3)
        return np.asarray(img, np.float32), sp, mask

    return load


CASES: dict[str, Case] = {
    "calibration (good): Colin27 ch2, 1 mm": _colin(),
    "calibration (good): Colin27 ch2 at 2x2x3 mm": _colin(thick=True),
    "calibration (failing): Colin27 ch2bet, 1 mm": _colin(stripped=True),
    "calibration (failing): Colin27 ch2bet, 2x2x3 mm": _colin(stripped=True, thick=True),
    "test: ITK head": _itk(),
    "test: ITK skull-stripped": _itk("stripped"),
    "test: ITK inverted contrast": _itk("inverted"),
    "unused: ITK head, noise 5 %": _itk("noise"),
    "unused: ITK head, bias field": _itk("bias"),
    "unused: ITK head, top 40 % of slices blanked": _itk("top cut"),
    "unused: ITK skull-stripped, mask eroded 2 voxels": _itk("stripped, eroded"),
    "unused: ITK skull-stripped, mask dilated 3 voxels": _itk("stripped, dilated"),
    "unused: Colin27 ch2 padded by 40 mm of air": _colin(pad_mm=40),
}


def he_agreement() -> None:
    """Dice between the H&E model's median labels and the otsu-epidermis mask on the model's grid."""
    from skimage.io import imread

    from napari_octreenca.data_sources import cmu_epidermis_region, skin_sample
    from napari_octreenca.run.baselines import otsu_epidermis_mask
    from napari_octreenca.run.inference import segment
    from napari_octreenca.run.quality import dice
    from napari_octreenca.run.resample import resample_to_model_spacing

    skin = skin_sample()[0][:, 853:]
    t1, _ = load_nifti_zyx(MRICRON / "ch2.nii.gz")
    mri = np.repeat((t1[90] / t1.max() * 255).astype(np.uint8)[..., None], 3, -1)
    davis = Path(__file__).resolve().parents[2] / "shared" / "data" / "davis2016" / "blackswan" / "images"
    cases = {
        "good: skin.tif right third": skin,
        "good: its upper half": skin[:480],
        "good: its lower half": skin[480:],
        "failing: cmu_small_region.svs annotated region": cmu_epidermis_region()[0],
        "failing: Colin27 MRI slice as RGB": mri,
        "failing: DAVIS 2016 blackswan frame 0": imread(sorted(davis.glob("*.jpg"))[0])[..., :3],
    }
    model = load_model(MODEL.with_name("he_epidermis.safetensors"))
    print("| input | agreement with otsu-epidermis |\n|---|---|")
    for name, img in cases.items():
        small = resample_to_model_spacing(img, (1.0, 1.0), model.config.spacing, channel_axis=2)
        small = np.clip(np.rint(small), 0, 255).astype(np.uint8)
        seg = segment(model, small, axes="YXC", runs=3, seed=0)
        print(f"| {name} | {dice(np.asarray(seg.labels) == 1, otsu_epidermis_mask(small)):.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--he", action="store_true", help="the H&E model's agreement with otsu-epidermis instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.he:
        he_agreement()
        return
    model = load_model(args.model)
    print("| input | spread | agreement | model Dice | verdict |\n|---|---|---|---|---|")
    for name, case in CASES.items():
        img, spacing, truth = case()
        seg = segment_at_model_spacing(model, img, spacing, axes="ZYX", runs=3, seed=0)
        q = seg.quality
        agree = q["agreement"]["brain"] if q.get("agreement") else float("nan")
        dice = hard_dice(np.asarray(seg.labels) == 1, truth)
        verdict = "flagged" if q["flagged"] else "reliable"
        print(f"| {name} | {q['score']:.4f} | {agree:.3f} | {dice:.3f} | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
