"""The bundled brain-extraction model: file, card, and its held-out Dice on the ITK subject."""

from __future__ import annotations

import numpy as np
from models_common import check_file_and_card, close_to_card

from napari_octreenca.data_sources import load_nifti_zyx
from napari_octreenca.run.baselines import otsu_brain_mask
from napari_octreenca.run.resample import segment_at_model_spacing
from napari_octreenca.run.training import hard_dice


def test_brain_model_file_and_card() -> None:
    model, extra = check_file_and_card("brain_mri", "radiology")
    assert model.config.spacing == (3.0, 3.0, 3.0) and model.config.axes == "ZYX"
    assert model.config.class_names == ("brain",)


def test_brain_held_out_dice_matches_card(itk_brain) -> None:
    """The scan as a reader returns it (file order (k, j, i), stored LSA) plus its affine: the
    volume is reoriented to RAS+, resampled to 3 mm, and the labels come back in file order."""
    import nibabel as nib

    model, extra = check_file_and_card("brain_mri", "radiology")
    nii = nib.load(str(itk_brain[0]))
    raw = np.asarray(nii.dataobj, dtype=np.float32).transpose(2, 1, 0)
    raw_truth = np.asarray(nib.load(str(itk_brain[1])).dataobj).transpose(2, 1, 0) > 0
    res = segment_at_model_spacing(model, raw, axes="ZYX", affine=nii.affine)
    assert res.labels.shape == raw.shape == (62, 128, 128)
    close_to_card(hard_dice(res.labels == 1, raw_truth), extra["held_out_metrics"]["dice"])
    img, spacing = load_nifti_zyx(itk_brain[0])
    truth = load_nifti_zyx(itk_brain[1])[0] > 0
    assert img.shape == (128, 62, 128) and spacing == (2.0, 3.0, 2.0)  # RAS+, ZYX
    # The baseline figure on the card is reproducible too.
    close_to_card(hard_dice(otsu_brain_mask(img, spacing), truth), extra["baseline"]["dice"], 1e-3)
    # Most of the volume is not brain: the model must not label everything (or nothing).
    assert 0.05 < float(np.mean(res.labels == 1)) < 0.3


def test_brain_skull_stripped_figure_matches_card(itk_brain) -> None:
    """The card's second held-out figure: the same subject, skull-stripped (the model fails; Otsu does not)."""
    model, extra = check_file_and_card("brain_mri", "radiology")
    img, spacing = load_nifti_zyx(itk_brain[0])
    truth = load_nifti_zyx(itk_brain[1])[0] > 0
    stripped = img * truth
    res = segment_at_model_spacing(model, stripped, spacing, axes="ZYX")
    figures = extra["held_out_metrics_skull_stripped"]
    close_to_card(hard_dice(res.labels == 1, truth), figures["dice"])
    close_to_card(hard_dice(otsu_brain_mask(stripped, spacing), truth), figures["baseline_otsu_dice"], 1e-3)
    assert "otsu-brain" in extra["recommendation"]


def test_brain_quality_passes_the_head_scan_and_flags_another_contrast(itk_brain) -> None:
    """Calibrated by scripts/calibrate_quality.py on Colin27 and other templates, never on this subject;
    the inverted contrast stands for a T2-like scan."""
    model, _ = check_file_and_card("brain_mri", "radiology")
    img, spacing = load_nifti_zyx(itk_brain[0])
    good = segment_at_model_spacing(model, img, spacing, axes="ZYX", runs=3)
    assert good.quality["calibrated"] and not good.quality["flagged"], good.verdict
    assert good.quality["baseline"] == "otsu-brain" and good.quality["agreement"]["brain"] > 0.8
    inverted = np.where(img > 10, 255 - img, 0).astype(np.float32)
    bad = segment_at_model_spacing(model, inverted, spacing, axes="ZYX", runs=3)
    assert bad.quality["flagged"] and bad.verdict.startswith("unreliable"), bad.verdict


def test_brain_quality_flags_the_skull_stripped_scan(itk_brain) -> None:
    """The confident miss (Dice about 0.5, the runs agree: spread below the head scan's) is flagged by
    the second signal, the disagreement with the Otsu baseline; the calibration never saw this subject."""
    model, _ = check_file_and_card("brain_mri", "radiology")
    entry = model.config.provenance["quality"]
    calibrated = [name for group in ("good", "failing") for name in entry["calibrated_on"][group]]
    assert calibrated and not any("ITK" in name for name in calibrated)
    img, spacing = load_nifti_zyx(itk_brain[0])
    truth = load_nifti_zyx(itk_brain[1])[0] > 0
    head = segment_at_model_spacing(model, img, spacing, axes="ZYX", runs=3)
    res = segment_at_model_spacing(model, img * truth, spacing, axes="ZYX", runs=3)
    assert hard_dice(res.labels == 1, truth) < 0.6  # it is a failure ...
    assert res.quality["score"] < head.quality["score"] < entry["threshold"]  # ... the spread cannot see
    assert res.quality["agreement"]["brain"] < entry["agreement"]["threshold"]
    assert res.quality["flagged"] and "disagrees with the otsu-brain baseline" in res.verdict, res.verdict


def test_cli_prints_and_stores_the_skull_stripped_flag(itk_brain, tmp_path, capsys) -> None:
    """`octreenca segment` on the skull-stripped scan (a NIfTI file, as a user has it): FLAGGED on
    stderr with the agreement per label, and the estimate in the output's metadata."""
    import nibabel as nib

    from napari_octreenca.cli import main
    from napari_octreenca.io.writers import read_labels_metadata

    nii = nib.load(str(itk_brain[0]))
    mask = np.asarray(nib.load(str(itk_brain[1])).dataobj) > 0
    stripped = nib.Nifti1Image((np.asarray(nii.dataobj) * mask).astype(np.uint8), nii.affine, nii.header)
    nib.save(stripped, tmp_path / "stripped.nii.gz")
    out = tmp_path / "brain.nii.gz"
    assert main(["segment", str(tmp_path / "stripped.nii.gz"), str(out), "--model", "brain_mri", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "FLAGGED" in err and "agreement with otsu-brain: brain 0.4" in err and "disagrees" in err
    q = read_labels_metadata(out)["quality"]
    assert q["flagged"] and q["agreement"]["brain"] < q["agreement_threshold"]
