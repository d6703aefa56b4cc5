"""Lazy readers: ``read_image(path) -> ImageData`` for NIfTI, TIFF/SVS/OME-TIFF, OME-Zarr, video, frames.

Stable contract (the napari plugin's drag-and-drop readers call it):

``ImageData`` fields: ``data`` (finest level, numpy or dask), ``levels`` (pyramid, finest first;
``[data]`` when there is none), ``axes`` (letters of T, Z, Y, X, C, e.g. "YXC", "ZYX", "TYXC"),
``scale``/``translate`` (one per spatial axis, physical units), ``affine`` (4x4, NIfTI only),
``metadata`` (dict: ``path``, ``fps`` for video, ``nifti_header`` for NIfTI, ...), ``kind``
("nifti", "tiff", "ome-zarr", "video", "frames").

Large arrays stay lazy (dask over the file's own chunks/tiles/frames): nothing is decoded until
a region is read.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..nca.errors import InputError
from . import formats
from .image import ImageData, to_numpy

#: Files at most this large are read into memory at once; larger ones stay lazy.
EAGER_BYTES = 256 << 20
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VIDEO_SUFFIXES = formats.suffixes("video")
TIFF_SUFFIXES = formats.suffixes("tiff")
#: TIFF series that are not the image (slide label, macro photo, thumbnail).
_SKIP_SERIES = ("label", "macro", "thumbnail", "overview")


def file_kind(path: str | Path) -> str:
    """What ``read_image`` would read ``path`` as; raises InputError if unsupported."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        if (p / "zarr.json").exists() or (p / ".zattrs").exists() or (p / ".zgroup").exists():
            return "ome-zarr"
        if any(f.suffix.lower() in FRAME_SUFFIXES for f in p.iterdir()):
            return "frames"
        raise InputError(f"{p} is a folder with neither an OME-Zarr group nor image frames")
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(TIFF_SUFFIXES) or name.endswith((".ome.tif", ".ome.tiff")):
        return "tiff"
    if name.endswith(VIDEO_SUFFIXES):
        return "video"
    if name.endswith(".zarr"):
        return "ome-zarr"
    if name.endswith(FRAME_SUFFIXES):
        return "frames"
    raise InputError(
        f"unsupported file {p.name!r}: read .nii/.nii.gz, .tif/.tiff/.svs/.ome.tif, .zarr (OME-Zarr), "
        f"{'/'.join(VIDEO_SUFFIXES)} videos, or a folder of frames"
    )


def read_image(path: str | Path) -> ImageData:
    """Read ``path`` lazily as :class:`ImageData` (format chosen from the name/contents)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} does not exist")
    kind = file_kind(p)
    try:
        if kind == "nifti":
            return read_nifti(p)
        if kind == "tiff":
            return read_tiff(p)
        if kind == "ome-zarr":
            from .ome_zarr import read_ome_zarr

            return read_ome_zarr(p)
        if kind == "video":
            from .video import read_video

            return read_video(p)
        return read_frames(p)
    except InputError:
        raise
    except Exception as exc:  # a corrupt or truncated file: say which and why
        raise InputError(f"cannot read {p} as {kind}: {type(exc).__name__}: {exc}") from exc


# -- NIfTI --------------------------------------------------------------------------------------
def read_nifti(path: Path) -> ImageData:
    """NIfTI-1/2 volume, axes reversed to ``ZYX`` (``TZYX`` for 4D); affine and header kept.

    The file's voxel order is (i, j, k[, t]); the data here is its transpose (k, j, i) so that
    axes read as Z, Y, X. ``affine`` is the file's own (i, j, k) affine; writers transpose back.
    """
    import nibabel as nib

    img = nib.load(str(path))
    proxy = img.dataobj
    shape = tuple(int(s) for s in img.shape)
    if len(shape) not in (2, 3, 4):
        raise InputError(f"{path.name}: NIfTI with {len(shape)} axes is not supported (2 to 4)")
    nbytes = int(np.prod(shape)) * np.dtype(img.get_data_dtype()).itemsize
    _check_nifti_size(path, shape, nbytes, int(img.header.get("vox_offset", 0) or 0))
    if nbytes <= EAGER_BYTES or str(path).endswith(".gz"):  # gzip has no random access anyway
        data = np.asanyarray(proxy)
    else:
        import dask.array as da

        data = da.from_array(proxy, chunks="auto", asarray=True)
    data = data.transpose(tuple(range(len(shape) - 1, -1, -1)))
    zooms = tuple(float(z) for z in img.header.get_zooms()[: len(shape)])
    axes = {2: "YX", 3: "ZYX", 4: "TZYX"}[len(shape)]
    spatial = min(len(shape), 3)
    scale = tuple(reversed(zooms[:spatial]))
    if len(shape) == 4:
        scale = (zooms[3] or 1.0,) + scale
    affine = np.asarray(img.affine, dtype=np.float64)
    translate = tuple(float(v) for v in reversed(affine[:spatial, 3]))
    if len(shape) == 4:
        translate = (0.0,) + translate
    meta = {
        "path": str(path),
        "nifti_header": img.header,
        "file_axes_reversed": True,
        "dtype": str(img.get_data_dtype()),
    }
    return ImageData(data, [data], axes, scale, translate, affine, meta, "nifti")


#: deflate cannot compress by more than about 1032:1, so a .gz file this much smaller than the
#: voxel data its header claims cannot hold that data.
_GZIP_MAX_RATIO = 1032


def _check_nifti_size(path: Path, shape: tuple[int, ...], nbytes: int, offset: int) -> None:
    """Refuse a header that claims more voxel data than the file can hold, before anything is allocated."""
    size = path.stat().st_size
    gz = str(path).endswith(".gz")
    room = size * _GZIP_MAX_RATIO if gz else size - offset
    if nbytes > room:
        held = f"a {size:,}-byte compressed file holds at most {room:,}" if gz else f"the file holds {max(room, 0):,}"
        raise InputError(
            f"{path}: the NIfTI header claims {'x'.join(map(str, shape))} voxels ({nbytes:,} bytes) but "
            f"{held}: the file is truncated or its header is wrong"
        )


# -- TIFF / SVS / OME-TIFF ------------------------------------------------------------------------
_TIFF_AXES = {"S": "C", "C": "C", "Y": "Y", "X": "X", "Z": "Z", "T": "T", "Q": "T", "I": "T", "E": "C"}


def _pick_series(tif: Any) -> Any:
    for s in tif.series:
        name = (s.name or "").lower()
        if any(k in name for k in _SKIP_SERIES):
            continue
        return s
    return tif.series[0]


def _tiff_scale(tif: Any, axes: str) -> tuple[float, ...]:
    """Physical pixel size per spatial axis: SVS MPP, OME PhysicalSize*, or resolution tags."""
    sp = axes.replace("C", "")
    size = {a: 1.0 for a in sp}
    page = tif.pages[0]
    desc = page.description or ""
    m = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
    if m:
        size["X"] = size["Y"] = float(m.group(1))
    elif tif.is_ome and tif.ome_metadata:
        from tifffile import xml2dict

        try:
            pix = xml2dict(tif.ome_metadata)["OME"]["Image"]
            pix = (pix[0] if isinstance(pix, list) else pix)["Pixels"]
            for a in "XYZ":
                if f"PhysicalSize{a}" in pix:
                    size[a] = float(pix[f"PhysicalSize{a}"])
        except (KeyError, TypeError, ValueError):
            pass
    else:
        tags = page.tags
        unit = tags.get("ResolutionUnit")
        per_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value) if unit else 0)
        for a, tag in (("X", "XResolution"), ("Y", "YResolution")):
            t = tags.get(tag)
            if t is not None and per_um:
                num, den = t.value
                if num:
                    size[a] = per_um * den / num  # micrometres per pixel
    return tuple(size[a] for a in sp)


def read_tiff(path: Path) -> ImageData:
    """TIFF/SVS/OME-TIFF as lazy dask arrays over the file's tiles, all pyramid levels.

    Level scales come from the level shapes (SVS levels are often 4x apart, not 2x); slide
    label/macro/thumbnail series are skipped.
    """
    import dask.array as da
    import tifffile
    import zarr

    tif = tifffile.TiffFile(str(path))
    series = _pick_series(tif)
    taxes = series.axes
    levels = []
    for i in range(len(series.levels)):
        store = series.aszarr(level=i)
        z = zarr.open(store, mode="r")
        arr = z if hasattr(z, "shape") else z[str(i)]
        levels.append(da.from_zarr(arr))
    # Map tifffile's axis letters; drop length-1 axes it does not know.
    keep = []
    axes = ""
    for j, a in enumerate(taxes):
        letter = _TIFF_AXES.get(a)
        if letter is None or letter in axes:
            if series.shape[j] != 1:
                raise InputError(
                    f"{path.name}: unsupported TIFF axes {taxes!r} (axis {a!r} has length {series.shape[j]})"
                )
            continue
        keep.append(j)
        axes += letter
    if len(keep) != len(taxes):
        idx = tuple(slice(None) if j in keep else 0 for j in range(len(taxes)))
        levels = [lv[idx] for lv in levels]
    if "C" in axes and axes[-1] != "C":  # channel last, like napari's rgb convention
        order = [i for i, a in enumerate(axes) if a != "C"] + [axes.index("C")]
        levels = [lv.transpose(order) for lv in levels]
        axes = "".join(axes[i] for i in order)
    base = levels[0]
    if base.nbytes <= EAGER_BYTES and len(levels) == 1:
        levels = [to_numpy(base)]
    scale = _tiff_scale(tif, axes)
    meta = {
        "path": str(path),
        "series": series.name,
        "tiff_axes": taxes,
        "is_svs": tif.is_svs,
        "is_ome": tif.is_ome,
        "description": (tif.pages[0].description or "")[:2000],
    }
    if not tif.is_svs and len(levels) == 1 and isinstance(levels[0], np.ndarray):
        tif.close()
    spatial = len(axes.replace("C", ""))
    return ImageData(levels[0], levels, axes, scale, (0.0,) * spatial, None, meta, "tiff")


# -- a folder (or glob) of frames -------------------------------------------------------------------
def _read_frame(path: str) -> np.ndarray:
    if path.lower().endswith((".tif", ".tiff")):
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as im:
        if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
            import warnings

            from ..nca.errors import OctreeNCAWarning

            warnings.warn(
                OctreeNCAWarning(f"{path}: the alpha (transparency) channel is dropped; the image is read as RGB"),
                stacklevel=2,
            )
        return np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB", "I;16", "I") else im)


def _read_same(path: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    arr = _read_frame(path)
    if arr.shape != shape or str(arr.dtype) != dtype:
        raise InputError(f"frame {path} is {arr.shape} {arr.dtype}; the first frame is {shape} {dtype}")
    return arr


def read_frames(path: Path | str) -> ImageData:
    """A folder (or glob) of same-size frames as a lazy ``(T, H, W[, C])`` stack, name-sorted."""
    import dask
    import dask.array as da

    p = Path(path)
    if p.is_file():  # one picture: a 2D image, not a one-frame video
        arr = _read_frame(str(p))
        axes = "YXC" if arr.ndim == 3 else "YX"
        return ImageData(arr, [arr], axes, (1.0, 1.0), (0.0, 0.0), None, {"path": str(p), "files": [str(p)]}, "frames")
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
    else:
        files = sorted(glob.glob(str(path)))
    if not files:
        raise InputError(f"no image frames ({', '.join(FRAME_SUFFIXES)}) found at {path}")
    first = _read_frame(files[0])
    frames = [
        da.from_delayed(dask.delayed(_read_same)(f, first.shape, str(first.dtype)), first.shape, first.dtype)
        for f in files
    ]
    data = da.stack(frames)
    axes = "TYXC" if first.ndim == 3 else "TYX"
    meta = {"path": str(path), "files": files}
    return ImageData(data, [data], axes, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), None, meta, "frames")


__all__ = ["ImageData", "read_image", "read_nifti", "read_tiff", "read_frames", "file_kind"]
