"""The Train widget end to end in a real napari viewer (Qt under Xvfb).

Deselect with ``-m "not napari"`` where there is no X server.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.napari


from napari_helpers import wait as _wait  # noqa: E402


def test_training_widget_trains_saves_and_lists_model(viewer, qtbot, catalog, tmp_path: Path):
    from napari_octreenca import load_model
    from napari_octreenca.data_sources import skin_sample
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
    assert model.config.provenance["train_step"] == "cpu-fused"  # the fast path on the CPU by default
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
    from napari_octreenca import load_model
    from napari_octreenca.data_sources import synthetic_video
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
    assert tuned.config.steps == before.config.steps and tuned.config.axes == before.config.axes
    changed = any(not np.allclose(a.detach(), b.detach()) for a, b in zip(tuned.parameters(), before.parameters()))
    assert changed
    preview = viewer.layers["training preview"]
    assert preview.data.shape == (1, 32, 40)
    assert preview.translate[0] == 5 * 2.0  # slice 5 at z-spacing 2


def _skin(viewer):
    from napari_octreenca.data_sources import skin_sample

    try:
        img, mask = skin_sample()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    viewer.add_image(img, rgb=True, name="skin")
    viewer.add_labels(mask, name="epidermis")
    return img, mask


def test_preview_sits_on_the_labels(viewer, qtbot, catalog, tmp_path: Path):
    """On the skin sample the epidermis is nowhere near the image centre: the preview window
    must hold labels (a fixed centre crop would preview only dermis)."""
    from napari_octreenca.widgets.training_widget import PRESET_PREFIX, TrainingWidget, labelled_centre

    img, mask = _skin(viewer)
    w = TrainingWidget(viewer)
    w.start_from.value = PRESET_PREFIX + "pathology"
    w.iterations.value = 2
    w.batch.value = 1
    w.crop.value = 32
    w.preview_every.value = 2
    w.output.value = str(tmp_path / "m.safetensors")
    _wait(qtbot, w.start(), 120)
    preview = viewer.layers["training preview"]
    y0, x0 = (int(t) for t in preview.translate)
    h, wd = preview.data.shape
    assert mask[y0 : y0 + h, x0 : x0 + wd].mean() > 0.1  # the window holds epidermis
    c = labelled_centre(mask)
    assert mask[c] == 1 and y0 <= c[0] < y0 + h and x0 <= c[1] < x0 + wd


def test_cancel_removes_the_preview(viewer, qtbot, catalog, tmp_path: Path, rgb_image):
    from napari_octreenca.widgets.training_widget import PRESET_PREFIX, TrainingWidget

    viewer.add_image(rgb_image, rgb=True, name="he")
    viewer.add_labels((rgb_image.mean(-1) < 160).astype(np.uint8), name="dark")
    w = TrainingWidget(viewer)
    w.start_from.value = PRESET_PREFIX + "pathology"
    w.iterations.value = 10_000
    w.crop.value = 32
    w.batch.value = 1
    w.preview_every.value = 1
    w.output.value = str(tmp_path / "never.safetensors")
    job = w.start()
    qtbot.waitUntil(lambda: "training preview" in viewer.layers, timeout=60000)
    w.request_cancel()
    _wait(qtbot, job, 60)
    assert job.cancelled and "training preview" not in viewer.layers


def test_output_file_is_never_silently_overwritten(viewer, qtbot, catalog, tmp_path: Path, rgb_image):
    from napari_octreenca.widgets.training_widget import PRESET_PREFIX, TrainingWidget, next_free_path

    viewer.add_image(rgb_image, rgb=True, name="he")
    viewer.add_labels((rgb_image.mean(-1) < 160).astype(np.uint8), name="dark")
    first = tmp_path / "trained.safetensors"
    first.write_bytes(b"someone's model")
    assert next_free_path(first) == tmp_path / "trained-2.safetensors"
    w = TrainingWidget(viewer)
    w.start_from.value = PRESET_PREFIX + "pathology"
    w.iterations.value = 1
    w.batch.value = 1
    w.crop.value = 32
    w.output.value = str(first)
    _wait(qtbot, w.start(), 120)
    assert first.read_bytes() == b"someone's model"
    assert w.saved == tmp_path / "trained-2.safetensors" and w.saved.exists()
    assert str(w.output.value) == str(tmp_path / "trained-3.safetensors")  # the next training's name


def test_2d_images_hide_the_z_and_t_fields(viewer, rgb_image):
    from napari_octreenca.data_sources import synthetic_video
    from napari_octreenca.widgets.training_widget import TrainingWidget

    video, _ = synthetic_video(frames=6, size=(32, 40))
    volume = viewer.add_image(video[..., 2], name="volume")
    he = viewer.add_image(rgb_image, rgb=True, name="he")
    w = TrainingWidget(viewer)
    w.show_advanced.value = True
    w.image.value = he
    assert w.depth.native.isHidden() and w.preview_slice.native.isHidden()
    w.image.value = volume
    assert not w.depth.native.isHidden() and not w.preview_slice.native.isHidden()
