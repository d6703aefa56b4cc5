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
    napari = pytest.importorskip("napari")
    plan, rec, _ = _record(model2d, image2d)
    viewer = napari.components.ViewerModel()
    viewer.add_image(image2d, rgb=True, name="img", scale=(0.5, 0.5))
    for data, kwargs, kind in recording_layers(rec, scale=(0.5, 0.5), translate=(0.0, 0.0), prefix="NCA"):
        viewer._add_layer_from_data(data, kwargs, kind)
    names = [ly.name for ly in viewer.layers]
    assert names[1:] == [f"NCA L{lv} hidden" for lv in (3, 2, 1, 0)] + ["NCA evolution logits",
                                                                        "NCA evolution hidden RGB"]
    assert viewer.dims.axis_labels[:2] == ("channel", "step")
    assert viewer.dims.nsteps[1] == 13
    # The hidden layers show at every step of the slider (their singleton axis spans all steps).
    viewer.dims.set_point(1, 12)
    hidden0 = viewer.layers["NCA L0 hidden"]
    hidden0.visible = True
    hidden0.refresh()
    assert hidden0._slice.image.view.shape == image2d.shape[:2]
    # Coarsest level covers the same world extent as the image.
    l3 = viewer.layers["NCA L3 hidden"]
    np.testing.assert_allclose(l3.extent.world[1][2:] - l3.extent.world[0][2:],
                               viewer.layers["img"].extent.world[1] - viewer.layers["img"].extent.world[0],
                               atol=8 * 0.5)
