"""The NCA inspector widget end to end in a real napari viewer (Qt under Xvfb).

Deselect with ``-m "not napari"`` where there is no X server.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.napari


from napari_helpers import wait as _wait  # noqa: E402


def test_inspector_layers_for_every_level_and_step_axis(viewer, qtbot, catalog, model_file_2d, rgb_image):
    from napari_octreenca import read_config
    from napari_octreenca.widgets.inspector_widget import InspectorWidget

    name = catalog.add(model_file_2d)
    cfg = read_config(model_file_2d)
    viewer.add_image(rgb_image, rgb=True, name="he", scale=(0.25, 0.25))
    w = InspectorWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.model.value = name
    assert w.steps.value == "3, 3, 3, 4"
    w.steps.value = "3, 3, 3, 6"  # more test-time steps at the coarsest level
    assert "15 steps" in w.memory.value and "MB" in w.memory.value
    seen: list[str] = []
    viewer.layers.events.inserted.connect(lambda e: seen.append(e.value.name))
    job = w.start()
    # Live mode shows the evolving state during the run in the run's own evolution layer. A
    # session's first run adds that one layer at the click, without the level and step axes (new
    # dims sliders made that click stall the GUI 0.17 s instead of 0.1 s)...
    live = w.live_layers["rgb"]
    assert live.name == "he NCA hidden RGB" and live in viewer.layers
    assert seen == ["he NCA hidden RGB"] and live.ndim == 2 and viewer.dims.ndim == 2
    assert tuple(live.scale) == (0.25, 0.25)
    _wait(qtbot, job)
    assert job.error is None
    # ...which takes the full recording, and those axes, at the end: nothing added twice, nothing removed.
    assert viewer.layers["he NCA hidden RGB"] is live and live.ndim == 4
    assert tuple(live.scale) == (1.0, 1.0, 0.25, 0.25)
    assert sorted(seen) == sorted(ly.name for ly in viewer.layers if ly.name != "he")
    shapes = cfg.level_shapes(rgb_image.shape[:2])
    for level in range(cfg.levels):
        layer = viewer.layers[f"he NCA L{level} hidden"]
        assert layer.data.shape == shapes[level]  # one hidden channel at a time: no channel axis
        f = 2**level
        assert tuple(layer.scale) == (0.25 * f, 0.25 * f)
        assert tuple(layer.translate) == ((f - 1) / 2 * 0.25,) * 2
    evo = viewer.layers["he NCA hidden RGB"]
    logits = viewer.layers["he NCA logits"]
    assert evo.data.shape == (4, 6) + rgb_image.shape[:2] + (3,)  # (level, step in level, Y, X, RGB)
    assert logits.data.shape == (4, 6) + rgb_image.shape[:2]
    assert viewer.dims.axis_labels[:2] == ("level", "step") and "channel" not in viewer.dims.axis_labels
    assert viewer.dims.nsteps[:2] == (4, 6)
    assert viewer.dims.point[:2] == (0, 2)  # the result: finest level, its last step
    # The shown evolution frame is the model's result: its logits give the segment labels.
    from napari_octreenca import labels_from_logits, load_model, segment

    ref = segment(load_model(model_file_2d), rgb_image, steps=[3, 3, 3, 6])
    final = np.asarray(logits.data[0, 2])
    np.testing.assert_allclose(final, ref.logits[0], atol=1e-5)
    np.testing.assert_array_equal(labels_from_logits(final[None]), ref.labels)
    conv = evo.metadata["octreenca"]["convergence"]
    assert [len(conv[lv]) for lv in range(cfg.levels)] == [3, 3, 3, 6]
    # The plot was set up once and got every level's curve by appending data.
    assert w.plot.builds == 1
    assert [len(w.plot.curve(lv)[0]) for lv in range(cfg.levels)] == [3, 3, 3, 6]
    assert w.plot.curve(3)[0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # coarsest level first on the time line
    assert w.plot.curve(0)[0].tolist() == [13.0, 14.0, 15.0]
    # A plain-words reading per level, coarsest first.
    assert [r.level for r in w.readings] == [3, 2, 1, 0]
    assert w.status.value.startswith("L3: labels ") and "(trained for 4)" in w.status.value
    assert w.status.native.toolTip() == w.status.value  # the whole text, however narrow the dock


def test_inspector_cancel_leaves_no_layer(viewer, qtbot, catalog, model_file_slow, rgb_image):
    from napari_octreenca.widgets.inspector_widget import InspectorWidget

    name = catalog.add(model_file_slow)
    viewer.add_image(rgb_image, rgb=True, name="he")
    w = InspectorWidget(viewer)
    w.model.value = name
    w.interval.value = 20
    job = w.start()
    qtbot.waitUntil(lambda: w.bar.value > 0, timeout=60000)
    assert "he NCA hidden RGB" in viewer.layers  # the live view
    w.request_cancel()
    _wait(qtbot, job, 30)
    assert job.cancelled
    assert [ly.name for ly in viewer.layers] == ["he"]


def test_inspector_on_a_pyramid_level(viewer, qtbot, catalog, model_file_2d, rgb_image):
    """Multiscale input: record on a coarser level; layers land at that level's geometry."""
    from napari_octreenca.widgets.inspector_widget import InspectorWidget

    name = catalog.add(model_file_2d)
    levels = [rgb_image, rgb_image[::2, ::2]]
    viewer.add_image(levels, rgb=True, multiscale=True, name="pyr", scale=(0.5, 0.5))
    w = InspectorWidget(viewer)
    w.model.value = name
    w.level.value = 1
    w.live.value = False
    job = w.start()
    _wait(qtbot, job)
    assert job.error is None, job.error
    rgb = viewer.layers["pyr NCA hidden RGB"]
    assert rgb.data.shape[2:4] == levels[1].shape[:2]
    assert tuple(rgb.scale[2:]) == (1.0, 1.0)  # level-1 pixels are 2 x 0.5
    l0 = viewer.layers["pyr NCA L0 hidden"]
    assert l0.data.shape == levels[1].shape[:2]


def test_inspector_records_the_visible_region(make_napari_viewer, qtbot, catalog, model_file_2d, rgb_image):
    """Zoomed in, 'visible region only' records the part on screen at full resolution."""
    from napari_octreenca.widgets.inspector_widget import InspectorWidget, visible_region

    viewer = make_napari_viewer(show=True)  # the canvas must draw for napari to know what is visible
    name = catalog.add(model_file_2d)
    layer = viewer.add_image(rgb_image, rgb=True, name="he")
    viewer.window._qt_window.resize(800, 600)
    viewer.camera.center = (48, 64)
    viewer.camera.zoom = 12

    def zoomed_in() -> bool:
        region = visible_region(layer)
        return region is not None and region[0][1] - region[0][0] < 90

    qtbot.waitUntil(zoomed_in, timeout=10000)
    (y0, y1), (x0, x1) = visible_region(layer)
    assert 0 <= y0 < 48 < y1 <= 96 and 0 <= x0 < 64 < x1 <= 128
    w = InspectorWidget(viewer)
    w.model.value = name
    w.visible_only.value = True
    w.live.value = False
    job = w.start()
    _wait(qtbot, job)
    assert job.error is None, job.error
    logits = viewer.layers["he NCA logits"]
    assert logits.data.shape[2:] == (y1 - y0, x1 - x0)
    assert tuple(logits.translate[2:]) == (float(y0), float(x0))
    from napari_octreenca import load_model, segment

    ref = segment(load_model(model_file_2d), rgb_image)
    np.testing.assert_allclose(np.asarray(logits.data[0, 2]), ref.logits[0, y0:y1, x0:x1], atol=1e-5)


def test_inspector_runs_exactly_what_segment_runs_on_the_brain_sample(viewer, qtbot, catalog):
    """Same planner: the bundled brain model on the brain sample (NIfTI, RAS+ reorientation, 3 mm
    grid, the model's own steps) gives the same labels in the inspector as in Segment."""
    from napari_octreenca.data_sources import brain_paths
    from napari_octreenca.widgets.inspector_widget import InspectorWidget
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    try:
        brain_paths("small")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    viewer.open_sample("napari-octreenca", "brain_mri")
    mri = viewer.layers["brain MRI (T1)"]
    seg_w = SegmentWidget(viewer)
    seg_w.image.value = mri
    seg_w.model.value = "brain_mri"
    seg_w.seed.value = 3
    job = seg_w.start()
    _wait(qtbot, job, 300)
    assert job.error is None, job.error
    segment_labels = np.asarray(viewer.layers["brain MRI (T1) labels"].data)
    record = viewer.layers["brain MRI (T1) labels"].metadata["octreenca"]["record"]

    ins = InspectorWidget(viewer)
    ins.image.value = mri
    ins.model.value = "brain_mri"
    ins.seed.value = 3
    ins.live.value = False
    assert [int(s) for s in ins.steps.value.split(",")] == record["engine"]["steps"]
    job = ins.start()
    _wait(qtbot, job, 300)
    assert job.error is None, job.error
    assert ins.segmentation.record["reoriented"] == "RAS+"
    inspector_labels = np.asarray(viewer.layers["brain MRI (T1) NCA labels"].data)
    assert segment_labels.any()
    np.testing.assert_array_equal(inspector_labels, segment_labels)
    # The recording is shown in the file's axis order, on the image's grid extent.
    evo = viewer.layers["brain MRI (T1) NCA logits"]
    extent = np.asarray(evo.extent.world)[:, -3:]
    img_extent = np.asarray(mri.extent.world)[:, -3:]
    np.testing.assert_allclose(extent, img_extent, atol=max(mri.scale) * 3.5)


def test_second_run_replaces_its_layers_unless_kept(viewer, qtbot, catalog, model_file_2d, rgb_image):
    """No ``[1]`` suffixes: a new recording replaces the last one's layers; kept ones stay and
    the new run's names say which run they are."""
    from napari_octreenca.widgets.inspector_widget import InspectorWidget

    name = catalog.add(model_file_2d)
    viewer.add_image(rgb_image, rgb=True, name="he")
    w = InspectorWidget(viewer)
    w.model.value = name
    w.live.value = False
    _wait(qtbot, w.start())
    first = [ly.name for ly in viewer.layers]
    assert len(first) == 1 + 4 + 2 + 1  # image; 4 hidden levels, logits, hidden RGB; the labels
    _wait(qtbot, w.start())
    assert [ly.name for ly in viewer.layers] == first
    assert not any("[" in ly.name for ly in viewer.layers)
    w.keep.value = True
    _wait(qtbot, w.start())
    names = [ly.name for ly in viewer.layers]
    assert len(names) == 1 + 2 * 7 and set(first) <= set(names)
    assert "he NCA #2 logits" in names and "he NCA #2 L0 hidden" in names
    assert not any("[" in n for n in names)


def test_hidden_channel_box_switches_every_level(viewer, qtbot, catalog, model_file_2d, rgb_image):
    from napari_octreenca.widgets.inspector_widget import InspectorWidget

    name = catalog.add(model_file_2d)
    viewer.add_image(rgb_image, rgb=True, name="he")
    w = InspectorWidget(viewer)
    w.model.value = name
    w.live.value = False
    assert not w.channel.enabled  # nothing recorded yet
    _wait(qtbot, w.start())
    hidden = w.recording.in_input_order().hidden
    assert w.channel.enabled and w.channel.max == hidden[0].shape[0] - 1
    w.channel.value = 5
    for level in range(4):
        layer = viewer.layers[f"he NCA L{level} hidden"]
        np.testing.assert_array_equal(layer.data, hidden[level][5])
        assert layer.metadata["octreenca"]["channel"] == 5


def test_live_run_appends_to_the_plot(viewer, qtbot, catalog, model_file_slow, rgb_image):
    """Live mode: throttled redraws of line data on one figure (no rebuild per frame)."""
    from napari_octreenca.widgets.inspector_widget import InspectorWidget

    name = catalog.add(model_file_slow)
    viewer.add_image(rgb_image[:48, :48], rgb=True, name="he")
    w = InspectorWidget(viewer)
    w.model.value = name
    w.steps.value = "60, 60"
    w.interval.value = 20
    w.plot.min_interval = 0.2
    job = w.start()
    assert "he NCA hidden RGB" in viewer.layers  # the live view: added before the run, never mid-run
    qtbot.waitUntil(lambda: len(w.plot.update.get(1, [])) >= 5, timeout=60000)
    _wait(qtbot, job)
    assert job.error is None, job.error
    assert w.plot.builds == 1  # set up once, curves extended while it ran
    frames = w.bar.value
    assert frames == 120
    assert 2 <= w.plot.draws < 120 / 2  # throttled: far fewer draws than steps


def test_inspector_shows_progress_while_motion_is_computed(viewer, qtbot, catalog, tmp_path):
    """A video model with a motion channel: the inspector's status line counts the frames of
    the motion computation (seconds on a real clip) before the first step."""
    from napari_helpers import motion_model, record_status

    from napari_octreenca.widgets.inspector_widget import InspectorWidget

    name = motion_model(catalog, tmp_path)
    rng = np.random.default_rng(0)
    clip = viewer.add_image((rng.random((8, 40, 48, 3)) * 255).astype(np.uint8), rgb=True, name="clip")
    clip.axis_labels = ("t", "y", "x")
    w = InspectorWidget(viewer)
    seen = record_status(w, "_on_prepare")
    w.image.value = clip
    w.model.value = name
    w.live.value = False
    job = w.start()
    assert job is not None
    _wait(qtbot, job, 120)
    assert job.error is None, job.error
    assert "computing motion: frame 8/8" in seen
