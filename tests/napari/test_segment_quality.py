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


def test_dock_passes_the_held_out_brain_and_flags_a_wrong_voxel_size(viewer, qtbot):
    """The bundled brain model in the Segment dock: the held-out ITK head scan and the same scan
    skull-stripped look reliable; the scan with its voxels given 2x too large (a wrong header: Dice
    0.74) is flagged. The dock shows what run/quality.py returns and stores it with the labels."""
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

    def copy_of(name, data, factor=1.0):
        meta = copy.deepcopy(head.metadata)
        if factor != 1.0:  # a NIfTI header with wrong voxel sizes, as the reader passes it on
            affine = np.asarray(meta["octreenca"]["affine"], float)
            affine[:3, :3] *= factor
            meta["octreenca"]["affine"] = affine.tolist()
        return viewer.add_image(
            data,
            name=name,
            scale=np.asarray(head.scale) * factor,
            translate=head.translate,
            affine=head.affine,
            metadata=meta,
        )

    stripped = copy_of("stripped", np.asarray(head.data) * mask)
    wrong = copy_of("wrong voxel size", np.asarray(head.data), 2.0)
    w = SegmentWidget(viewer)
    w.model.value = "brain_mri"
    w.runs.value = 3
    verdicts = {}
    for layer in (head, stripped, wrong):
        w.image.value = layer
        job = w.start()
        _wait(qtbot, job, 300)
        assert job.error is None, job.error
        verdicts[layer.name] = w.quality.value
        rec = viewer.layers[f"{layer.name} labels"].metadata["octreenca"]["record"]
        assert rec["quality"]["calibrated"] and rec["verdict"] == w.quality.value
    assert verdicts[head.name].startswith("looks reliable"), verdicts
    assert verdicts["stripped"].startswith("looks reliable"), verdicts
    assert verdicts["wrong voxel size"].startswith("unreliable"), verdicts
