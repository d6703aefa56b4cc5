"""npe2 reader and writer adapters: napari layer data <-> ``napari_octreenca.io``.

The readers return one layer per file with its world geometry (``scale``, ``translate`` and,
where the file has one beyond scale and offset, an ``affine``), multiscale pyramids as lists of
levels, and ``metadata["octreenca"]`` with the axes (so the segment widget knows channels from
space and time), the source path and the reader's metadata. Label writers keep the source image's
geometry (a NIfTI keeps its affine) when the labels came from a file this plugin read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io.formats import plugin_suffixes

LayerData = tuple[Any, dict[str, Any], str]

#: File endings the reader takes (lower case; ``.zarr`` folders are OME-Zarr): the table in
#: ``io/formats.py``, which ``napari.yaml``'s ``filename_patterns`` repeat (a test checks).
SUFFIXES = plugin_suffixes()


def _accepts(path: str) -> bool:
    p = path.lower().rstrip("/\\")
    return any(p.endswith(s) for s in SUFFIXES)


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader: a function for the paths this plugin reads, else None (napari tries others)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_accepts(str(p)) for p in paths):
        return None
    try:
        from .io import readers  # noqa: F401  (the reader backend must exist)
    except ImportError:
        return None
    return read_layers


PLUGIN = "napari-octreenca"


def prefer_plugin_reader() -> list[str]:
    """Make this plugin napari's preferred reader for its file patterns that have no preference
    yet (napari's own reader also claims them, so napari would ask which reader to use on every
    drag and drop). A choice the user made is never changed; returns the patterns set.

    Called when one of the plugin's docks or samples is first used; the same as choosing this
    reader once in napari's "choose reader" dialog with "remember this choice" ticked
    (Preferences > Plugins > File extension readers undoes it).
    """
    try:
        from napari.settings import get_settings
    except ImportError:
        return []
    settings = get_settings().plugins
    current = dict(settings.extension2reader)
    new = [p for p in (["*" + s for s in SUFFIXES]) if p not in current]
    if new:
        settings.extension2reader = {**current, **{p: PLUGIN for p in new}}
    return new


def read_layers(path: str | list[str]) -> list[LayerData]:
    """Read each path into a napari layer (image, labels, or multiscale image)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [image_data_to_layer(_read(str(p)), str(p)) for p in paths]


def _read(path: str) -> Any:
    from .io.readers import read_image

    return read_image(path)


def _spatial(values: Sequence[float] | None, axes: str, n_spatial: int, default: float) -> tuple[float, ...]:
    """Per-spatial-axis values: readers give one per spatial axis, or one per axis incl. C."""
    if values is None:
        return (default,) * n_spatial
    vals = [float(v) for v in values]
    if len(vals) == len(axes) and "C" in axes:
        vals = [v for v, a in zip(vals, axes) if a != "C"]
    if len(vals) != n_spatial:
        return (default,) * n_spatial
    return tuple(vals)


def image_data_to_layer(img: Any, path: str = "") -> LayerData:
    """An ``io.readers.ImageData`` as napari layer data with geometry and metadata."""
    levels = list(getattr(img, "levels", None) or [img.data])
    axes = str(getattr(img, "axes", "") or "")
    kind = str(getattr(img, "kind", "image") or "image")
    saved = _saved_labels(img)
    if "image-label" in (getattr(img, "metadata", None) or {}) or saved is not None:
        kind = "labels"  # an OME-Zarr labels image, or labels this plugin wrote
    first = levels[0]
    if not axes:
        axes = "YXC" if first.ndim == 3 and first.shape[-1] in (3, 4) else "ZYX"[-first.ndim :]
    n_spatial = len(axes.replace("C", ""))
    scale = _spatial(getattr(img, "scale", None), axes, n_spatial, 1.0)
    translate = _spatial(getattr(img, "translate", None), axes, n_spatial, 0.0)
    meta_in = dict(getattr(img, "metadata", None) or {})
    affine = getattr(img, "affine", None)
    file_kind = str(getattr(img, "kind", "") or "")
    if saved is not None and saved.get("affine") is not None:
        # A TIFF this plugin wrote: its description holds the layer's world placement.
        world = np.asarray(saved["affine"], dtype=float)
        if world.shape == (n_spatial + 1, n_spatial + 1):
            scale, translate, affine = _split_affine(world)
            file_kind = "layer"
    rgb = axes.endswith("C") and int(first.shape[-1]) in (3, 4) and kind != "labels"
    kwargs: dict[str, Any] = {"name": Path(path.rstrip("/\\")).name.split(".")[0] or "image"}
    channel_axis = None
    if "C" in axes and not rgb:
        channel_axis = axes.index("C")
    affine_arr = None
    if affine is not None:
        affine_arr = _data_order_affine(np.asarray(affine, dtype=float), file_kind, n_spatial)
        lin = affine_arr[:-1, :-1]
        diag = np.abs(np.diag(lin))
        off = np.abs(lin - np.diag(np.diag(lin))).max(axis=1)
        if np.allclose(lin, np.diag(np.diag(lin))) or not np.all(diag > off):
            # No rotation (the reader's scale/translate say it all), or an axis permutation /
            # large rotation, which napari cannot slice in 2D: show the voxel grid with the
            # voxel sizes. The file's affine stays in the metadata and the label writers
            # reuse the source file's header, so a saved NIfTI keeps it.
            affine_arr = None
    if channel_axis is not None:
        # napari splits the channels into layers; geometry lists spatial axes only.
        kwargs["channel_axis"] = channel_axis
    kwargs["scale"] = scale
    kwargs["translate"] = translate
    if affine_arr is not None:
        kwargs["affine"] = affine_arr
        kwargs["scale"] = (1.0,) * n_spatial
        kwargs["translate"] = (0.0,) * n_spatial
    if len(levels) > 1:
        kwargs["multiscale"] = True
    if channel_axis is None:  # named sliders ("z", "t"; not "-3") and units where the file says
        kwargs["axis_labels"] = tuple(a.lower() for a in axes if a != "C")
        kwargs["units"] = _units(img, axes, file_kind)
    if rgb:
        kwargs["rgb"] = True
    kwargs["metadata"] = {
        **meta_in,
        "octreenca": {
            "axes": axes,
            "source": os.path.abspath(path) if path else None,
            "kind": kind,
            "scale": list(scale),
            "translate": list(translate),
            "affine": None if affine is None else np.asarray(affine, dtype=float).tolist(),
        },
    }
    data: Any = levels if len(levels) > 1 else levels[0]
    layer_type = "labels" if kind == "labels" else "image"
    if layer_type == "labels":
        kwargs.pop("channel_axis", None)
        kwargs.pop("rgb", None)
        names = list((saved or {}).get("classes") or [])
        if names:
            kwargs["features"] = {"index": list(range(len(names) + 1)), "class": ["background", *names]}
            kwargs["metadata"]["octreenca"]["class_names"] = names
    return (data, kwargs, layer_type)


_NIFTI_UNITS = {
    "meter": "meter",
    "mm": "millimeter",
    "micron": "micrometer",
    "sec": "second",
    "msec": "millisecond",
    "usec": "microsecond",
}


def _units(img: Any, axes: str, file_kind: str) -> tuple[str, ...]:
    """A unit per spatial axis: NIfTI's own (``xyzt_units``), micrometres for a slide or TIFF with
    a pixel size, seconds for video time; else pixels."""
    meta = getattr(img, "metadata", None) or {}
    space, time_unit = "pixel", "pixel"
    if file_kind == "nifti" and meta.get("nifti_header") is not None:
        try:
            xyz, t = meta["nifti_header"].get_xyzt_units()
        except (AttributeError, KeyError, ValueError):
            xyz, t = "unknown", "unknown"
        space = _NIFTI_UNITS.get(str(xyz), "millimeter")  # NIfTI's default unit is mm
        time_unit = _NIFTI_UNITS.get(str(t), "second")
    elif file_kind == "tiff" and any(abs(float(v) - 1.0) > 1e-9 for v in (getattr(img, "scale", None) or ())):
        space = "micrometer"
    elif file_kind == "video":
        time_unit = "second"
    return tuple(time_unit if a == "T" else space for a in axes if a != "C")


#: NIfTI intent code of a label image (``NIFTI_INTENT_LABEL``), which the label writer sets.
NIFTI_INTENT_LABEL = 1002


def _saved_labels(img: Any) -> dict[str, Any] | None:
    """What this plugin's label writers left in a file, or None when it is not such labels:
    a TIFF's JSON description (classes, world affine), or a NIfTI with the label intent."""
    import json

    meta = getattr(img, "metadata", None) or {}
    kind = getattr(img, "kind", "")
    if kind == "tiff":
        desc = str(meta.get("description") or "")
        if not desc.startswith("{"):
            return None
        try:
            info = json.loads(desc)
        except ValueError:
            return None
        return info if isinstance(info, dict) and info.get("octreenca") == "labels" else None
    if kind == "nifti":
        header = meta.get("nifti_header")
        try:
            intent = int(header["intent_code"]) if header is not None else 0
        except (KeyError, TypeError, ValueError):
            return None
        if intent != NIFTI_INTENT_LABEL:
            return None
        descrip = (
            header["descrip"].tobytes().split(b"\0")[0].decode("latin-1")
            if hasattr(header["descrip"], "tobytes")
            else ""
        )
        names = (
            [p.split("=", 1)[1] for p in descrip.removeprefix("labels: ").split(",") if "=" in p]
            if descrip.startswith("labels: ")
            else []
        )
        return {"classes": names}
    return None


def _split_affine(world: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray | None]:
    """Scale and offset of a diagonal world affine (no affine left), else the affine itself."""
    n = world.shape[0] - 1
    lin = world[:n, :n]
    if np.allclose(lin, np.diag(np.diag(lin))):
        return tuple(float(v) for v in np.diag(lin)), tuple(float(v) for v in world[:n, n]), None
    return (1.0,) * n, (0.0,) * n, world


def _data_order_affine(affine: np.ndarray, kind: str, n_spatial: int) -> np.ndarray:
    """The reader's affine over the layer's axes: NIfTI affines are in file voxel order
    (i, j, k) while the data is (k, j, i); reverse both the voxel and the world axes."""
    n = affine.shape[0] - 1
    if kind == "nifti":
        rev = list(range(n - 1, -1, -1)) + [n]
        affine = affine[np.ix_(rev, rev)]
    if n != n_spatial:  # e.g. a 4D NIfTI: time leads, untouched by the 3D affine
        out = np.eye(n_spatial + 1)
        k = min(n, n_spatial)
        out[n_spatial - k : n_spatial, n_spatial - k : n_spatial] = affine[:k, :k]
        out[n_spatial - k : n_spatial, -1] = affine[:k, -1]
        affine = out
    return affine


# -- writers -------------------------------------------------------------------------------------
def _source_of(meta: dict[str, Any]) -> str | None:
    """The file the labels' source image came from, if this plugin read it."""
    octree = (meta or {}).get("octreenca") or {}
    for candidate in (
        octree.get("source"),
        ((octree.get("source_metadata") or {}).get("octreenca") or {}).get("source"),
    ):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def _class_names(meta: dict[str, Any]) -> list[str] | None:
    names = ((meta or {}).get("octreenca") or {}).get("class_names")
    return list(names) if names else None


def _labels_array(data: Any) -> Any:
    """The finest level of a (possibly multiscale) labels layer's data: napari hands a writer a
    ``MultiScaleData`` (a Sequence of levels, not a list) for a multiscale layer."""
    if isinstance(data, Sequence):
        return data[0]
    return data


def _layer_geometry(labels: Any, attributes: dict[str, Any]) -> Any:
    """An ``ImageData`` with the layer's own scale, offset and affine, for labels whose source
    image is not a file this plugin read: the writers store this geometry in the file."""
    from .io.image import ImageData

    n = labels.ndim
    scale = tuple(float(s) for s in (attributes.get("scale") or (1.0,) * n))[-n:]
    translate = tuple(float(t) for t in (attributes.get("translate") or (0.0,) * n))[-n:]
    affine = attributes.get("affine")
    affine = None if affine is None else np.asarray(getattr(affine, "affine_matrix", affine), dtype=float)
    if affine is not None and np.allclose(affine, np.eye(affine.shape[0])):
        affine = None
    axes = "TZYX"[-n:] if n <= 4 else "ZYX"
    return ImageData(labels, [labels], axes, scale, translate, affine, {}, "layer")


def _write(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    from .io.writers import write_labels

    meta = attributes.get("metadata") or {}
    source = _source_of(meta)
    labels = _labels_array(data)
    if source is not None:
        from .io.readers import read_image

        like = read_image(source)  # lazy: only the geometry and header are read
    else:
        like = _layer_geometry(labels, attributes)
    out = write_labels(path, labels, like=like, class_names=_class_names(meta))
    if isinstance(out, (list, tuple)):
        return [str(p) for p in out]
    return [str(out if out is not None else path)]


def write_labels_nifti(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 writer: labels as ``.nii.gz`` (the source NIfTI's affine kept)."""
    return _write(path, data, attributes)


def write_labels_tiff(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 writer: labels as TIFF."""
    return _write(path, data, attributes)


def write_labels_zarr(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 writer: labels as OME-Zarr."""
    return _write(path, data, attributes)


__all__ = [
    "get_reader",
    "read_layers",
    "prefer_plugin_reader",
    "image_data_to_layer",
    "write_labels_nifti",
    "write_labels_tiff",
    "write_labels_zarr",
]
