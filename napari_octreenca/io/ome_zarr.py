"""OME-Zarr (NGFF 0.5 on zarr v3; 0.4 on zarr v2 is read too): images and labels, multiscale.

Arrays are written with zarr directly and the NGFF metadata with ome-zarr-py, because outputs are
filled tile by tile: each tile writes whole chunks of every pyramid level (zarr writes a chunk
to a temporary file and renames it), and the ``labels`` listing that makes viewers show the
result is added only when every tile is done, so an interrupted run never looks complete.
``ome-zarr`` (the reference reader) reads what is written here; the tests check that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..nca.errors import InputError
from .image import ImageData

NGFF_VERSION = "0.5"
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def _ome_attrs(group: zarr.Group) -> dict[str, Any]:
    attrs = dict(group.attrs)
    return dict(attrs["ome"]) if "ome" in attrs else attrs  # 0.5 nests under "ome"; 0.4 does not


def _ngff_axes(axes: str, units: dict[str, str] | None = None) -> list[dict[str, str]]:
    out = []
    for a in axes.lower():
        d = {"name": a, "type": _AXIS_TYPES[a]}
        if units and a in units:
            d["unit"] = units[a]
        out.append(d)
    return out


def _ngff_order(axes: str) -> str:
    """NGFF wants time, then channel, then space."""
    return "".join(a for a in "TCZYX" if a in axes)


def level_factors(
    shape: tuple[int, ...], axes: str, chunk: tuple[int, ...], levels: int | None
) -> list[tuple[int, ...]]:
    """Per-level cumulative factors: 2x per level on Y and X, down to about one chunk."""
    if levels is None:
        levels = 1
        yx = [i for i, a in enumerate(axes) if a in "YX"]
        while yx and min(shape[i] // 2**levels for i in yx) >= 64 and levels < 8:
            levels += 1
    return [tuple(2**k if a in "YX" else 1 for a in axes) for k in range(levels)]


def multiscales(
    axes: str,
    factors: list[tuple[int, ...]],
    scale: tuple[float, ...],
    translate: tuple[float, ...],
    name: str,
    units: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The NGFF ``multiscales`` entry (``axes`` in NGFF order; scale/translate per axis)."""
    datasets = []
    for k, f in enumerate(factors):
        s = [float(sc * fi) for sc, fi in zip(scale, f)]
        # Pixel centres of a level shift by half its coarser pixel: keep them aligned to level 0.
        t = [float(tr + (fi - 1) * sc / 2) for tr, sc, fi in zip(translate, scale, f)]
        ct: list[dict[str, Any]] = [{"type": "scale", "scale": s}]
        if any(v != 0 for v in t):
            ct.append({"type": "translation", "translation": t})
        datasets.append({"path": str(k), "coordinateTransformations": ct})
    return {"axes": _ngff_axes(axes, units), "datasets": datasets, "name": name}


def write_multiscales(
    group: zarr.Group,
    axes: str,
    factors: list[tuple[int, ...]],
    scale: tuple[float, ...],
    translate: tuple[float, ...],
    name: str,
    units: dict[str, str] | None = None,
    **extra: Any,
) -> None:
    """Write the NGFF 0.5 ``multiscales`` metadata of ``group`` with ome-zarr-py's writer (which
    validates axes and transformations); ``extra`` entries (e.g. ``image-label``) join it under ``ome``."""
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    ms = multiscales(axes, factors, scale, translate, name, units)
    write_multiscales_metadata(group, ms["datasets"], fmt=FormatV05(), axes=ms["axes"], name=name)
    if extra:
        group.attrs["ome"] = {**dict(group.attrs["ome"]), **extra}


def _strided(a: Any, f: tuple[int, ...]) -> Any:
    return a[tuple(slice(None, None, x) for x in f)]


class LabelsWriter:
    """An OME-Zarr labels image filled tile by tile (all pyramid levels), listed when finished."""

    def __init__(
        self,
        root: str | Path,
        axes: str,
        shape: tuple[int, ...],
        dtype: Any,
        chunk: tuple[int, ...],
        *,
        name: str = "segmentation",
        scale: tuple[float, ...] | None = None,
        translate: tuple[float, ...] | None = None,
        class_names: tuple[str, ...] = (),
        levels: int | None = None,
        source: str | None = None,
        units: dict[str, str] | None = None,
    ):
        self.root = Path(root)
        self.axes = axes
        self.name = name
        # Tiles must start on multiples of every level's factor (then strided slicing is exact).
        self.factors = level_factors(shape, axes, chunk, levels)
        top = self.factors[-1]
        while any(c % f for c, f, n in zip(chunk, top, shape) if c < n) and len(self.factors) > 1:
            self.factors.pop()
            top = self.factors[-1]
        root_group = zarr.open_group(str(self.root), mode="a", zarr_format=3)
        if "ome" not in root_group.attrs:
            root_group.attrs["ome"] = {"version": NGFF_VERSION}
        labels = root_group.require_group("labels")
        if "ome" not in labels.attrs:
            labels.attrs["ome"] = {"version": NGFF_VERSION, "labels": []}
        unlist_labels(labels, name)  # before any chunk changes: a killed rewrite never looks complete
        g = labels.require_group(name)
        scale = scale or (1.0,) * len(axes)
        translate = translate or (0.0,) * len(axes)
        colors = [{"label-value": i + 1, "rgba": _color(i)} for i in range(len(class_names))]
        props = [{"label-value": i + 1, "class": c} for i, c in enumerate(class_names)]
        image_label: dict[str, Any] = {"version": NGFF_VERSION, "colors": colors, "properties": props}
        image_label["source"] = {"image": "../../"}
        write_multiscales(g, axes, self.factors, scale, translate, name, units, **{"image-label": image_label})
        g.attrs["octreenca"] = {"source": source, "complete": False} if source else {"complete": False}
        self.group = g
        self.arrays = []
        for k, f in enumerate(self.factors):
            shp = tuple(-(-n // fi) for n, fi in zip(shape, f))
            ch = tuple(max(1, min(n, -(-c // fi))) for c, fi, n in zip(chunk, f, shp))
            if str(k) in g:
                arr = g[str(k)]
                if tuple(arr.shape) != shp:
                    raise InputError(f"{self.root}/labels/{name}/{k} exists with shape {arr.shape}, expected {shp}")
            else:
                arr = g.create_array(
                    str(k), shape=shp, chunks=ch, dtype=dtype, fill_value=0, dimension_names=list(axes.lower())
                )
            self.arrays.append(arr)

    def write(self, start: tuple[int, ...], labels: np.ndarray) -> None:
        """Write a tile whose first cell is ``start`` into every level."""
        for arr, f in zip(self.arrays, self.factors):
            # Level k holds every f-th cell of level 0: the first one at or after ``start``.
            s = tuple(-(-a // fi) for a, fi in zip(start, f))
            part = labels[tuple(slice((-a) % fi, None, fi) for a, fi in zip(start, f))]
            arr[tuple(slice(a, a + n) for a, n in zip(s, part.shape))] = part

    def finish(self) -> None:
        """List the labels image (viewers show it from now on) and mark it complete."""
        labels = self.group_parent()
        ome = dict(labels.attrs["ome"])
        names = list(ome.get("labels", []))
        if self.name not in names:
            names.append(self.name)
        ome["labels"] = names
        labels.attrs["ome"] = ome
        if "octreenca" in self.group.attrs:
            meta = dict(self.group.attrs["octreenca"])
            meta["complete"] = True
            self.group.attrs["octreenca"] = meta

    def group_parent(self) -> zarr.Group:
        return zarr.open_group(str(self.root / "labels"), mode="a")


def unlist_labels(labels: zarr.Group, name: str) -> None:
    """Remove ``name`` from a ``labels`` group's listing and mark it incomplete (first step of any rewrite)."""
    ome = dict(labels.attrs.get("ome", {}))
    if name in ome.get("labels", []):
        ome["labels"] = [n for n in ome["labels"] if n != name]
        labels.attrs["ome"] = ome
    if name in labels:
        g = labels[name]
        meta = dict(g.attrs.get("octreenca", {}))
        if meta.get("complete", True):
            meta["complete"] = False
            g.attrs["octreenca"] = meta


def _color(i: int) -> list[int]:
    palette = [
        [255, 0, 0, 255],
        [0, 200, 0, 255],
        [0, 80, 255, 255],
        [255, 200, 0, 255],
        [200, 0, 255, 255],
        [0, 220, 220, 255],
    ]
    return palette[i % len(palette)]


def write_ome_zarr_image(
    path: str | Path,
    data: Any,
    axes: str,
    *,
    scale: tuple[float, ...] | None = None,
    translate: tuple[float, ...] | None = None,
    levels: int | None = None,
    chunk: int = 256,
    name: str = "image",
) -> Path:
    """Write an image (numpy/dask, ``axes`` e.g. "YXC") as a new OME-Zarr multiscale, atomically.

    Written into a temporary folder beside ``path`` and renamed at the end, so a crash leaves
    no half-written image. ``scale``/``translate`` are per spatial axis (input order).
    """
    import dask.array as da

    path = Path(path)
    if path.exists():
        raise InputError(f"{path} exists; remove it or choose another path")
    order = _ngff_order(axes)
    perm = [axes.index(a) for a in order]
    arr = da.asarray(data).transpose(perm)
    spatial = [a for a in axes if a != "C"]
    sc = dict(zip(spatial, scale or (1.0,) * len(spatial)))
    tr = dict(zip(spatial, translate or (0.0,) * len(spatial)))
    chunks = tuple(1 if a == "C" else (chunk if a in "YX" else min(arr.shape[i], 32)) for i, a in enumerate(order))
    factors = level_factors(tuple(arr.shape), order, chunks, levels)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent))
    try:
        g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for k, f in enumerate(factors):
            lv = _strided(arr, f) if k else arr
            z = g.create_array(
                str(k),
                shape=lv.shape,
                chunks=tuple(min(c, n) for c, n in zip(chunks, lv.shape)),
                dtype=lv.dtype,
                fill_value=0,
                dimension_names=list(order.lower()),
            )
            da.store(lv, z, lock=False)
        write_multiscales(
            g, order, factors, tuple(sc.get(a, 1.0) for a in order), tuple(tr.get(a, 0.0) for a in order), name
        )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def read_ome_zarr(path: str | Path, *, labels: str | None = None) -> ImageData:
    """Read an OME-Zarr multiscale image (or ``labels/<labels>``) lazily, channel axis last.

    A root with only a ``labels`` group (what ``write_labels`` makes for a new file) reads as its
    first labels image.
    """
    import dask.array as da

    path = Path(path)
    try:
        g = zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise InputError(f"{path} is not a zarr group: {exc}") from exc
    attrs = _ome_attrs(g)
    if labels is not None or "multiscales" not in attrs:
        if "labels" not in g:
            raise InputError(f"{path} has no OME-Zarr multiscales (not an OME-Zarr image)")
        lg = g["labels"]
        names = _ome_attrs(lg).get("labels") or sorted(k for k in lg.group_keys())
        if not names:
            raise InputError(f"{path}/labels lists no labels images")
        pick = labels or names[0]
        g = lg[pick]
        attrs = _ome_attrs(g)
    ms = attrs["multiscales"][0]
    names = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])] or list("tczyx")[-g["0"].ndim :]
    axes = "".join(n.upper() for n in names)
    if set(axes) - set("TCZYX"):
        raise InputError(f"{path}: unsupported OME-Zarr axes {names}")
    levels = [da.from_zarr(g[d["path"]]) for d in ms["datasets"]]
    ct = ms["datasets"][0].get("coordinateTransformations", [])
    scale = next((t["scale"] for t in ct if t["type"] == "scale"), [1.0] * len(axes))
    translate = next((t["translation"] for t in ct if t["type"] == "translation"), [0.0] * len(axes))
    if "C" in axes and axes[-1] != "C":
        order = [i for i, a in enumerate(axes) if a != "C"] + [axes.index("C")]
        levels = [lv.transpose(order) for lv in levels]
    sp = [i for i, a in enumerate(axes) if a != "C"]
    out_axes = "".join(axes[i] for i in sp) + ("C" if "C" in axes else "")
    meta: dict[str, Any] = {
        "path": str(path),
        "multiscales": ms,
        "ngff_version": attrs.get("version", ms.get("version")),
    }
    if "image-label" in attrs:
        meta["image-label"] = attrs["image-label"]
    if "labels" in g:
        meta["labels"] = _ome_attrs(g["labels"]).get("labels", [])
    return ImageData(
        levels[0],
        levels,
        out_axes,
        tuple(float(scale[i]) for i in sp),
        tuple(float(translate[i]) for i in sp),
        None,
        meta,
        "ome-zarr",
    )


class OmeZarrLabelsSink:
    """Tiled-run sink that writes each labels tile straight into an OME-Zarr labels pyramid.

    Picklable (dask workers reopen the level arrays); ``finish`` lists the labels image.
    """

    def __init__(
        self,
        root: str | Path,
        axes: str,
        *,
        name: str = "segmentation",
        scale: tuple[float, ...] | None = None,
        translate: tuple[float, ...] | None = None,
        class_names: tuple[str, ...] = (),
        source: str | None = None,
    ):
        self.root = str(root)
        self.axes = axes
        self.name = name
        self.scale = scale
        self.translate = translate
        self.class_names = tuple(class_names)
        self.source = source
        self.factors: list[tuple[int, ...]] = []
        self._arrays: list[Any] = []
        self.arrays: dict[str, Any] = {}

    def open(self, store: Any, shape: tuple[int, ...], tile: tuple[int, ...], classes: int, runs: int) -> None:
        dtype = np.uint8 if classes < 255 else np.uint16
        w = LabelsWriter(
            self.root,
            self.axes,
            shape,
            dtype,
            tile,
            name=self.name,
            scale=self.scale,
            translate=self.translate,
            class_names=self.class_names,
            source=self.source,
        )
        self.factors = w.factors
        self._arrays = w.arrays
        self.arrays = {"labels": w.arrays[0]}

    def _levels(self) -> list[Any]:
        if not self._arrays:
            base = Path(self.root) / "labels" / self.name
            self._arrays = [zarr.open_array(str(base / str(k)), mode="r+") for k in range(len(self.factors))]
        return self._arrays

    def write(self, box: Any, labels: np.ndarray, logits: np.ndarray, spread: np.ndarray | None) -> None:
        for arr, f in zip(self._levels(), self.factors):
            s = tuple(-(-a // fi) for a, fi in zip(box.start, f))
            part = labels[tuple(slice((-a) % fi, None, fi) for a, fi in zip(box.start, f))]
            arr[tuple(slice(a, a + n) for a, n in zip(s, part.shape))] = part

    def finish(self) -> None:
        g = zarr.open_group(self.root, mode="a")
        labels = g["labels"]
        ome = dict(labels.attrs["ome"])
        ome["labels"] = sorted(set(ome.get("labels", [])) | {self.name})
        labels.attrs["ome"] = ome
        lg = labels[self.name]
        if "octreenca" in lg.attrs:
            meta = dict(lg.attrs["octreenca"])
            meta["complete"] = True
            lg.attrs["octreenca"] = meta

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_arrays=[], arrays={})
        return state
