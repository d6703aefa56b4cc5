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


def test_a_grow_layer_takes_new_axes_in_place_first(viewer, qtbot):
    """A ``grow`` layer (the inspector's live layer, shown without the level and step axes) takes
    the data with those axes in place, before any new layer is added; a layer not in ``grow``
    with fewer axes is removed and made anew. ``on_placed`` runs in a turn of its own."""
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QWidget

    from napari_octreenca.widgets.shared import place_layers

    live = viewer.add_image(np.zeros((8, 8, 3), np.uint8), rgb=True, name="run RGB", scale=(0.5, 0.5))
    live.visible = False  # hidden by the user while it ran: napari must still learn its new axes
    other = viewer.add_image(np.zeros((8, 8), np.float32), name="run logits")
    assert viewer.dims.ndim == 2
    ticks: list[int] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(1)
    order: list[tuple[str, int]] = []
    viewer.layers.events.inserted.connect(lambda e: order.append((e.value.name, viewer.layers["run RGB"].ndim)))
    owner = QWidget()
    done: list[int] = []
    data = [
        (np.full((3, 5, 8, 8), 0.5, np.float32), {"name": "run logits", "contrast_limits": (0, 1)}, "image"),
        (np.ones((3, 5, 8, 8, 3), np.uint8), {"name": "run RGB", "rgb": True, "scale": (1, 1, 0.5, 0.5)}, "image"),
    ]
    layers = place_layers(
        viewer, data, drop=[live, other], grow=[live], owner=owner, on_placed=lambda: done.append(len(ticks))
    )
    qtbot.waitUntil(lambda: bool(done), timeout=5000)
    timer.stop()
    assert layers[1] is live and live in viewer.layers and live.data.shape == (3, 5, 8, 8, 3)
    assert tuple(live.scale) == (1, 1, 0.5, 0.5) and viewer.dims.ndim == 4 and not live.visible
    assert other not in viewer.layers and layers[0] is not other and layers[0].ndim == 4
    assert order == [("run logits", 4)]  # added after the live layer had grown
    assert done[0] > 0 and len(ticks) >= done[0]
    owner.deleteLater()


def test_a_single_new_layer_waits_a_turn_and_on_placed_another(viewer, qtbot):
    """One new layer alone is added on a later turn too (the run's end is painted first), and
    ``on_placed`` on the turn after it (it had added 25 ms to the last layer's turn)."""
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QWidget

    from napari_octreenca.widgets.shared import place_layers

    ticks: list[int] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(1)
    at_insert: list[int] = []
    viewer.layers.events.inserted.connect(lambda e: at_insert.append(len(ticks)))
    owner = QWidget()
    done: list[int] = []
    place_layers(
        viewer,
        [(np.ones((8, 8), np.uint8), {"name": "labels"}, "labels")],
        owner=owner,
        on_placed=lambda: done.append(len(ticks)),
    )
    assert not at_insert and not done
    qtbot.waitUntil(lambda: bool(done), timeout=5000)
    timer.stop()
    assert len(at_insert) == 1 and done[0] > at_insert[0]  # a tick between the layer and on_placed
    owner.deleteLater()


def test_a_new_layer_with_new_axes_comes_in_two_turns(viewer, qtbot):
    """A new layer that brings the viewer new axes (a first non-live inspector run's evolution)
    is added as one slice first, and takes its whole data and geometry on the next turn (napari
    adding it and its new dims sliders in one turn stalled the GUI 0.16-0.17 s)."""
    from qtpy.QtWidgets import QWidget

    from napari_octreenca.widgets.shared import place_layers

    viewer.add_image(np.zeros((8, 8), np.float32), name="input")
    at_insert: list[tuple[int, int]] = []
    viewer.layers.events.inserted.connect(lambda e: at_insert.append((e.value.ndim, viewer.dims.ndim)))
    owner = QWidget()
    done: list[int] = []
    evo = np.arange(3 * 5 * 8 * 8 * 3, dtype=np.uint8).reshape(3, 5, 8, 8, 3)
    data = [
        (np.ones((8, 8), np.uint8), {"name": "labels"}, "labels"),
        (
            evo,
            {
                "name": "evolution",
                "rgb": True,
                "scale": (1, 1, 0.5, 0.5),
                "translate": (0, 0, 2, 3),
                "axis_labels": ("level", "step", "y", "x"),
                "visible": False,
            },
            "image",
        ),
    ]
    layers = place_layers(viewer, data, owner=owner, on_placed=lambda: done.append(1))
    qtbot.waitUntil(lambda: bool(done), timeout=5000)
    assert at_insert == [(2, 2), (2, 4)]  # the evolution without its lead axes, then the labels
    ly = viewer.layers["evolution"]
    assert layers[1] is ly and ly.ndim == 4 and viewer.dims.ndim == 4
    np.testing.assert_array_equal(ly.data, evo)
    assert tuple(ly.scale) == (1, 1, 0.5, 0.5) and tuple(ly.translate) == (0, 0, 2, 3) and not ly.visible
    assert viewer.dims.axis_labels == ("level", "step", "y", "x")
    # Without an owner (all at once) it comes whole.
    viewer.layers.clear()
    viewer.add_image(np.zeros((8, 8), np.float32), name="input")
    at_insert.clear()
    place_layers(viewer, data[1:])
    assert at_insert == [(4, 4)]
    owner.deleteLater()
