"""Models with a fixed spacing (``config.spacing``) see the image resampled to it.

The widgets resample an input to the model's grid the way ``run.resample`` does, run the
NCA there (whole or tiled), and bring the logits back to the input's grid. NIfTI volumes are
handed to ``segment_at_model_spacing`` with their affine (it reorients to RAS+, as the bundled
brain model expects). Qt-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..nca.config import ModelConfig
from ..run.inputs import plan_axes


@dataclass(frozen=True)
class GridPlan:
    """Where the NCA runs: the input grid, or the model's spacing grid."""

    spacing: tuple[float, ...] | None  # input spacing used (input spatial order); None = no resampling
    affine: np.ndarray | None  # NIfTI (i, j, k) affine for a (Z, Y, X) volume: reorient to RAS+
    input_shape: tuple[int, ...]  # spatial, input order
    grid_shape: tuple[int, ...]  # spatial, input order, where the NCA runs
    axes: str  # full input axes

    @property
    def resampled(self) -> bool:
        return self.spacing is not None or self.affine is not None

    def cell_geometry(self, scale: tuple[float, ...], translate: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """World scale/translate of the grid's cells (cell-centred, like ``grid_mode`` zoom)."""
        r = [n / m for n, m in zip(self.input_shape, self.grid_shape)]
        return (tuple(s * f for s, f in zip(scale, r)),
                tuple(t + (f - 1) / 2 * s for t, s, f in zip(translate, scale, r)))


def grid_plan(config: ModelConfig, array_shape: tuple[int, ...], axes: str | None, scale: tuple[float, ...],
              metadata: dict[str, Any], spacing: tuple[float, ...] | None = None) -> GridPlan:
    """Decide the grid for a layer: ``spacing`` overrides the layer's scale as input spacing."""
    from ..run.resample import model_grid_shape, model_spacing_in_input_order

    plan = plan_axes(tuple(array_shape), config, axes)
    in_shape = tuple(int(n) for a, n in zip(plan.input_axes, array_shape) if a != "C")
    if config.spacing is None:
        return GridPlan(None, None, in_shape, in_shape, plan.input_axes)
    octree = (metadata or {}).get("octreenca") or {}
    aff = octree.get("affine")
    if (aff is not None and spacing is None and octree.get("kind") == "nifti" and config.spatial_dims == 3
            and plan.input_axes == "ZYX"):
        from ..run.resample import reorient_zyx_to_ras

        a = np.asarray(aff, dtype=float)
        vol, sp_ras = reorient_zyx_to_ras(np.zeros(in_shape, np.uint8), a)  # 1 byte/voxel, for the sizes
        msp = model_spacing_in_input_order(config, "ZYX")
        return GridPlan(None, a, in_shape, model_grid_shape(vol.shape, sp_ras, msp), plan.input_axes)
    sp = tuple(float(s) for s in (spacing or scale))
    msp = model_spacing_in_input_order(config, plan.input_axes)
    return GridPlan(sp, None, in_shape, model_grid_shape(in_shape, sp, msp), plan.input_axes)


def to_grid(array: Any, config: ModelConfig, grid: GridPlan) -> np.ndarray:
    """The input resampled to the model's spacing (uint8 kept for fixed RGB normalisation)."""
    from ..run.resample import model_spacing_in_input_order, resample_to_model_spacing

    arr = np.asarray(array)
    if grid.spacing is None:
        return arr
    c_ax = grid.axes.index("C") if "C" in grid.axes else None
    small = resample_to_model_spacing(arr, grid.spacing, model_spacing_in_input_order(config, grid.axes),
                                      channel_axis=c_ax)
    if arr.dtype == np.uint8:
        small = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    return small


def from_grid(seg: Any, grid: GridPlan) -> Any:
    """A Segmentation on the model grid brought back onto the input grid."""
    from ..run.inference import Segmentation, labels_from_logits
    from ..run.resample import resample_back

    if grid.spacing is None or grid.grid_shape == grid.input_shape:
        return seg
    logits = resample_back(np.asarray(seg.logits), grid.input_shape, channel_axis=0, order=1).astype(np.float32)
    spread = None if seg.spread is None else resample_back(np.asarray(seg.spread), grid.input_shape, channel_axis=0)
    record = dict(seg.record, input_spacing=list(grid.spacing), model_grid=list(grid.grid_shape))
    return Segmentation(labels_from_logits(logits), logits, spread, seg.class_names, seg.axes, seg.seeds,
                        seg.seconds, record)


__all__ = ["GridPlan", "grid_plan", "to_grid", "from_grid"]
