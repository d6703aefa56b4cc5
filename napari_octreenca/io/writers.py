"""``write_labels(path, labels, like=None, class_names=None)``: labels in the format of the extension.

- ``.nii``/``.nii.gz``: the source's affine and header (``like`` from ``read_nifti``), axes put
  back in the file's (i, j, k) order, uint8/uint16 labels.
- ``.tif``/``.tiff``: tiled, compressed TIFF with the pixel size as resolution; class names in
  the description.
- ``.zarr``: OME-Zarr labels image (multiscale), added to an existing OME-Zarr image or a new
  store; listed in ``labels`` only once complete.
- ``.png``: 2D labels as an 8/16-bit PNG.

``metadata`` (a JSON-able dict, e.g. the run's quality estimate) is stored with the labels under the key
``octreenca``: a NIfTI header extension (comment, JSON), the TIFF description's JSON, a PNG text
chunk, the OME-Zarr labels group's attributes; :func:`read_labels_metadata` reads it back.

Files are written to a temporary name beside the target and renamed at the end: a crash leaves
the old file or none, never a half-written one. Labels may be numpy, dask or zarr arrays; large
ones are written chunk by chunk.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..fileutil import atomic_write
from ..nca.errors import InputError
from .image import ImageData, to_numpy

OUTPUT_SUFFIXES = (".nii", ".nii.gz", ".tif", ".tiff", ".zarr", ".png")


def output_suffix(path: str | Path) -> str:
    name = str(path).lower().rstrip("/")
    for s in (".nii.gz", ".ome.zarr", ".ome.tif", ".ome.tiff") + OUTPUT_SUFFIXES:
        if name.endswith(s):
            return s.replace(".ome", "")
    raise InputError(f"cannot tell the output format of {path}: use one of {', '.join(OUTPUT_SUFFIXES)}")


def _label_dtype(labels: Any) -> np.dtype:
    dt = np.dtype(labels.dtype)
    if dt.kind not in "uib":
        raise InputError(f"labels must be integers, got {dt}")
    return np.dtype(np.uint8) if dt.itemsize == 1 or dt == np.bool_ else np.dtype(np.uint16)


def write_labels(
    path: str | Path,
    labels: Any,
    like: ImageData | None = None,
    class_names: Sequence[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``labels`` (spatial axes of ``like``, e.g. ZYX or YX) to ``path``; returns the path.

    ``metadata`` is stored with the labels (see the module docstring)."""
    path = Path(path)
    suffix = output_suffix(path)
    names = tuple(class_names or ())
    if like is not None:
        want = tuple(like.shape[i] for i, a in enumerate(like.axes) if a != "C")
        if tuple(labels.shape) != want:
            raise InputError(f"labels of shape {tuple(labels.shape)} do not match the image's spatial shape {want}")
    meta = json.loads(json.dumps(metadata)) if metadata else None  # fail early on non-JSON values
    if suffix in (".nii", ".nii.gz"):
        return _write_nifti(path, labels, like, names, suffix, meta)
    if suffix in (".tif", ".tiff"):
        return _write_tiff(path, labels, like, names, meta)
    if suffix == ".png":
        return _write_png(path, labels, meta)
    out = write_labels_zarr(path, labels, like, names)
    if meta:
        import zarr

        g = zarr.open_group(str(Path(path) / "labels" / "segmentation"), mode="a")
        g.attrs["octreenca"] = {**dict(g.attrs.get("octreenca", {})), **meta}
    return out


def read_labels_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata`` a labels file was written with (empty if none)."""
    path = Path(path)
    suffix = output_suffix(path)
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        for ext in nib.load(str(path)).header.extensions:
            content = ext.get_content()
            if isinstance(content, bytes) and content.startswith(b'{"octreenca"'):
                return json.loads(content)["octreenca"]
        return {}
    if suffix in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tf:
            desc = tf.pages[0].description
        return dict(json.loads(desc).get("metadata", {})) if desc.startswith("{") else {}
    if suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            text = im.info.get("octreenca")
        return json.loads(text) if text else {}
    import zarr

    attrs = dict(zarr.open_group(str(path / "labels" / "segmentation"), mode="r").attrs.get("octreenca", {}))
    attrs.pop("source", None)
    attrs.pop("complete", None)
    return attrs


def _write_nifti(
    path: Path,
    labels: Any,
    like: ImageData | None,
    names: tuple[str, ...],
    suffix: str,
    meta: dict[str, Any] | None = None,
) -> Path:
    import nibabel as nib

    data = to_numpy(labels).astype(_label_dtype(labels), copy=False)
    if like is not None and like.kind == "nifti":
        if like.metadata.get("file_axes_reversed"):
            data = data.transpose(tuple(range(data.ndim - 1, -1, -1)))
        header = like.metadata["nifti_header"].copy()
        img = nib.Nifti1Image(data, like.affine, header=header)
        img.set_qform(like.affine, code=int(header["qform_code"]) or 1)
        img.set_sform(like.affine, code=int(header["sform_code"]) or 1)
    else:
        # Without a NIfTI source: (Z)YX -> (i, j, k) = (X, Y, Z), geometry from like.
        data = data.transpose(tuple(range(data.ndim - 1, -1, -1)))
        aff = np.eye(4)
        if like is not None:
            aff = _ijk_affine(like, data.ndim)
        img = nib.Nifti1Image(data, aff)
    img.set_data_dtype(data.dtype)
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
    img.header["intent_code"] = 1002  # NIFTI_INTENT_LABEL
    if names:
        img.header["descrip"] = ("labels: " + ",".join(f"{i + 1}={n}" for i, n in enumerate(names)))[:79].encode()
    if meta:
        text = json.dumps({"octreenca": meta}).encode()
        img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", text))
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)), suffix=suffix)


def _world_affine(like: ImageData, n: int) -> np.ndarray:
    """(n + 1) x (n + 1) map from (Z)YX data indices to world: scale and offset, then the
    layer's own affine when it has one (how napari places a layer)."""
    m = np.eye(n + 1)
    m[np.arange(n), np.arange(n)] = [float(s) for s in like.scale[-n:]]
    m[:n, n] = [float(t) for t in like.translate[-n:]]
    if like.affine is not None and like.kind != "nifti" and np.shape(like.affine) == (n + 1, n + 1):
        m = np.asarray(like.affine, dtype=float) @ m
    return m


def _ijk_affine(like: ImageData, n: int) -> np.ndarray:
    """The NIfTI 4x4 affine over (i, j, k) = (X, Y, Z) of labels with (Z)YX data axes."""
    m = _world_affine(like, n)
    rev = list(range(n - 1, -1, -1)) + [n]
    m = m[np.ix_(rev, rev)]
    out = np.eye(4)
    out[:n, :n], out[:n, 3] = m[:n, :n], m[:n, n]
    return out


def _tiles(labels: Any, tile: int) -> Any:
    h, w = labels.shape
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = to_numpy(labels[y : y + tile, x : x + tile])
            out = np.zeros((tile, tile), block.dtype)
            out[: block.shape[0], : block.shape[1]] = block
            yield out


def _write_tiff(
    path: Path, labels: Any, like: ImageData | None, names: tuple[str, ...], meta: dict[str, Any] | None = None
) -> Path:
    import tifffile

    dtype = _label_dtype(labels)
    info: dict[str, Any] = {"octreenca": "labels", "classes": list(names)}
    if like is not None:
        # The layer geometry travels in the description (the resolution tags carry no offset):
        # the plugin's reader places the labels where they were.
        info["affine"] = _world_affine(like, labels.ndim).tolist()
    if meta:
        info["metadata"] = meta
    desc = json.dumps(info)
    res = None
    if like is not None and len(like.scale) >= 2:
        sy, sx = like.scale[-2], like.scale[-1]
        res = (1e4 / sx, 1e4 / sy) if sx > 0 and sy > 0 else None  # pixels per cm from um

    def write(tmp: Path) -> None:
        kw: dict[str, Any] = {"compression": "zlib", "description": desc, "metadata": None}
        if res is not None and like is not None and like.kind == "tiff":
            kw.update(resolution=res, resolutionunit="CENTIMETER")
        if labels.ndim == 2 and not isinstance(labels, np.ndarray):  # big: stream tiles
            tile = 256
            tifffile.imwrite(
                tmp,
                _tiles(labels.astype(dtype) if hasattr(labels, "astype") else labels, tile),
                shape=tuple(labels.shape),
                dtype=dtype,
                tile=(tile, tile),
                bigtiff=True,
                **kw,
            )
        else:
            tifffile.imwrite(tmp, to_numpy(labels).astype(dtype, copy=False), bigtiff=labels.size > 2**31, **kw)

    return atomic_write(path, write, suffix=path.suffix)


def _write_png(path: Path, labels: Any, meta: dict[str, Any] | None = None) -> Path:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    data = to_numpy(labels)
    if data.ndim != 2:
        raise InputError(f"PNG labels must be 2D, got shape {data.shape}; use .tif or .zarr")
    data = data.astype(_label_dtype(data))
    info = PngInfo()
    if meta:
        info.add_text("octreenca", json.dumps(meta))
    return atomic_write(path, lambda tmp: Image.fromarray(data).save(tmp, format="PNG", pnginfo=info), suffix=".png")


def write_labels_zarr(
    path: Path,
    labels: Any,
    like: ImageData | None,
    names: tuple[str, ...],
    name: str = "segmentation",
    chunk: int = 512,
) -> Path:
    """OME-Zarr labels image (multiscale) under ``path/labels/<name>``, chunk by chunk."""
    from .ome_zarr import LabelsWriter

    axes = like.spatial_axes if like is not None else "ZYX"[-labels.ndim :]
    if len(axes) != labels.ndim:
        raise InputError(f"labels have {labels.ndim} axes but the image has spatial axes {axes!r}")
    tile = tuple(chunk if a in "YX" else min(n, 64) for a, n in zip(axes, labels.shape))
    writer = LabelsWriter(
        path,
        axes,
        tuple(labels.shape),
        _label_dtype(labels),
        tile,
        name=name,
        scale=like.scale if like is not None else None,
        translate=like.translate if like is not None else None,
        class_names=names,
        source=None if like is None or not like.metadata.get("path") else str(like.metadata["path"]),
    )
    counts = [-(-n // t) for n, t in zip(labels.shape, tile)]
    for idx in np.ndindex(*counts):
        start = tuple(i * t for i, t in zip(idx, tile))
        block = to_numpy(labels[tuple(slice(s, s + t) for s, t in zip(start, tile))])
        writer.write(start, block.astype(_label_dtype(labels), copy=False))
    writer.finish()
    return path


__all__ = ["write_labels", "write_labels_zarr", "read_labels_metadata", "output_suffix", "OUTPUT_SUFFIXES"]
