"""The Segment widget shows the quality verdict of an ensemble run and stores it in the record."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.napari

from napari_helpers import wait as _wait  # noqa: E402


def test_widget_shows_the_verdict(viewer, qtbot, catalog, model_file_2d):
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    name = catalog.add(model_file_2d)
    img = viewer.add_image(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8), rgb=True, name="img")
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.image.value = img
    w.model.value = name
    w.runs.value = 1
    _wait(qtbot, w.start())
    assert w.quality.value.startswith("not estimated")
    w.runs.value = 3
    _wait(qtbot, w.start())
    last_labels = [layer for layer in viewer.layers if type(layer).__name__ == "Labels"][-1]
    rec = last_labels.metadata["octreenca"]["record"]
    assert rec["quality"]["runs"] == 3 and rec["verdict"] == w.quality.value
    assert w.quality.value.startswith(("looks reliable", "unreliable", "nothing was segmented"))


def test_dock_flags_the_skull_stripped_brain_and_passes_the_head(viewer, qtbot):
    """The bundled brain model in the Segment dock: the held-out ITK head scan looks reliable; the
    same scan skull-stripped (a confident miss the spread cannot see) is flagged by its disagreement
    with the Otsu baseline. The dock shows what run/quality.py returns."""
    import copy

    from napari_octreenca.data_sources import ITK_DATA
    from napari_octreenca.widgets._models import CATALOG
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    if not (ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz").exists():
        pytest.skip("insighttoolkit5-examples not installed (apt-get install insighttoolkit5-examples)")
    if "brain_mri" not in CATALOG.names():
        pytest.skip("bundled model brain_mri is not installed")
    viewer.open_sample("napari-octreenca", "brain_mri")
    head = viewer.layers["brain MRI (T1)"]
    mask = np.asarray(viewer.layers["brain mask (reference)"].data) > 0
    stripped = viewer.add_image(
        np.asarray(head.data) * mask,
        name="stripped",
        scale=head.scale,
        translate=head.translate,
        affine=head.affine,
        metadata=copy.deepcopy(head.metadata),
    )
    w = SegmentWidget(viewer)
    w.model.value = "brain_mri"
    w.runs.value = 3
    verdicts = {}
    for layer in (head, stripped):
        w.image.value = layer
        job = w.start()
        _wait(qtbot, job, 300)
        assert job.error is None, job.error
        verdicts[layer.name] = w.quality.value
        rec = viewer.layers[f"{layer.name} labels"].metadata["octreenca"]["record"]
        assert rec["quality"]["baseline"] == "otsu-brain" and rec["verdict"] == w.quality.value
    assert verdicts[head.name].startswith("looks reliable") and "agrees with the otsu-brain" in verdicts[head.name]
    assert verdicts["stripped"].startswith("unreliable") and "disagrees with the otsu-brain" in verdicts["stripped"]
