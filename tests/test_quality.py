"""The quality estimate: the spread between stochastic runs, calibrated per model, flags failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_model

from napari_octreenca.cli import main
from napari_octreenca.run.quality import (
    DEFAULT_THRESHOLD,
    Agreement,
    assess,
    baseline_agreement,
    calibrate_threshold,
    label_scores,
    one_sided_threshold,
)

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_scores_measure_disagreement_between_runs() -> None:
    one = torch.full((2, 8, 8), -3.0)
    one[0, :4] = 3.0  # class a on the top half
    agree = [one.clone() for _ in range(3)]
    assert label_scores(agree, ("a", "b")) == {"a": 0.0, "b": 0.0}
    q = assess(agree, ("a", "b"), {"threshold": 0.01})
    assert not q.flagged and q.calibrated and q.verdict.startswith("looks reliable")
    rng = np.random.default_rng(0)
    noisy = [torch.from_numpy(rng.normal(0, 3, (2, 8, 8)).astype(np.float32)) for _ in range(3)]
    q = assess(noisy, ("a", "b"), {"threshold": 0.01})
    assert q.flagged and q.score > 0.1 and q.verdict.startswith("unreliable")
    assert set(q.per_label) == {"a", "b"} and q.score == max(q.per_label.values())


def test_a_label_covering_almost_everything_is_flagged() -> None:
    everything = [torch.full((1, 10, 10), 4.0)] * 3  # the runs agree: no spread at all
    q = assess(everything, ("epidermis",), {"threshold": 0.01})
    assert q.score == 0.0 and q.coverage == {"epidermis": 1.0}
    assert q.flagged and q.verdict.startswith("implausible: epidermis covers 100%")
    half = torch.full((1, 10, 10), -4.0)
    half[:, :5] = 4.0
    assert not assess([half] * 3, ("epidermis",), {"threshold": 0.01}).flagged
    assert assess([half] * 3, ("epidermis",), {"threshold": 0.01, "max_fraction": 0.4}).flagged


def test_a_calibrated_coverage_floor_flags_almost_nothing_segmented() -> None:
    """A model whose every good result covers a good share of the image (the video model: there is
    always an object) may set min_fraction: a result below it is flagged, with the share in the
    verdict; without the entry nothing changes."""
    one = torch.full((1, 20, 20), -4.0)
    one[:, 0, 0] = 4.0  # one voxel of 400, and the runs agree on it
    q = assess([one] * 3, ("object",), {"threshold": 0.01, "min_fraction": 0.005})
    assert q.segmented and q.flagged and q.min_fraction == 0.005
    assert q.verdict.startswith("almost nothing was segmented: object covers 0.25%")
    assert not assess([one] * 3, ("object",), {"threshold": 0.01}).flagged
    assert not assess([one] * 3, ("object",), {"threshold": 0.01, "min_fraction": 0.002}).flagged


def test_nothing_segmented_is_flagged_and_default_threshold_is_said() -> None:
    q = assess([torch.full((1, 4, 4), -5.0)] * 2, ("brain",), None)
    assert q.flagged and not q.segmented and "nothing was segmented" in q.verdict
    some = torch.full((1, 4, 4), -5.0)
    some[:, 1:3, 1:3] = 5.0
    q = assess([some] * 2, ("brain",), None)
    assert q.threshold == DEFAULT_THRESHOLD and "not calibrated" in q.verdict


def test_assess_needs_two_runs_and_threshold_needs_separable_groups() -> None:
    with pytest.raises(ValueError, match="at least 2 runs"):
        assess([torch.zeros(1, 4, 4)], ("a",))
    assert 0.01 < calibrate_threshold([0.004, 0.006], [0.03, 0.04]) < 0.03
    with pytest.raises(ValueError, match="overlap"):
        calibrate_threshold([0.02], [0.01])


def test_disagreement_with_the_baseline_flags_a_confident_result() -> None:
    """The runs agree perfectly (spread 0), yet the result is far from the baseline's: flagged."""
    half = torch.full((1, 10, 10), -4.0)
    half[:, :5] = 4.0
    calib = {"threshold": 0.01}
    miss = assess([half] * 3, ("brain",), calib, Agreement("otsu-brain", "brain", 0.48, 0.775))
    assert miss.score == 0.0 and miss.flagged and miss.verdict.startswith("unreliable")
    assert "disagrees with the otsu-brain baseline (brain: Dice 0.480 < 0.775)" in miss.verdict
    assert miss.agreement == {"brain": 0.48} and miss.agreement_threshold == 0.775 and miss.baseline == "otsu-brain"
    fine = assess([half] * 3, ("brain",), calib, Agreement("otsu-brain", "brain", 0.82, 0.775))
    assert not fine.flagged and "agrees with the otsu-brain baseline (Dice 0.820 >= 0.775)" in fine.verdict
    assert assess([half] * 3, ("brain",), calib).agreement is None


def test_baseline_agreement_is_the_dice_with_the_baseline_mask() -> None:
    from napari_octreenca.run.baselines import otsu_brain_mask

    zz, yy, xx = np.mgrid[:40, :48, :44]
    head = ((zz - 20) ** 2 + (yy - 24) ** 2 + (xx - 22) ** 2 < 17**2) * 60.0  # scalp
    brain = (zz - 20) ** 2 + (yy - 24) ** 2 + (xx - 22) ** 2 < 12**2
    img = np.where(brain, 200.0, head).astype(np.float32)
    img[(zz - 20) ** 2 + (yy - 24) ** 2 + (xx - 22) ** 2 < 3**2] = 120.0
    mask = otsu_brain_mask(img, (3.0, 3.0, 3.0))
    entry = {"baseline": "otsu-brain", "label": "brain", "threshold": 0.7}
    same = baseline_agreement(mask.astype(np.uint8), img, "ZYX", (3.0, 3.0, 3.0), ("brain",), entry)
    assert same.dice == 1.0 and same.threshold == 0.7
    core = brain & (zz < 20)  # labels only half of it
    half = baseline_agreement(core.astype(np.uint8), img, "ZYX", (3.0, 3.0, 3.0), ("brain",), entry)
    expected = 2 * (core & mask).sum() / (core.sum() + mask.sum())
    assert half.dice == pytest.approx(expected) and half.dice < 0.7


def test_one_sided_thresholds_leave_the_blind_spot_to_the_other_signal() -> None:
    t, caught = one_sided_threshold([0.02, 0.03], [0.01, 0.05, 0.04], flag_above=True)
    assert t == pytest.approx(0.035) and caught == [1, 2]
    t, caught = one_sided_threshold([0.85, 0.9], [0.7, 0.5, 0.88], flag_above=False)
    assert t == pytest.approx(0.775) and caught == [0, 1]
    with pytest.raises(ValueError, match="separates none"):
        one_sided_threshold([0.9], [0.95], flag_above=False)


def test_segment_checks_the_baseline_the_calibration_names() -> None:
    """A model whose calibration names a baseline gets its agreement, in the input's axis order and
    spacing (the radiology preset runs YXZ; the input is ZYX)."""
    from napari_octreenca import segment
    from napari_octreenca.run.baselines import otsu_brain_mask

    m = random_model("radiology", seed=3, spacing=(2.0, 1.0, 3.0))  # Y, X, Z in mm
    entry = {"baseline": "otsu-brain", "label": "foreground", "threshold": 0.5}
    m.config = m.config.replace(provenance={"quality": {"threshold": 1.0, "agreement": entry}})
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:24, :28, :20]
    img = np.where((zz - 12) ** 2 + (yy - 14) ** 2 + (xx - 10) ** 2 < 64, 200.0, 20.0) + rng.normal(0, 5, zz.shape)
    seg = segment(m, img.astype(np.float32), axes="ZYX", runs=2)
    q = seg.quality
    assert q["baseline"] == "otsu-brain" and q["agreement_threshold"] == 0.5
    mask = otsu_brain_mask(img.astype(np.float32), (3.0, 2.0, 1.0))  # Z, Y, X
    ours = np.asarray(seg.labels) == 1
    expected = 2 * (ours & mask).sum() / max(1, ours.sum() + mask.sum())
    assert q["agreement"]["foreground"] == pytest.approx(expected)
    assert q["agreement"]["foreground"] < 0.5 and q["flagged"]  # the random model misses the ball
    assert "disagrees with the otsu-brain baseline (foreground: Dice" in q["verdict"]


def test_segment_records_quality_only_for_ensembles() -> None:
    from napari_octreenca import segment

    m = random_model("pathology", seed=1)
    img = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    one = segment(m, img, runs=1)
    assert one.quality is None and one.verdict.startswith("not estimated")
    three = segment(m, img, runs=3)
    assert three.quality["runs"] == 3 and three.record["quality"] == three.quality
    assert isinstance(three.verdict, str) and three.verdict == three.quality["verdict"]


def _skin() -> tuple[np.ndarray, np.ndarray]:
    try:
        from napari_octreenca.data_sources import skin_sample

        return skin_sample()
    except FileNotFoundError as exc:
        pytest.skip(f"H&E sample not installed: {exc}")


def test_he_model_passes_held_out_skin_and_flags_an_mri_slice() -> None:
    """Calibrated on skin.tif's right third, cmu_small_region.svs, a Colin27 slice and a DAVIS frame
    (scripts/calibrate_quality.py); the MRI slice here is another subject (ITK), never calibrated on.
    (Its spread alone is low, 0.008 < 0.0128: the model labels nearly all of it, confidently; this
    case is why the coverage check exists, so it is not an independent test of that check.)"""
    from napari_octreenca.data_sources import ITK_DATA, load_nifti_zyx
    from napari_octreenca.nca.modelfile import load_model
    from napari_octreenca.run.resample import segment_at_model_spacing

    skin, _ = _skin()
    itk = ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz"
    if not itk.exists():
        pytest.skip("insighttoolkit5-examples not installed")
    model = load_model(MODELS / "he_epidermis.safetensors")
    assert model.config.provenance["quality"]["threshold"] > 0
    good = segment_at_model_spacing(model, skin[:, 853:], (1.0, 1.0), axes="YXC", runs=3)
    assert not good.quality["flagged"], good.verdict
    vol, _ = load_nifti_zyx(itk)
    sl = (vol[:, 31] / vol.max() * 255).astype(np.uint8)  # a coronal slice, (Z, X)
    rgb = np.repeat(np.repeat(np.repeat(sl[..., None], 3, -1), 4, 0), 4, 1)
    bad = segment_at_model_spacing(model, rgb, (1.0, 1.0), axes="YXC", runs=3)
    assert bad.quality["flagged"], bad.verdict
    assert bad.verdict.startswith("implausible") and bad.quality["score"] > good.quality["score"]


def test_cli_prints_quality_and_stores_it_in_the_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from skimage.io import imsave

    from napari_octreenca.io.writers import read_labels_metadata

    skin, _ = _skin()
    imsave(tmp_path / "skin.png", skin[:480, 853:], check_contrast=False)
    assert (
        main(["segment", str(tmp_path / "skin.png"), str(tmp_path / "out.png"), "--model", "he_epidermis", "--quiet"])
        == 0
    )
    err = capsys.readouterr().err
    assert "quality:" in err and "looks reliable" in err
    meta = read_labels_metadata(tmp_path / "out.png")
    assert meta["model"] == "he_epidermis" and meta["quality"]["runs"] == 3 and not meta["quality"]["flagged"]


@pytest.mark.parametrize("suffix", [".nii.gz", ".tif", ".png", ".zarr"])
def test_labels_metadata_round_trip(tmp_path: Path, suffix: str) -> None:
    from napari_octreenca.io.writers import read_labels_metadata, write_labels

    labels = np.zeros((16, 20), np.uint8)
    labels[4:9, 5:12] = 1
    meta = {"model": "m", "quality": {"score": 0.012, "flagged": True, "verdict": "unreliable: ..."}}
    path = write_labels(tmp_path / f"out{suffix}", labels, class_names=("fg",), metadata=meta)
    assert read_labels_metadata(path) == meta
    plain = write_labels(tmp_path / f"plain{suffix}", labels, class_names=("fg",))
    assert read_labels_metadata(plain) == {}


def test_cli_info_shows_the_calibration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "he_epidermis"]) == 0
    assert "quality:      flagged above 0.01279" in capsys.readouterr().out
