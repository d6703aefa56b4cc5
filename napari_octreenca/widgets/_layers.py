"""Between napari layers and the engine: the input array and geometry of an Image layer, and the
output layers (labels, probability, uncertainty) placed at that geometry. Qt-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..run.inference import Segmentation
from ..run.planner import InputGeometry

LayerData = tuple[Any, dict[str, Any], str]


@dataclass
class LayerInput:
    """What the engine needs from an Image layer, and where the result goes in the world."""

    name: str
    array: Any  # the chosen pyramid level (numpy, dask or zarr)
    axes: str | None  # from the reader's metadata, else None (the engine guesses)
    level: int  # pyramid level computed on (0 = finest)
    level_shapes: list[tuple[int, ...]]  # spatial shape of every pyramid level (multiscale)
    scale: tuple[float, ...]  # world scale of the spatial axes at level 0
    translate: tuple[float, ...]
    affine: np.ndarray | None  # (n + 1, n + 1) layer affine over the spatial axes, if not identity
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def multiscale(self) -> bool:
        return len(self.level_shapes) > 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.level_shapes[self.level]

    @property
    def level_scale(self) -> tuple[float, ...]:
        """World size of a pixel of the pyramid level being segmented (the input spacing)."""
        f = [n0 / n for n0, n in zip(self.level_shapes[0], self.spatial_shape)]
        return tuple(s * fi for s, fi in zip(self.scale, f))

    def geometry(self) -> InputGeometry:
        """What the run planner needs: shape, axes, spacing and, for a NIfTI volume read by this
        plugin, the file's affine (fixed-spacing 3D models then run in RAS+)."""
        octree = self.metadata.get("octreenca") or {}
        aff = octree.get("affine") if octree.get("kind") == "nifti" and self.level == 0 else None
        return InputGeometry(
            tuple(int(n) for n in self.array.shape),
            self.axes,
            self.level_scale,
            None if aff is None else np.asarray(aff, float),
        )


def _channel_index(layer: Any, axes: str | None) -> int | None:
    """Index of a channel axis that napari shows as a dimension (not the RGB axis)."""
    if axes and "C" in axes:
        c = axes.index("C")
        if layer.rgb and c == len(axes) - 1:
            return None
        return c
    return None


#: Axis labels (lower case) that name an engine axis.
_LABEL_AXES = {"t": "T", "time": "T", "z": "Z", "depth": "Z", "y": "Y", "x": "X", "c": "C", "channel": "C"}


def _axes_from_labels(layer: Any) -> str | None:
    """The layer's axes from its napari axis labels (e.g. ``("t", "y", "x")`` -> ``TYX``, plus
    ``C`` for an RGB layer), or None unless every label names a distinct axis."""
    labels = [str(a).strip().lower() for a in getattr(layer, "axis_labels", ())]
    axes = "".join(_LABEL_AXES.get(a, "?") for a in labels)
    if len(labels) != layer.ndim or "?" in axes or len(set(axes)) != len(axes):
        return None
    if layer.rgb:
        return None if "C" in axes else axes + "C"
    return axes


def layer_input(layer: Any, level: int = 0) -> LayerInput:
    """The engine input of an Image layer at pyramid ``level`` (clamped to the levels it has).

    Its axes come from the plugin's own metadata (``metadata["octreenca"]["axes"]``), else from
    napari's axis labels when they name them (t, z, y, x, c), else from the layer's shape."""
    meta = dict(layer.metadata or {})
    axes = (meta.get("octreenca") or {}).get("axes") or _axes_from_labels(layer)
    if axes is None and layer.rgb:
        # napari knows the last axis is colour; say so (a 3D model must not take it for depth).
        axes = "TZYX"[-(layer.ndim) :] + "C" if layer.ndim > 2 else "YXC"
    if layer.multiscale:
        levels = list(layer.data)
        level = max(0, min(level, len(levels) - 1))
        array = levels[level]
    else:
        levels = [layer.data]
        level = 0
        array = layer.data
    c = _channel_index(layer, axes)
    keep = [i for i in range(layer.ndim) if i != c]

    def spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
        shp = tuple(int(s) for s in shape)
        if layer.rgb:
            shp = shp[:-1]
        return tuple(shp[i] for i in keep)

    scale = tuple(float(layer.scale[i]) for i in keep)
    translate = tuple(float(layer.translate[i]) for i in keep)
    aff = np.asarray(layer.affine.affine_matrix, dtype=float)
    idx = keep + [layer.ndim]
    aff = aff[np.ix_(idx, idx)]
    affine = None if np.allclose(aff, np.eye(len(idx))) else aff
    return LayerInput(
        layer.name, array, axes, level, [spatial(a.shape) for a in levels], scale, translate, affine, meta
    )


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Nearest-neighbour source index for resampling an axis of ``n_in`` cells to ``n_out``."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def pyramid_like(array: np.ndarray, shapes: list[tuple[int, ...]], level: int, lead: int = 0) -> list[Any]:
    """Resample ``array`` (computed at pyramid ``level``) to every level's shape by nearest
    neighbour: coarser levels in memory, finer ones lazily with dask (never materialised)."""
    import dask.array as da

    out: list[Any] = []
    for k, shp in enumerate(shapes):
        if k == level:
            out.append(array)
            continue
        src: Any = array if k > level else da.from_array(array, chunks=tuple(array.shape[:lead]) + (512,) * len(shp))
        for ax, (n_out, n_in) in enumerate(zip(shp, array.shape[lead:])):
            if n_out != n_in:
                src = (
                    src.take(_nearest_index(n_out, n_in), axis=lead + ax)
                    if k > level
                    else src[(slice(None),) * (lead + ax) + (_nearest_index(n_out, n_in),)]
                )
        out.append(src)
    return out


def output_layers(
    seg: Segmentation,
    src: LayerInput,
    *,
    record: dict[str, Any],
    probability: bool = False,
    uncertainty: bool = False,
) -> list[LayerData]:
    """Labels (with class names), optional probability and uncertainty layers at the input's geometry.

    The computed level's scale is the level-0 scale times the level's down-sampling, so the
    output overlays the input; a multiscale input gives multiscale outputs with its levels.
    """
    shapes = src.level_shapes
    multi = src.multiscale
    # Level 0's geometry: napari places the other levels of a multiscale layer from it.
    geo: dict[str, Any] = {"scale": src.scale, "translate": src.translate}
    if src.affine is not None:
        geo["affine"] = src.affine
    class_names = ["background", *seg.class_names]
    import pandas as pd

    features = pd.DataFrame({"index": np.arange(len(class_names)), "class": class_names})
    meta = {
        "octreenca": {
            "record": record,
            "class_names": list(seg.class_names),
            "axes": seg.axes,
            "source_layer": src.name,
            "source_metadata": _plain(src.metadata),
        }
    }
    labels = np.asarray(seg.labels)
    layers: list[LayerData] = [
        (
            pyramid_like(labels, shapes, src.level) if multi else labels,
            {"name": f"{src.name} labels", "features": features, "metadata": meta, "multiscale": multi, **geo},
            "labels",
        )
    ]
    logits = np.asarray(seg.logits) if seg.logits is not None else None
    if probability and logits is not None:
        prob = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        for k, name in enumerate(seg.class_names):
            layers.append(
                (
                    pyramid_like(prob[k], shapes, src.level) if multi else prob[k],
                    {
                        "name": f"{src.name} probability {name}",
                        "colormap": "magma",
                        "contrast_limits": (0.0, 1.0),
                        "blending": "additive",
                        "visible": False,
                        "metadata": meta,
                        "multiscale": multi,
                        **geo,
                    },
                    "image",
                )
            )
    if uncertainty and seg.spread is not None:
        spread = np.asarray(seg.spread).astype(np.float32)
        for k, name in enumerate(seg.class_names):
            hi = float(spread[k].max()) or 1.0
            layers.append(
                (
                    pyramid_like(spread[k], shapes, src.level) if multi else spread[k],
                    {
                        "name": f"{src.name} uncertainty {name}",
                        "colormap": "inferno",
                        "contrast_limits": (0.0, hi),
                        "blending": "additive",
                        "visible": False,
                        "metadata": meta,
                        "multiscale": multi,
                        **geo,
                    },
                    "image",
                )
            )
    return layers


def _plain(meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of a metadata dict (arrays and objects are dropped)."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[k] = list(v)
        elif isinstance(v, dict):
            out[k] = _plain(v)
    return out


__all__ = ["LayerInput", "layer_input", "output_layers", "pyramid_like"]
