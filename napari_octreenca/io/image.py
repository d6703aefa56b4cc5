"""The in-memory description of an image that every reader returns (``ImageData``).

Kept apart from ``readers`` so that the format modules (OME-Zarr, video) and the writers can use
it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ImageData:
    """An image with its geometry; see the module docstring for the contract."""

    data: Any
    levels: list[Any]
    axes: str
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    affine: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str = ""

    @property
    def spatial_axes(self) -> str:
        return self.axes.replace("C", "")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)

    def level_scales(self) -> list[tuple[float, ...]]:
        """Physical scale of every pyramid level, derived from the level shapes."""
        sp = [i for i, a in enumerate(self.axes) if a != "C"]
        base = self.levels[0].shape
        return [tuple(s * level_factor(base[i], lv.shape[i]) for s, i in zip(self.scale, sp)) for lv in self.levels]


def level_factor(fine: int, coarse: int) -> float:
    """Down-sampling factor between two level sizes: the nearest integer when the sizes are a
    ceil/floor division apart (2967 -> 742 is 4x), else the plain ratio."""
    for f in range(1, 1025):
        if coarse in (fine // f, -(-fine // f)):
            return float(f)
        if fine // f < coarse:
            break
    return fine / coarse


def to_numpy(a: Any) -> np.ndarray:
    """Materialise a numpy/dask/zarr array here, with dask's local threads (never on a
    dask.distributed client that may be the default: file handles do not travel)."""
    if hasattr(a, "compute") and hasattr(a, "dask"):
        return np.asarray(a.compute(scheduler="threads"))
    return np.asarray(a)
