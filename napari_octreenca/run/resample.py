"""Resampling to a model's fixed voxel spacing and back.

A model whose ``config.spacing`` is set was trained at that spacing (e.g. 3 mm isotropic MRI, or
H&E at 2 source pixels per cell). Scans of any spacing are resampled to it before the NCA runs,
and the logits are resampled back onto the input's grid, so labels always match the input.

Spacings are per spatial axis. The input's spacing is in the input's spatial axis order (what
napari's layer ``scale`` or a NIfTI header gives); the model's spacing is in the model's axis
order (``config.axes``). Voxels are treated as cells (``grid_mode``), so resampling there and
back keeps the field of view exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..nca.errors import InputError


def _check(spacing: Sequence[float], ndim: int, what: str) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim:
        raise InputError(f"{what} {sp} must have one value per spatial axis ({ndim})")
    if any(not np.isfinite(s) or s <= 0 for s in sp):
        raise InputError(f"{what} {sp} must be positive; set the image's voxel size (scale)")
    return sp


def model_grid_shape(shape: Sequence[int], spacing: Sequence[float], model_spacing: Sequence[float]) -> tuple[int, ...]:
    """Spatial shape of an image of ``shape`` at ``spacing`` once resampled to ``model_spacing``."""
    sp = _check(spacing, len(shape), "spacing")
    msp = _check(model_spacing, len(shape), "model spacing")
    return tuple(max(1, int(round(n * s / m))) for n, s, m in zip(shape, sp, msp))


def _zoom_to(
    array: np.ndarray, shape: Sequence[int], order: int, spatial_axes: Sequence[int], antialias: bool
) -> np.ndarray:
    from scipy import ndimage

    src = np.asarray(array)
    zoom = [1.0] * src.ndim
    for ax, n in zip(spatial_axes, shape):
        zoom[ax] = n / src.shape[ax]
    if all(abs(z - 1.0) < 1e-12 for z in zoom):
        return src
    work = src.astype(np.float32) if order > 0 else src
    if antialias and order > 0:
        # Down-sampling: low-pass first so that fine texture does not alias into the result.
        sigma = [max(0.0, (1.0 / z - 1.0) / 2.0) if z < 1 else 0.0 for z in zoom]
        if any(s > 0 for s in sigma):
            work = ndimage.gaussian_filter(work, sigma, mode="nearest")
    out = ndimage.zoom(work, zoom, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    # zoom rounds the output size; make sure it is exactly the requested shape.
    assert all(out.shape[ax] == n for ax, n in zip(spatial_axes, shape)), (out.shape, shape)
    return out


def resample_to_model_spacing(
    image: Any,
    spacing: Sequence[float],
    model_spacing: Sequence[float],
    *,
    channel_axis: int | None = None,
    order: int = 1,
) -> np.ndarray:
    """Resample ``image`` (spatial axes in the same order as ``spacing``) to ``model_spacing``.

    ``channel_axis`` names a colour/channel axis that is left alone. Images are low-pass
    filtered before down-sampling; the result is float32 (or the input dtype for ``order=0``).
    """
    arr = np.asarray(image)
    spatial = [a for a in range(arr.ndim) if a != (channel_axis % arr.ndim if channel_axis is not None else None)]
    shape = model_grid_shape([arr.shape[a] for a in spatial], spacing, model_spacing)
    return _zoom_to(arr, shape, order, spatial, antialias=order > 0)


def resample_back(array: Any, shape: Sequence[int], *, channel_axis: int | None = None, order: int = 1) -> np.ndarray:
    """Resample logits/probabilities (``order=1``) or labels (``order=0``) onto the spatial ``shape``."""
    arr = np.asarray(array)
    spatial = [a for a in range(arr.ndim) if a != (channel_axis % arr.ndim if channel_axis is not None else None)]
    if len(spatial) != len(shape):
        raise InputError(f"cannot resample an array of shape {arr.shape} back to spatial shape {tuple(shape)}")
    return _zoom_to(arr, shape, order, spatial, antialias=False)


def resample_labels_back(labels: Any, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label image onto the spatial ``shape`` (dtype kept)."""
    return resample_back(labels, shape, order=0)


def model_spacing_in_input_order(config: Any, input_axes: str) -> tuple[float, ...]:
    """The model's spacing (``config.axes`` order) reordered to an input's spatial axes.

    Time and depth are interchangeable third axes (a video model's T is an MRI's Z).
    """
    if config.spacing is None:
        raise InputError("this model has no fixed spacing")
    spatial = input_axes.upper().replace("C", "")
    trans = {"T": "Z", "Z": "T"}
    out = []
    for a in spatial:
        key = a if a in config.axes else trans.get(a, a)
        if key not in config.axes:
            raise InputError(f"input axes {input_axes!r} do not fit the model's axes {config.axes!r}")
        out.append(float(config.spacing[config.axes.index(key)]))
    return tuple(out)


def _ras_transforms(affine: Any) -> tuple[np.ndarray, np.ndarray]:
    """(file -> RAS+, RAS+ -> file) nibabel orientation transforms of a NIfTI affine."""
    from nibabel import orientations as ornt

    file_ornt = ornt.io_orientation(np.asarray(affine, float))
    ras = ornt.axcodes2ornt(("R", "A", "S"))
    return ornt.ornt_transform(file_ornt, ras), ornt.ornt_transform(ras, file_ornt)


def reorient_zyx_to_ras(volume: Any, affine: Any) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI volume read as ``(Z, Y, X)`` = the file's ``(k, j, i)`` -> RAS+ ``(Z, Y, X)`` and its spacing.

    ``affine`` is the file's own ``(i, j, k)`` affine. RAS+ as ZYX means Z = inferior->superior,
    Y = posterior->anterior, X = left->right, whatever order the file stores.
    """
    from nibabel import orientations as ornt

    fwd, _ = _ras_transforms(affine)
    aff = np.asarray(affine, float)
    zooms = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))  # per file axis (i, j, k)
    ijk = np.asarray(volume).transpose(2, 1, 0)
    ras = ornt.apply_orientation(ijk, fwd)
    sp = np.empty(3)
    for axis, (target, _) in enumerate(fwd):
        sp[int(target)] = zooms[axis]
    return np.ascontiguousarray(ras.transpose(2, 1, 0)), (float(sp[2]), float(sp[1]), float(sp[0]))


def reorient_ras_to_zyx(volume: Any, affine: Any, channel_axis: int | None = None) -> np.ndarray:
    """Undo :func:`reorient_zyx_to_ras`: RAS+ ``(Z, Y, X)`` (optionally with a leading channel axis
    at ``channel_axis=0``) back to the file's ``(k, j, i)`` order."""
    from nibabel import orientations as ornt

    _, back = _ras_transforms(affine)
    arr = np.asarray(volume)
    if channel_axis is not None:
        return np.stack([reorient_ras_to_zyx(a, affine) for a in np.moveaxis(arr, channel_axis, 0)], channel_axis)
    xyz = arr.transpose(2, 1, 0)
    return np.ascontiguousarray(ornt.apply_orientation(xyz, back).transpose(2, 1, 0))


def segment_at_model_spacing(
    model: Any,
    image: Any,
    spacing: Sequence[float] | None = None,
    *,
    axes: str | None = None,
    affine: Any = None,
    **kwargs: Any,
) -> Any:
    """:func:`~napari_octreenca.run.inference.segment` for models with a fixed ``config.spacing``.

    ``spacing`` is the input's voxel size per spatial axis in input order (default 1 per axis,
    i.e. the model's spacing is then in input pixels). The image is resampled to the model's
    spacing, segmented, and the logits (and spread) are resampled back linearly onto the input
    grid, where the labels are taken. Models without a spacing are segmented as they are.

    ``affine`` (3D models only): the NIfTI ``(i, j, k)`` affine of a volume given as ``(Z, Y, X)`` =
    ``(k, j, i)`` (how ``io.readers.read_nifti`` returns it). The volume is then reoriented to RAS+
    first (the orientation the bundled brain model was trained in), its spacing taken from the
    affine when ``spacing`` is None, and the results reoriented back to the file's order.
    """
    from .inference import Segmentation, labels_from_logits, segment
    from .inputs import plan_axes, to_tensor

    cfg = model.config
    if affine is not None:
        if cfg.spatial_dims != 3 or (axes or "ZYX").upper() != "ZYX":
            raise InputError("affine= needs a 3D model and a (Z, Y, X) volume without channels")
        if spacing is not None:
            raise InputError("give either spacing= or affine= (the spacing then comes from it), not both")
        vol, sp_ras = reorient_zyx_to_ras(to_tensor(image).numpy(), affine)
        res = segment_at_model_spacing(model, vol, sp_ras, axes="ZYX", **kwargs)
        logits = reorient_ras_to_zyx(res.logits, affine, channel_axis=0)
        spread = None if res.spread is None else reorient_ras_to_zyx(res.spread, affine, channel_axis=0)
        record = dict(res.record, reoriented="RAS+")
        return Segmentation(
            labels=labels_from_logits(logits),
            logits=logits,
            spread=spread,
            class_names=res.class_names,
            axes="ZYX",
            seeds=res.seeds,
            seconds=res.seconds,
            record=record,
        )
    if cfg.spacing is None:
        return segment(model, image, axes=axes, **kwargs)
    arr = to_tensor(image).numpy()
    plan = plan_axes(tuple(arr.shape), cfg, axes)
    c_ax = plan.input_axes.index("C") if plan.has_channel else None
    in_shape = tuple(n for a, n in zip(plan.input_axes, arr.shape) if a != "C")
    sp = tuple(spacing) if spacing is not None else (1.0,) * len(in_shape)
    msp = model_spacing_in_input_order(cfg, plan.input_axes)
    small = resample_to_model_spacing(arr, sp, msp, channel_axis=c_ax)
    if arr.dtype == np.uint8:  # keep the dtype the normalisation expects (e.g. RGB / 255)
        small = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    res = segment(model, small, axes=plan.input_axes, **kwargs)
    logits = resample_back(res.logits, in_shape, channel_axis=0, order=1)
    spread = None if res.spread is None else resample_back(res.spread, in_shape, channel_axis=0, order=1)
    record = dict(res.record)
    grid = [int(n) for a, n in zip(plan.input_axes, small.shape) if a != "C"]
    record.update({"input_spacing": list(sp), "model_spacing": list(msp), "model_grid": grid})
    return Segmentation(
        labels=labels_from_logits(logits),
        logits=logits.astype(np.float32),
        spread=spread,
        class_names=res.class_names,
        axes=res.axes,
        seeds=res.seeds,
        seconds=res.seconds,
        record=record,
    )


__all__ = [
    "model_grid_shape",
    "resample_to_model_spacing",
    "resample_back",
    "resample_labels_back",
    "reorient_zyx_to_ras",
    "reorient_ras_to_zyx",
    "model_spacing_in_input_order",
    "segment_at_model_spacing",
]


# -- RAS+ geometry without pixels, and tile-by-tile resampling ---------------------------------------
def ras_axis_permutation(affine: Any) -> tuple[int, int, int]:
    """For each file ``(Z, Y, X)`` axis, the RAS+ ``(Z, Y, X)`` axis it becomes."""
    fwd, _ = _ras_transforms(affine)
    # fwd[i] = (target RAS axis, flip) for file axis i (i, j, k) = (X, Y, Z) of a ZYX volume.
    zyx_of_ijk = {0: 2, 1: 1, 2: 0}
    perm = [0, 0, 0]
    for i, (target, _flip) in enumerate(fwd):
        perm[zyx_of_ijk[i]] = zyx_of_ijk[int(target)]
    return perm[0], perm[1], perm[2]


def ras_shape_and_spacing(shape_zyx: Sequence[int], affine: Any) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape and spacing of a ``(Z, Y, X)`` volume once reoriented to RAS+ (no pixels touched)."""
    aff = np.asarray(affine, float)
    zooms_ijk = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    zooms_zyx = (float(zooms_ijk[2]), float(zooms_ijk[1]), float(zooms_ijk[0]))
    perm = ras_axis_permutation(aff)
    shape = [0, 0, 0]
    sp = [0.0, 0.0, 0.0]
    for axis, target in enumerate(perm):
        shape[target] = int(shape_zyx[axis])
        sp[target] = zooms_zyx[axis]
    return tuple(shape), tuple(sp)


def _source_window(start: int, stop: int, ratio: float, n_src: int, halo: int) -> tuple[int, int, float]:
    """Source cells ``[lo, hi)`` needed for output cells ``[start, stop)`` of a ``grid_mode`` zoom
    (output cell ``x`` samples source ``(x + 0.5) * ratio - 0.5``), and that coordinate of ``start``."""
    first = (start + 0.5) * ratio - 0.5
    last = (stop - 0.5) * ratio - 0.5
    lo = max(0, int(math.floor(first)) - halo)
    hi = min(n_src, int(math.floor(last)) + 2 + halo)
    return lo, hi, first - lo


def resample_box(
    source: Any,
    src_shape: Sequence[int],
    out_shape: Sequence[int],
    start: Sequence[int],
    stop: Sequence[int],
    *,
    spatial_axes: Sequence[int],
    order: int = 1,
    antialias: bool = True,
) -> np.ndarray:
    """Cells ``[start, stop)`` of :func:`_zoom_to` of ``source`` to ``out_shape``, reading only the
    source window they need (plus the anti-alias filter's reach). Equals the whole-array zoom up
    to float rounding, so resampling can run tile by tile on inputs that do not fit in memory."""
    from scipy import ndimage

    from ..io.image import to_numpy

    ratios = [n / m for n, m in zip(src_shape, out_shape)]
    sigmas = [max(0.0, (r - 1.0) / 2.0) if (antialias and order > 0 and r > 1) else 0.0 for r in ratios]
    halos = [int(4.0 * s + 0.5) + 1 if s > 0 else 0 for s in sigmas]  # gaussian_filter's truncate=4
    nd = len(np.shape(source)) if hasattr(source, "shape") else np.ndim(source)
    window: list[slice] = [slice(None)] * nd
    offsets = []
    for k, ax in enumerate(spatial_axes):
        lo, hi, off = _source_window(int(start[k]), int(stop[k]), ratios[k], int(src_shape[k]), halos[k])
        window[ax] = slice(lo, hi)
        offsets.append(off)
    block = to_numpy(source[tuple(window)])
    work = block.astype(np.float32) if order > 0 else block
    if any(s > 0 for s in sigmas):
        sig = [0.0] * nd
        for k, ax in enumerate(spatial_axes):
            sig[ax] = sigmas[k]
        work = ndimage.gaussian_filter(work, sig, mode="nearest")
    size = [int(b) - int(a) for a, b in zip(start, stop)]
    out_shape_full = list(work.shape)
    matrix = [1.0] * nd
    offset = [0.0] * nd
    for k, ax in enumerate(spatial_axes):
        out_shape_full[ax] = size[k]
        matrix[ax] = ratios[k]
        offset[ax] = offsets[k]
    return ndimage.affine_transform(
        work,
        matrix,
        offset=offset,
        output_shape=tuple(out_shape_full),
        order=order,
        mode="nearest",
        prefilter=order > 1,
    )


def lazy_resampled(
    source: Any, axes: str, out_spatial: Sequence[int], chunk: int, *, order: int = 1, round_uint8: bool = True
) -> Any:
    """A dask array of ``source`` resampled to ``out_spatial`` (input axis order), computed chunk by
    chunk from the source windows it needs: the input never has to fit in memory."""
    import dask.array as da

    spatial_axes = [i for i, a in enumerate(axes) if a != "C"]
    src_shape = [int(source.shape[a]) for a in spatial_axes]
    shape = []
    it = iter(out_spatial)
    for a, n in zip(axes, source.shape):
        shape.append(int(n) if a == "C" else int(next(it)))
    chunks = tuple((int(n),) if a == "C" else _chunk_sizes(int(n), chunk) for a, n in zip(axes, shape))
    uint8 = round_uint8 and np.dtype(source.dtype) == np.uint8
    dtype = np.uint8 if uint8 else np.float32

    def block(block_info: Any = None) -> np.ndarray:
        loc = block_info[None]["array-location"]
        start = [loc[a][0] for a in spatial_axes]
        stop = [loc[a][1] for a in spatial_axes]
        out = resample_box(source, src_shape, list(out_spatial), start, stop, spatial_axes=spatial_axes, order=order)
        if uint8:
            out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        return out.astype(dtype, copy=False)

    return da.map_blocks(block, chunks=chunks, dtype=dtype, meta=np.empty((0,) * len(shape), dtype))


def _chunk_sizes(n: int, chunk: int) -> tuple[int, ...]:
    full, rest = divmod(n, chunk)
    return (chunk,) * full + ((rest,) if rest else ())
