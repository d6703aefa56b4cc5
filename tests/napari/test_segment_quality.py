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
