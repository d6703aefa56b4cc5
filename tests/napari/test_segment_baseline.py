"""The Segment dock suggests the classical baseline when the chosen model's own held-out comparison
(stored in its model file) says the baseline did better on a held-out input (the brain sample's
head scan), and switches to it in one click."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.napari

from napari_helpers import wait as _wait  # noqa: E402

NOTICE = "On 1 of 2 held-out scans the Otsu baseline did better (Dice 0.95 vs 0.92): use it?"


def _open_brain_sample(viewer):
    from napari_octreenca.data_sources import brain_paths

    try:
        t1, _ = brain_paths("small")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    if "KmeansTest" not in t1.name:
        pytest.skip("the ITK example subject (the card's held-out scan) is not installed")
    viewer.open_sample("napari-octreenca", "brain_mri")
    return viewer.layers["brain MRI (T1)"], viewer.layers["brain mask (reference)"]


def test_dock_suggests_and_runs_the_better_baseline(viewer, qtbot):
    """The brain sample pre-selects brain_mri: the notice shows the card's figures; its button
    switches the model to otsu-brain, which segments the scan (Dice 0.952 against the sample's mask,
    the card's baseline figure) with the layers on the scan's grid."""
    from napari_octreenca.run.training import hard_dice
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    scan, mask = _open_brain_sample(viewer)
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.image.value = scan
    assert w.model.value == "brain_mri"
    assert not w.advice.native.isHidden() and w.advice_text.value == NOTICE
    assert w.use_baseline.text == "use otsu-brain"
    assert "head scan: Dice 0.952 vs 0.923" in w.advice_text.tooltip
    assert "skull-stripped: Dice 0.966 vs 0.974" in w.advice_text.tooltip
    w.use_baseline.native.click()
    assert w.model.value == "otsu-brain"
    assert w.advice.native.isHidden()
    assert w.plan.value.startswith("classical baseline")
    job = w.start()
    _wait(qtbot, job)
    assert job.error is None, job.error
    labels = viewer.layers["brain MRI (T1) labels"]
    assert labels.data.shape == scan.data.shape
    np.testing.assert_allclose(labels.scale, scan.scale)
    assert list(labels.features["class"]) == ["background", "brain"]
    assert labels.metadata["octreenca"]["record"]["baseline"] == "otsu-brain"
    assert w.quality.value == "classical baseline: no quality estimate"
    assert abs(hard_dice(np.asarray(labels.data) == 1, np.asarray(mask.data) > 0) - 0.952) < 0.005


def test_no_notice_for_a_model_that_beats_its_baseline(viewer, catalog, model_file_3d):
    """he_epidermis beat its baseline on held-out data and a model file without a comparison says
    nothing: no notice; back on brain_mri it shows again."""
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    w = SegmentWidget(viewer)
    w.model.value = "brain_mri"
    assert not w.advice.native.isHidden()
    w.model.value = "he_epidermis"
    assert w.advice.native.isHidden()
    w.model.value = catalog.add(model_file_3d)
    assert w.advice.native.isHidden()
    w.model.value = "brain_mri"
    assert not w.advice.native.isHidden() and w.advice_text.value == NOTICE
