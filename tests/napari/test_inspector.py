"""The Qt-free NCA recorder: hidden channels per level, evolution over all steps, convergence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_octreenca import OctreeNCA, labels_from_logits, preset, segment
from napari_octreenca.run.inputs import plan_axes
from napari_octreenca.run.recorder import NCARecorder, level_geometry, plan_recording, recording_layers


def _model(name: str, seed: int = 0, **changes) -> OctreeNCA:
    m = OctreeNCA(preset(name, **changes))
    g = torch.Generator().manual_seed(seed)
    for level in m.levels:
        level.fc1.weight.data = torch.randn(level.fc1.weight.shape, generator=g) * 0.05
    return m


@pytest.fixture
def model2d() -> OctreeNCA:
    return _model("pathology", steps=(3, 3, 3, 4), factors=((2, 2),) * 3)


@pytest.fixture
def image2d() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((70, 52, 3)) * 255).astype(np.uint8)  # odd sizes: ceil level shapes


def _record(model, image, axes=None, **plan_kw):
    ap = plan_axes(image.shape, model.config, axes)
    shape_in = tuple(image.shape[i] for i, a in enumerate(ap.input_axes) if a != "C")
    order = ap.to_input_order()
    shape_net = [0] * len(shape_in)
    for k, o in enumerate(order):
        shape_net[o] = shape_in[k]
    plan = plan_recording(model.config, tuple(shape_net), order=order, **plan_kw)
    rec = NCARecorder(plan)
    seg = segment(model, image, axes=axes, steps=list(plan.steps), callback=rec)
    return plan, rec.recording, seg


def test_every_level_and_every_step_recorded(model2d, image2d):
    plan, rec, seg = _record(model2d, image2d)
    cfg = model2d.config
    shapes = cfg.level_shapes(image2d.shape[:2])
    assert sorted(rec.hidden) == list(range(cfg.levels))
    for lv in range(cfg.levels):
        assert rec.hidden[lv].shape == (cfg.hidden_channels,) + shapes[lv]
    assert rec.logits.shape == (13, 1) + image2d.shape[:2]
    assert rec.rgb.shape == (13,) + image2d.shape[:2] + (3,) and rec.rgb.dtype == np.uint8
    assert rec.step_levels == [3] * 4 + [2] * 3 + [1] * 3 + [0] * 3
    # The last recorded frame is the result: same logits, same labels.
    np.testing.assert_allclose(rec.logits[-1], seg.logits, atol=1e-6)
    np.testing.assert_array_equal(labels_from_logits(rec.logits[-1]), seg.labels)
    # Convergence: one value per step, all finite (step 0 of each level compares with the
    # up-sampled coarser state), and they are the true mean absolute updates.
    assert {lv: len(v) for lv, v in rec.convergence.items()} == {3: 4, 2: 3, 1: 3, 0: 3}
    assert all(math.isfinite(v) and v > 0 for vals in rec.convergence.values() for v in vals)


def test_convergence_is_the_mean_absolute_update(model2d, image2d):
    """Recompute the updates from copies of the full state at every step."""
    states: list[tuple[int, torch.Tensor]] = []
    ap = plan_axes(image2d.shape, model2d.config, None)
    plan = plan_recording(model2d.config, image2d.shape[:2], order=ap.to_input_order())
    rec = NCARecorder(plan)

    def both(info):
        states.append((info.level, info.state[0].clone()))
        rec(info)

    segment(model2d, image2d, callback=both)
    # Within a level: |s_t - s_{t-1}| averaged over all channels and cells.
    level0 = [s for lv, s in states if lv == 0]
    expected = [float((b - a).abs().mean()) for a, b in zip(level0, level0[1:])]
    np.testing.assert_allclose(rec.recording.convergence[0][1:], expected, rtol=1e-5)


def test_hidden_pca_colours_follow_the_state(model2d, image2d):
    _, rec, _ = _record(model2d, image2d)
    # The automaton changes the hidden state from step to step, and the colours show it.
    assert rec.rgb[0].std() > 0
    assert not np.array_equal(rec.rgb[-1], rec.rgb[-2])


def test_large_inputs_are_strided_to_the_budget():
    cfg = preset("pathology")
    plan = plan_recording(cfg, (40_000, 30_000), budget=64 * 1024**2)
    mem = plan.memory()
    assert mem["total"] <= 64 * 1024**2 * 1.1
    assert plan.evolution_stride > 1 and max(plan.hidden_strides) > 1
    assert plan.total_steps == sum(cfg.steps_for((40_000, 30_000)))
    assert "MB" in plan.describe() and "resolution" in plan.describe()


def test_visible_region_recording(model2d, image2d):
    """Only a window is recorded, at full resolution; it equals that window of the full run."""
    region = ((10, 42), (8, 40))
    plan, rec, seg = _record(model2d, image2d, region=region)
    assert plan.evolution_stride == 1
    assert rec.logits.shape == (13, 1, 32, 32)
    np.testing.assert_allclose(rec.logits[-1, 0], seg.logits[0, 10:42, 8:40], atol=1e-6)


def test_reduced_resolution_samples_the_grid(model2d, image2d):
    plan, rec, seg = _record(model2d, image2d, budget=100_000)
    s = plan.evolution_stride
    assert s > 1
    np.testing.assert_allclose(rec.logits[-1, 0], seg.logits[0, ::s, ::s], atol=1e-6)


def test_3d_video_axes_come_back_in_input_order():
    """A video model runs in (Y, X, T); layers are in the input's (T, Y, X) order."""
    model = _model("surgery", steps=(2, 2, 3), factors=((2, 2, 2), (2, 2, 2)), output_channels=2)
    clip = (np.random.default_rng(1).random((6, 20, 24, 3)) * 255).astype(np.uint8)
    plan, rec, seg = _record(model, clip, axes="TYXC")
    assert plan.config.axes == "YXT" and plan.order == (2, 0, 1)
    inp = rec.in_input_order()
    assert inp.logits.shape == (7, 2, 6, 20, 24)
    assert inp.rgb.shape == (7, 6, 20, 24, 3)
    np.testing.assert_allclose(inp.logits[-1], seg.logits, atol=1e-6)
    shapes_net = model.config.level_shapes((20, 24, 6))
    for lv in range(3):
        y, x, t = shapes_net[lv]
        assert inp.hidden[lv].shape == (model.config.hidden_channels, t, y, x)


def test_level_geometry_centres_coarse_cells():
    cfg = preset("pathology", steps=(1, 1, 1), factors=((2, 2), (2, 2)))
    plan = plan_recording(cfg, (64, 64))
    sc, tr = level_geometry(plan, 2, (0.5, 0.5), (10.0, 20.0), 1)
    assert sc == (2.0, 2.0)  # 4 fine pixels of 0.5
    assert tr == (10.0 + 1.5 * 0.5, 20.0 + 1.5 * 0.5)  # centre of pixels 0..3


def test_recording_layers_in_a_viewer_model(model2d, image2d):
    """Level and step sliders (the step slider belongs to the level slider's level), hidden
    layers without a channel axis, lazy padded frames."""
    napari = pytest.importorskip("napari")
    from napari.layers import Layer

    plan, rec, _ = _record(model2d, image2d)
    viewer = napari.components.ViewerModel()
    viewer.add_image(image2d, rgb=True, name="img", scale=(0.5, 0.5))
    for data, kwargs, kind in recording_layers(rec, scale=(0.5, 0.5), translate=(0.0, 0.0), prefix="NCA"):
        viewer.add_layer(Layer.create(data, kwargs, kind))
    names = [ly.name for ly in viewer.layers]
    assert names[1:] == [f"NCA L{lv} hidden" for lv in (3, 2, 1, 0)] + ["NCA logits", "NCA hidden RGB"]
    assert viewer.dims.axis_labels[:2] == ("level", "step")
    assert "channel" not in viewer.dims.axis_labels
    assert viewer.dims.nsteps[:2] == (4, 4)  # 4 levels; the longest level (L3) has 4 steps
    logits = viewer.layers["NCA logits"]
    # Level 3 runs first (frames 0-3), then L2 (4-6), L1 (7-9), L0 (10-12).
    np.testing.assert_array_equal(np.asarray(logits.data[3, 0]), rec.logits[0, 0])
    np.testing.assert_array_equal(np.asarray(logits.data[0, 2]), rec.logits[12, 0])
    np.testing.assert_array_equal(np.asarray(logits.data[2, 3]), rec.logits[6, 0])  # L2's last step repeats
    # The hidden layers show at every level/step position: spatial axes only.
    hidden0 = viewer.layers["NCA L0 hidden"]
    assert hidden0.data.shape == image2d.shape[:2]
    np.testing.assert_array_equal(hidden0.data, rec.hidden[0][0])
    viewer.dims.set_point(0, 2)
    hidden0.visible = True
    hidden0.refresh()
    assert hidden0._slice.image.view.shape == image2d.shape[:2]
    # Coarsest level covers the same world extent as the image.
    l3 = viewer.layers["NCA L3 hidden"]
    np.testing.assert_allclose(
        l3.extent.world[1] - l3.extent.world[0],
        viewer.layers["img"].extent.world[1] - viewer.layers["img"].extent.world[0],
        atol=8 * 0.5,
    )


def test_label_changes_are_recorded_per_step(model2d, image2d):
    """The share of cells whose label flips is measured against the previous step's labels."""
    plan, rec, seg = _record(model2d, image2d)
    assert {lv: len(v) for lv, v in rec.label_changes.items()} == {3: 4, 2: 3, 1: 3, 0: 3}
    assert all(0.0 <= v <= 1.0 for vals in rec.label_changes.values() for v in vals if math.isfinite(v))
    # The first step of the first level compares with "no labels yet" (zero logits).
    assert math.isfinite(rec.label_changes[3][0])


def test_readings_in_plain_words():
    """Synthetic curves for each verdict: a reading says what the labels did, in words."""
    from napari_octreenca.run.recorder import level_reading

    steady = [0.1] * 20
    settled = level_reading(0, steady, [0.05, 0.02, 0.004] + [0.0] * 17, 20, 0.5)
    assert settled.verdict == "settled" and settled.settled_at == 4
    assert settled.text.startswith("L0: labels settled by step 4 of 20 (trained for 20)")
    assert "keeps moving" in settled.text  # the update did not shrink: the state is not at rest
    flicker = level_reading(1, steady, [0.003] * 10, 10, 0.5)
    assert flicker.verdict == "nearly settled" and "0.3% of cells" in flicker.text
    falling = level_reading(2, [1.0, 0.5, 0.2, 0.1, 0.05], [0.3, 0.2, 0.1, 0.06, 0.03], 5, 0.5)
    assert falling.verdict == "settling"
    changing = level_reading(3, steady, [0.2] * 10, 10, 0.5)
    assert changing.verdict == "changing" and "still changing" in changing.text
    rest = level_reading(0, [1.0, 0.1, 0.01, 0.001, 0.0001], [0.0] * 5, 5, 0.5)
    assert "at rest" in rest.text
    assert level_reading(0, [], [], 10, 0.5).verdict == "no steps"


def test_expected_update_is_fire_rate_adjusted_and_windowed():
    from napari_octreenca.run.recorder import expected_update

    np.testing.assert_allclose(expected_update([0.1, 0.3, float("nan"), 0.5], 0.5, 2), [0.2, 0.4, 0.6, 1.0])


def test_bundled_model_reading_on_real_h_and_e():
    """The bundled epidermis model on the real H&E section: its labels settle (a reading of
    "still changing" for every level would send users looking for a broken model)."""
    from napari_octreenca import open_model
    from napari_octreenca.data_sources import skin_sample
    from napari_octreenca.run.recorder import recording_readings

    try:
        img, _ = skin_sample()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    model = open_model("he_epidermis")
    crop = np.ascontiguousarray(img[200:328, 300:428])
    plan = plan_recording(model.config, crop.shape[:2], record_evolution=False, record_hidden=False)
    rec = NCARecorder(plan)
    segment(model, crop, callback=rec, steps=list(plan.steps))
    readings = recording_readings(rec.recording)
    assert [r.level for r in readings] == [4, 3, 2, 1, 0]
    assert [r.trained_steps for r in readings] == [20, 10, 10, 10, 10], [r.text for r in readings]
    assert readings[-1].verdict in ("settled", "nearly settled"), [r.text for r in readings]
    assert sum(r.verdict == "changing" for r in readings) < len(readings)
