"""Result layers reach the viewer without long GUI stalls: a new run reuses the previous run's
layers in place (napari removes none: each removal costs it a full gc.collect()), and new layers
are added one per event-loop turn from the GUI thread, the job ending when all are shown."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.napari

from napari_helpers import wait as _wait  # noqa: E402


def _events(viewer) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {"inserted": [], "removed": []}
    viewer.layers.events.inserted.connect(lambda e: seen["inserted"].append(e.value.name))
    viewer.layers.events.removed.connect(lambda e: seen["removed"].append(e.value.name))
    return seen


def test_second_inspector_run_reuses_every_layer(viewer, qtbot, catalog, model_file_2d, rgb_image):
    """Live, twice on a real H&E crop: the second run (another seed's worth of data: a new steps
    setting) shows its recording in the first run's layers; no layer is added or removed."""
    from napari_octreenca.widgets.inspector_widget import InspectorWidget

    viewer.add_image(rgb_image, rgb=True, name="he")
    w = InspectorWidget(viewer)
    w.model.value = catalog.add(model_file_2d)
    assert w.live.value
    _wait(qtbot, w.start())
    first = list(w.result_layers)
    names = [ly.name for ly in viewer.layers]
    w.steps.value = "3, 3, 3, 6"
    seen = _events(viewer)
    job = w.start()
    assert w.live_layers["rgb"] is viewer.layers["he NCA hidden RGB"]  # the live view reuses it too
    _wait(qtbot, job)
    assert job.error is None, job.error
    assert seen == {"inserted": [], "removed": []}
    assert [ly.name for ly in viewer.layers] == names
    assert all(a is b for a, b in zip(w.result_layers, first)) and len(w.result_layers) == len(first)
    evo = viewer.layers["he NCA hidden RGB"]
    assert evo.data.shape[:2] == (4, 6)  # the second run's steps, in the reused layer
    assert evo.metadata["octreenca"]["steps"] == [3, 3, 3, 6]
    np.testing.assert_array_equal(viewer.layers["he NCA labels"].data, w.segmentation.labels)


def test_new_layers_one_per_event_loop_turn(viewer, qtbot):
    """place_layers with an owner: none now (the run's end is painted first), one layer per later
    turn, in the given order
    at the replaced layers' place; on_placed once all are in; a replaced layer of another type or
    number of axes is removed, not reused."""
    from qtpy.QtWidgets import QWidget

    from napari_octreenca.widgets.shared import place_layers

    bottom = viewer.add_image(np.zeros((8, 8)), name="bottom")
    old = viewer.add_image(np.zeros((8, 8)), name="run image")  # becomes a Labels layer: not reusable
    top = viewer.add_image(np.zeros((8, 8)), name="top")
    owner = QWidget()
    done: list[int] = []
    data = [
        (np.ones((8, 8), np.uint8), {"name": "run labels"}, "labels"),
        (np.ones((2, 8, 8), np.float32), {"name": "run image", "contrast_limits": (0, 1)}, "image"),
        (np.ones((8, 8), np.float32), {"name": "run extra", "contrast_limits": (0, 1)}, "image"),
    ]
    added: list[float] = []
    viewer.layers.events.inserted.connect(lambda e: added.append(time.monotonic()))
    layers = place_layers(viewer, data, replace=[old], owner=owner, on_placed=lambda: done.append(1))
    assert old not in viewer.layers and old not in layers
    assert not added and not done  # none yet
    qtbot.waitUntil(lambda: bool(done), timeout=5000)
    assert done == [1]
    assert len(added) == 3 and all(b - a >= 0.01 for a, b in zip(added, added[1:]))  # one per turn
    assert [ly.name for ly in viewer.layers] == ["bottom", "run labels", "run image", "run extra", "top"]
    assert viewer.layers[0] is bottom and viewer.layers[-1] is top
    # Placed again with the same names, types and axes: the same layer objects, new data.
    again = place_layers(
        viewer, [(d * 2, kw, k) for d, kw, k in data], replace=layers, owner=owner, on_placed=lambda: done.append(2)
    )
    qtbot.waitUntil(lambda: len(done) == 2, timeout=5000)
    assert all(a is b for a, b in zip(again, layers))
    assert int(viewer.layers["run labels"].data.max()) == 2
    owner.deleteLater()


def test_other_timers_run_between_added_layers(viewer, qtbot):
    """Between two layers added in turn the event loop runs other timers (and repaints): a
    zero-interval timer had run all the additions back to back, a first run's 7 layers
    blocking the GUI for 377 ms."""
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QWidget

    from napari_octreenca.widgets.shared import place_layers

    ticks: list[int] = []
    at_insert: list[int] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(1)
    viewer.layers.events.inserted.connect(lambda e: at_insert.append(len(ticks)))
    owner = QWidget()
    done: list[int] = []
    data = [
        (np.zeros((8, 8), np.float32), {"name": f"layer {i}", "contrast_limits": (0, 1)}, "image") for i in range(4)
    ]
    place_layers(viewer, data, owner=owner, on_placed=lambda: done.append(1))
    qtbot.waitUntil(lambda: bool(done), timeout=5000)
    timer.stop()
    assert len(at_insert) == 4
    assert all(b > a for a, b in zip(at_insert, at_insert[1:])), at_insert  # a tick between every two
    owner.deleteLater()
