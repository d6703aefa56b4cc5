"""Samples as a napari user meets them: named sliders and units on every layer, and a whole
slide that is a real multiscale pyramid read lazily."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.napari

PLUGIN = "napari-octreenca"


@pytest.mark.parametrize("sample", ["brain_mri", "he_skin", "whole_slide", "video"])
def test_every_sample_layer_has_axis_labels_and_units(viewer, sample):
    try:
        layers = viewer.open_sample(PLUGIN, sample)
    except (FileNotFoundError, ImportError) as exc:  # sample data (or, for the video, PyAV) not installed
        pytest.skip(str(exc))
    for layer in layers:
        assert all(not str(a).lstrip("-").isdigit() for a in layer.axis_labels), (layer.name, layer.axis_labels)
        assert len(layer.units) == layer.ndim and all(str(u) for u in layer.units)
    if sample == "video":  # the time slider says what it counts, not "-3"
        assert layers[0].axis_labels[0] == "frame"
        assert tuple(viewer.dims.axis_labels) == ("frame", "y", "x")
        # The real clip (Big Buck Bunny), credited where users see it; it has no reference labels.
        assert len(layers) == 1 and "Big Buck Bunny" in layers[0].name
        assert "Blender Foundation" in layers[0].metadata["octreenca"]["credit"]
        assert layers[0].data.shape[0] == 132 and layers[0].rgb
    if sample == "brain_mri":
        assert [str(u) for u in layers[0].units] == ["millimeter"] * 3


def test_whole_slide_is_a_lazy_pyramid(viewer):
    from napari_octreenca.sample_data import whole_slide_pyramid

    try:
        (layer,) = viewer.open_sample(PLUGIN, "whole_slide")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert layer.multiscale and len(layer.data) >= 3
    shapes = [lv.shape for lv in layer.data]
    assert shapes[0] == (2967, 2220, 3) and all(
        a[0] // 2 == b[0] for a, b in zip(shapes, shapes[1:])
    )  # each level half the one before
    assert not isinstance(layer.data[0], np.ndarray)  # tiles read on demand, not the slide in memory
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    # The pyramid is real: level 1 is the 2x2 mean of level 0 (a tile of it).
    fine = np.asarray(layer.data[0][:64, :64]).astype(float)
    coarse = np.asarray(layer.data[1][:32, :32]).astype(float)
    np.testing.assert_allclose(coarse, fine.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3)), atol=0.51)
    assert whole_slide_pyramid().exists()  # built once into the cache, reused next time
