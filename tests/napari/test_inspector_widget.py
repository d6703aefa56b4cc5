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
    seen: set[str] = set()
    viewer.layers.events.inserted.connect(lambda e: seen.add(e.value.name))
    job = w.start()
    _wait(qtbot, job)
    assert job.error is None
    assert "he NCA live rgb" in seen  # live mode showed the evolving state during the run
    assert "he NCA live rgb" not in viewer.layers  # and made way for the full recording
    shapes = cfg.level_shapes(rgb_image.shape[:2])
    for level in range(cfg.levels):
        layer = viewer.layers[f"he NCA L{level} hidden"]
        assert layer.data.shape == (cfg.hidden_channels, 1) + shapes[level]
        f = 2**level
        assert tuple(layer.scale[2:]) == (0.25 * f, 0.25 * f)
        assert tuple(layer.translate[2:]) == ((f - 1) / 2 * 0.25,) * 2
    evo = viewer.layers["he NCA evolution hidden RGB"]
    logits = viewer.layers["he NCA evolution logits"]
    assert evo.data.shape == (15,) + rgb_image.shape[:2] + (3,)
    assert logits.data.shape == (15,) + rgb_image.shape[:2]
    step_axis = viewer.dims.ndim - 3
    assert viewer.dims.axis_labels[step_axis] == "step"
    assert viewer.dims.nsteps[step_axis] == 15
    assert viewer.dims.point[step_axis] == 14
    # The last evolution frame is the model's result: its logits give the segment labels.
    from napari_octreenca import labels_from_logits, load_model, segment

    ref = segment(load_model(model_file_2d), rgb_image, steps=[3, 3, 3, 6])
    np.testing.assert_allclose(logits.data[-1], ref.logits[0], atol=1e-5)
    np.testing.assert_array_equal(labels_from_logits(logits.data[-1][None]), ref.labels)
    conv = evo.metadata["octreenca"]["convergence"]
    assert [len(conv[lv]) for lv in range(cfg.levels)] == [3, 3, 3, 6]
    assert len(w.plot.axes) == cfg.levels and all(ax.lines for ax in w.plot.axes)  # a curve per level


def test_inspector_cancel_leaves_no_layer(viewer, qtbot, catalog, model_file_slow, rgb_image):
    from napari_octreenca.widgets.inspector_widget import InspectorWidget

    name = catalog.add(model_file_slow)
    viewer.add_image(rgb_image, rgb=True, name="he")
    w = InspectorWidget(viewer)
    w.model.value = name
    w.interval.value = 20
    job = w.start()
    qtbot.waitUntil(lambda: "he NCA live rgb" in viewer.layers, timeout=60000)
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
    rgb = viewer.layers["pyr NCA evolution hidden RGB"]
    assert rgb.data.shape[1:3] == levels[1].shape[:2]
    assert tuple(rgb.scale[1:]) == (1.0, 1.0)  # level-1 pixels are 2 x 0.5
    l0 = viewer.layers["pyr NCA L0 hidden"]
    assert l0.data.shape[2:] == levels[1].shape[:2]


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
    logits = viewer.layers["he NCA evolution logits"]
    assert logits.data.shape[1:] == (y1 - y0, x1 - x0)
    assert tuple(logits.translate[1:]) == (float(y0), float(x0))
    from napari_octreenca import load_model, segment

    ref = segment(load_model(model_file_2d), rgb_image)
    np.testing.assert_allclose(logits.data[-1], ref.logits[0, y0:y1, x0:x1], atol=1e-5)


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
    evo = viewer.layers["brain MRI (T1) NCA evolution logits"]
    extent = np.asarray(evo.extent.world)[:, -3:]
    img_extent = np.asarray(mri.extent.world)[:, -3:]
    np.testing.assert_allclose(extent, img_extent, atol=max(mri.scale) * 3.5)
