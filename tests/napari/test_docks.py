"""The three docks on a 1366x768 laptop screen: they scroll, fold advanced settings away, elide
long status lines (whole text in the tooltip), and a closed dock stops its run."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.napari

from napari_helpers import wait as _wait  # noqa: E402


def _docks(viewer):
    from napari_octreenca.widgets.inspector_widget import InspectorWidget
    from napari_octreenca.widgets.segment_widget import SegmentWidget
    from napari_octreenca.widgets.training_widget import TrainingWidget

    widgets = [SegmentWidget(viewer), InspectorWidget(viewer), TrainingWidget(viewer)]
    docks = [viewer.window.add_dock_widget(w, name=type(w).__name__, area="right") for w in widgets]
    return widgets, docks


def test_three_docks_fit_a_laptop_screen(make_napari_viewer, qtbot, rgb_image):
    from qtpy.QtWidgets import QApplication, QScrollArea

    viewer = make_napari_viewer(show=True)
    viewer.add_image(rgb_image, rgb=True, name="he")
    window = viewer.window._qt_window
    window.resize(1366, 768)
    widgets, docks = _docks(viewer)
    QApplication.processEvents()
    qtbot.wait(200)
    assert window.height() <= 768 and window.width() <= 1366, (window.width(), window.height())
    for w in widgets:
        assert isinstance(w.native, QScrollArea)  # napari docks the scroll area
        assert not w.advanced.visible and not w.show_advanced.value  # advanced settings folded away
        # Small enough that the three share the screen's height...
        assert w.native.minimumSizeHint().height() <= 200
        # ...nothing cut off at the right (no horizontal scrolling in a dock)...
        assert w.body.width() <= w.native.viewport().width(), (type(w).__name__, w.body.width())
        assert w.native.minimumWidth() <= 420, w.native.minimumWidth()
        # ...and the main button can be scrolled to and clicked.
        w.native.ensureWidgetVisible(w.run_button.native)
        QApplication.processEvents()
        assert not w.run_button.native.visibleRegion().isEmpty(), type(w).__name__
    # The folded main controls of the segment dock alone fit under a title bar on 768 px...
    seg = widgets[0]
    seg.model.value = "he_epidermis"
    QApplication.processEvents()
    assert seg.body.sizeHint().height() <= 420, seg.body.sizeHint().height()
    # ...also with the word-wrapped "baseline did better" notice (its sizeHint assumes a narrow
    # label; what counts is the height at the dock's width).
    seg.model.value = "brain_mri"
    QApplication.processEvents()
    assert not seg.advice.native.isHidden()
    assert seg.body.heightForWidth(seg.body.width()) <= 420, seg.body.heightForWidth(seg.body.width())
    seg.show_advanced.value = True
    assert seg.advanced.visible


def test_long_status_lines_elide_with_a_tooltip(viewer):
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w)
    text = "tiled: 64 tiles of 1024 cells, about 1.2 GB each on cuda:0 (whole image would need 80.0 GB)"
    w.status.native.resize(120, 20)
    w.status.value = text
    assert w.status.value == text and w.status.native.toolTip() == text
    assert w.status.shown_text.endswith("…") and len(w.status.shown_text) < len(text)
    assert w.status.native.sizeHint().width() <= 200 or w.status.native.minimumSizeHint().width() <= 100


def test_uncertainty_only_with_an_ensemble(viewer):
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    w = SegmentWidget(viewer)
    w.runs.value = 1
    assert not w.uncertainty.enabled and not w.uncertainty.value
    w.runs.value = 3
    assert w.uncertainty.enabled and w.uncertainty.value
    w.runs.value = 1
    assert not w.uncertainty.enabled and not w.uncertainty.value


def test_closing_the_segment_dock_cancels_its_run(viewer, qtbot, catalog, model_file_slow, rgb_image):
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    name = catalog.add(model_file_slow)
    viewer.add_image(rgb_image, rgb=True, name="he")
    w = SegmentWidget(viewer)
    dock = viewer.window.add_dock_widget(w, name="Segment")
    w.model.value = name
    job = w.start()
    qtbot.waitUntil(lambda: w.bar_step.value > 1, timeout=60000)
    viewer.window.remove_dock_widget(dock)  # what the dock's close button does
    _wait(qtbot, job, 30)
    assert job.cancelled
    assert [ly.name for ly in viewer.layers] == ["he"]


def test_docks_load_the_engine_before_the_first_run(viewer, qtbot, monkeypatch):
    """Opening the Segment or inspector dock starts the engine warm-up in a background thread
    (once per process): the first run then starts with the kernels and pandas loaded. The Train
    dock warms the training step's kernels the same way."""
    import sys

    from napari_octreenca.run.warmup import warmed_up
    from napari_octreenca.widgets import _workers

    monkeypatch.setenv(_workers.WARM_UP_ENV, "1")  # the other tests run with it off
    widgets, docks = _docks(viewer)  # Segment, inspector and Train, docked as napari does
    thread = _workers.warm_up_in_background()
    assert thread.name == "octreenca-warm-up-inference"
    assert _workers.warm_up_in_background() is thread  # one per process, whichever dock asked
    training = _workers.warm_up_in_background(training=True)
    assert training is not thread and training.name == "octreenca-warm-up-training"
    # A fresh install compiles the kernels here (no numba cache yet): minutes on 2 cores.
    qtbot.waitUntil(lambda: not thread.is_alive() and not training.is_alive(), timeout=600_000)
    assert warmed_up("cpu") and warmed_up("cpu", training=True) and "pandas" in sys.modules
    assert len(widgets) == len(docks) == 3
    monkeypatch.setenv(_workers.WARM_UP_ENV, "0")
    off = _workers.warm_up_in_background()
    off.join(5)
    assert off.name.endswith("-off") and not off.is_alive()  # turned off: nothing loads


def test_docks_show_napari_layer_types_once_before_the_first_run(make_napari_viewer, qtbot, monkeypatch, rgb_image):
    """Opening a dock shows a tiny layer of each type the viewer lacks for a moment (napari builds
    a type's Qt controls, visual and shaders on its first layer, which stalled the first run's
    results), then removes it: once per viewer, the user's layers, selection and extent
    unchanged, and never offered as a dock's input."""
    from napari.layers import Labels

    from napari_octreenca.widgets import _workers
    from napari_octreenca.widgets.segment_widget import SegmentWidget
    from napari_octreenca.widgets.shared import WARM_UP_LAYER

    monkeypatch.setenv(_workers.WARM_UP_ENV, "1")
    monkeypatch.setattr("napari_octreenca.widgets.segment_widget.warm_up_in_background", lambda: None)  # layers only
    viewer = make_napari_viewer(show=True)
    he = viewer.add_image(rgb_image, rgb=True, name="he", scale=(0.5, 0.5), translate=(10, 20))
    extent = np.asarray(viewer.layers.extent.world).copy()
    viewer.layers.selection.active = he
    shown: list[tuple[type, str, bool]] = []
    viewer.layers.events.inserted.connect(
        lambda e: shown.append((type(e.value), e.value.name, WARM_UP_LAYER in e.value.metadata))
    )
    w = SegmentWidget(viewer)
    offered: list[list[str]] = []
    viewer.layers.events.inserted.connect(lambda e: offered.append([c.name for c in w.image.choices if c is not None]))
    viewer.window.add_dock_widget(w)

    def warm_layers() -> list:
        return [ly for ly in viewer.layers if WARM_UP_LAYER in ly.metadata]

    qtbot.waitUntil(lambda: len(shown) == 1 and not warm_layers())
    assert shown == [(Labels, "octreenca warm-up", True)]  # the viewer shows an Image already
    assert [ly.name for ly in viewer.layers] == ["he"]
    assert viewer.layers.selection.active is he and set(viewer.layers.selection) == {he}
    np.testing.assert_array_equal(np.asarray(viewer.layers.extent.world), extent)
    assert offered == [["he"]]
    w2 = SegmentWidget(viewer)  # once per viewer: another dock shows nothing more
    viewer.window.add_dock_widget(w2)
    qtbot.wait(300)
    assert len(shown) == 1
    # An empty viewer gets both types; turned off, nothing.
    empty = make_napari_viewer(show=True)
    types: list[type] = []
    empty.layers.events.inserted.connect(lambda e: types.append(type(e.value)))
    done: list[bool] = []
    assert _workers.warm_up_layers(empty, w2.native, on_done=lambda: done.append(True))
    qtbot.waitUntil(lambda: bool(done))
    assert sorted(t.__name__ for t in types) == ["Image", "Labels"] and len(empty.layers) == 0
    # A dock closed while its warm-up layers are shown leaves none behind.
    from qtpy.QtWidgets import QWidget

    closing, owner = make_napari_viewer(show=True), QWidget()
    assert _workers.warm_up_layers(closing, owner)
    qtbot.waitUntil(lambda: len(closing.layers) == 2)
    owner.deleteLater()
    qtbot.waitUntil(lambda: len(closing.layers) == 0)
    monkeypatch.setenv(_workers.WARM_UP_LAYERS_ENV, "0")
    off = make_napari_viewer(show=True)
    assert not _workers.warm_up_layers(off, w2.native)
