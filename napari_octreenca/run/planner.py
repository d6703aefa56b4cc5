"""The run planner: the one place that decides how a model runs on an input.

``plan_run`` looks at the input's shape, axes and geometry (spacing, NIfTI affine) and the model's
config and decides, before any pixel is read:

- the grid the NCA runs on: the input's own grid, the model's fixed spacing (resampled), or, for a
  NIfTI volume and a fixed-spacing 3D model, the volume reoriented to RAS+ and resampled;
- the steps per level (the model's own for that grid, or the user's);
- whole image or tiled (from a memory estimate against the device's free memory, or the user's
  choice), the tile edge, and whether a whole run may fall back to tiles on out-of-memory.

``run.execute.execute`` carries a plan out. The CLI pipeline, the Segment widget, the NCA inspector and the
benchmarks all go through these two functions, so they run the same thing for the same input.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..nca.config import ModelConfig
from ..nca.errors import InputError
from .inputs import AxisPlan, plan_axes

#: Share of the free memory a whole-image run may plan to use (the rest is headroom).
HEADROOM = 0.6
TILING_MODES = ("auto", "whole", "tiled")


@dataclass(frozen=True)
class RunOptions:
    """What the user asked for (CLI flags, widget fields)."""

    device: str = "cpu"
    dtype: str = "float32"
    backend: str = "auto"
    seed: int = 0
    runs: int = 1
    #: Steps per level, finest first; None = the model's own steps for this input.
    steps: tuple[int, ...] | None = None
    fire_rate: float | None = None
    #: ``auto`` decides from the memory estimate; ``whole`` and ``tiled`` force it.
    tiling: str = "auto"
    #: Tile edge in grid cells (None: a default that fits the memory).
    tile: int | None = None
    #: A dask.distributed scheduler address (implies tiles).
    scheduler: str | None = None
    #: Bytes a whole run may use; None = ``HEADROOM`` x the device's free memory.
    memory_budget: int | None = None
    #: Whether an out-of-memory whole run is retried tiled (never for recordings).
    retry_tiled: bool = True

    def __post_init__(self) -> None:
        if self.tiling not in TILING_MODES:
            raise InputError(f"tiling must be one of {TILING_MODES}, got {self.tiling!r}")
        if self.runs < 1:
            raise InputError(f"runs must be >= 1, got {self.runs}")
        if self.tile is not None and self.tile < 8:
            raise InputError(f"tile must be at least 8 cells, got {self.tile}")


@dataclass(frozen=True)
class InputGeometry:
    """What the planner needs to know of an input (no pixels)."""

    shape: tuple[int, ...]
    axes: str | None = None
    #: Physical size of a pixel per spatial axis, input order (None: 1 per axis).
    scale: tuple[float, ...] | None = None
    #: NIfTI ``(i, j, k)`` affine of a volume read as ``(Z, Y, X)``.
    affine: np.ndarray | None = None

    @classmethod
    def of(cls, image: Any) -> InputGeometry:
        """The geometry of an ``io.image.ImageData``."""
        use_affine = getattr(image, "kind", "") == "nifti" and image.affine is not None
        return cls(
            tuple(int(n) for n in image.shape),
            image.axes,
            tuple(image.scale),
            np.asarray(image.affine, float) if use_affine else None,
        )


@dataclass(frozen=True)
class Grid:
    """Where the NCA runs: the input grid, the model's spacing grid, or RAS+ at the model's spacing."""

    axes: str  # full input axes (with C)
    input_shape: tuple[int, ...]  # spatial, input order
    grid_shape: tuple[int, ...]  # spatial, input order (RAS+ order when ``affine`` is set)
    spacing: tuple[float, ...] | None = None  # input spacing when resampled (input order)
    model_spacing: tuple[float, ...] | None = None  # the model's spacing in input order
    affine: np.ndarray | None = None  # NIfTI affine: reorient to RAS+ first

    @property
    def resampled(self) -> bool:
        return self.spacing is not None or self.affine is not None

    def cell_geometry(
        self, scale: tuple[float, ...], translate: tuple[float, ...]
    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """World scale/translate of the grid's cells on the input's layer (cell-centred).

        For a RAS+ grid this is the geometry once :meth:`to_input_orientation` has put the
        arrays back in the file's axis order.
        """
        shape = self.grid_shape if self.affine is None else self._file_order(self.grid_shape)
        r = [n / m for n, m in zip(self.input_shape, shape)]
        return (
            tuple(s * f for s, f in zip(scale, r)),
            tuple(t + (f - 1) / 2 * s for t, s, f in zip(translate, scale, r)),
        )

    def _file_order(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        from .resample import ras_axis_permutation

        perm = ras_axis_permutation(self.affine)
        return tuple(shape[p] for p in perm)

    def to_input_orientation(self, array: np.ndarray) -> np.ndarray:
        """Arrays recorded on a RAS+ grid (last three axes ``Z, Y, X``) back in the file's axis order."""
        if self.affine is None:
            return array
        from .resample import reorient_ras_to_zyx

        lead = array.shape[:-3]
        flat = array.reshape((-1,) + array.shape[-3:])
        back = np.stack([reorient_ras_to_zyx(a, self.affine) for a in flat])
        return back.reshape(lead + back.shape[1:])


@dataclass(frozen=True)
class RunPlan:
    """A decided run: what ``execute`` does, and a sentence for the user."""

    config: ModelConfig
    options: RunOptions
    grid: Grid
    steps: tuple[int, ...]
    tiled: bool
    tile: int | None
    estimate_bytes: int
    free_bytes: int | None
    text: str
    notes: tuple[str, ...] = field(default=())

    def as_tiled(self, why: str) -> RunPlan:
        """The same run in tiles that fit (after a whole run ran out of memory)."""
        tile = fitting_tile(self.config, self.grid.grid_shape, self.options, self.free_bytes)
        return replace(
            self, tiled=True, tile=tile, text=f"{why}; retrying tiled ({tile}-cell tiles)", notes=self.notes + (why,)
        )

    def record(self) -> dict[str, Any]:
        """The plan as plain data for run records."""
        return {
            "grid": list(self.grid.grid_shape),
            "input_shape": list(self.grid.input_shape),
            "resampled": self.grid.resampled,
            "reoriented": "RAS+" if self.grid.affine is not None else None,
            "steps": list(self.steps),
            "tiled": self.tiled,
            "tile": self.tile,
            "estimate_bytes": self.estimate_bytes,
            "plan": self.text,
        }


# -- memory ---------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    """``1.5 GB``-style sizes for messages."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def host_free_bytes() -> int | None:
    """Available host memory (``MemAvailable``), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def device_free_bytes(device: str) -> int | None:
    """Free memory of ``device`` now (``cpu`` or ``cuda:N``)."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            idx = torch.device(device).index or 0
            return int(torch.cuda.mem_get_info(idx)[0])
    return host_free_bytes()


def estimate_run_bytes(
    config: ModelConfig, spatial_shape: tuple[int, ...], dtype: str = "float32", runs: int = 1
) -> int:
    """Peak memory of a whole-image run: two state buffers and the image pyramid at the finest
    level, the slab scratch, and the outputs (logits, plus per-run logits for an ensemble)."""
    cells = math.prod(spatial_shape)
    b = 2 if dtype in ("bfloat16", "bf16") else 4
    pyramid = 1.0 + sum(
        1.0 / math.prod(math.prod(f) for f in config.factors[: i + 1]) for i in range(len(config.factors))
    )
    state = 2 * config.update_channels * cells * b
    image = config.input_channels * cells * b * pyramid + config.input_channels * cells * 4  # + float32 input
    scratch = 64 * 1024**2
    outputs = config.output_channels * cells * 4 * (runs + 2)
    return int(state + image + scratch + outputs)


def fitting_tile(config: ModelConfig, grid_shape: tuple[int, ...], options: RunOptions, free: int | None) -> int:
    """The user's tile, or the default tile halved until a tile run fits the budget."""
    from .tiling import default_tile

    if options.tile is not None:
        return int(options.tile)
    nd = len(grid_shape)
    tile = default_tile(nd)
    budget = options.memory_budget or (HEADROOM * free if free is not None else None)
    if budget is not None:
        while tile > 32 and estimate_run_bytes(config, (tile,) * nd, options.dtype, options.runs) * 2 > budget:
            tile //= 2
    return max(8, min(tile, max(grid_shape)))


# -- planning -------------------------------------------------------------------------------------
def plan_grid(config: ModelConfig, geometry: InputGeometry) -> Grid:
    """The grid the NCA runs on for this input (see the module docstring)."""
    from .resample import model_grid_shape, model_spacing_in_input_order

    ap = plan_axes(tuple(geometry.shape), config, geometry.axes)
    in_shape = tuple(int(n) for a, n in zip(ap.input_axes, geometry.shape) if a != "C")
    if config.spacing is None:
        return Grid(ap.input_axes, in_shape, in_shape)
    msp = model_spacing_in_input_order(config, ap.input_axes)
    if geometry.affine is not None and config.spatial_dims == 3 and ap.input_axes == "ZYX":
        from .resample import ras_shape_and_spacing

        shape_ras, sp_ras = ras_shape_and_spacing(in_shape, geometry.affine)
        return Grid(
            ap.input_axes,
            in_shape,
            model_grid_shape(shape_ras, sp_ras, msp),
            None,
            msp,
            np.asarray(geometry.affine, float),
        )
    sp = tuple(float(s) for s in geometry.scale) if geometry.scale is not None else (1.0,) * len(in_shape)
    # Time counts in frames: a video model's spacing along T is frames per cell (it was trained
    # frame by frame). A file's time scale is seconds (1 / fps) and is for display only: read as
    # a spacing, a 25 fps clip of 132 frames became 5 frames on the model's grid.
    spatial = [a for a in ap.input_axes if a != "C"]
    sp = tuple(1.0 if a == "T" else s for a, s in zip(spatial, sp))
    return Grid(ap.input_axes, in_shape, model_grid_shape(in_shape, sp, msp), sp, msp)


def grid_axis_plan(config: ModelConfig, grid: Grid) -> AxisPlan:
    """The axis plan of an array on ``grid`` (input axes, the model's axis order)."""
    shape = iter(grid.grid_shape)
    return plan_axes(tuple(config.image_channels if a == "C" else next(shape) for a in grid.axes), config, grid.axes)


def grid_model_shape(config: ModelConfig, grid: Grid) -> tuple[int, ...]:
    """The grid's spatial shape in the model's axis order (what the NCA's levels are built on)."""
    ap = grid_axis_plan(config, grid)
    by_axis = dict(zip(ap.spatial_input_axes, grid.grid_shape))
    return tuple(by_axis[a] for a in ap.model_axes)


def grid_steps(config: ModelConfig, grid: Grid) -> tuple[int, ...]:
    """The model's own steps per level for a run on ``grid``."""
    return tuple(config.steps_for(grid_model_shape(config, grid)))


def plan_run(
    config: ModelConfig, geometry: InputGeometry, options: RunOptions | None = None, free: int | None = None
) -> RunPlan:
    """Decide grid, steps and whole vs tiled for ``geometry`` (see the module docstring)."""
    options = options or RunOptions()
    grid = plan_grid(config, geometry)
    steps = tuple(options.steps) if options.steps is not None else grid_steps(config, grid)
    if len(steps) != config.levels or any(s < 0 for s in steps):
        raise InputError(f"give {config.levels} non-negative step counts, finest level first (got {list(steps)})")
    est = estimate_run_bytes(config, grid.grid_shape, options.dtype, options.runs)
    free = device_free_bytes(options.device) if free is None else free
    budget = (
        options.memory_budget if options.memory_budget is not None else (HEADROOM * free if free is not None else None)
    )
    forced = options.tile is not None or options.scheduler is not None
    if options.tiling == "tiled" or (options.tiling == "auto" and (forced or (budget is not None and est > budget))):
        if config.input_features:
            from .features import refuse_tiles

            refuse_tiles(
                config,
                "tiles were asked for"
                if options.tiling == "tiled" or forced
                else f"the whole clip would need {fmt_bytes(est)} of {fmt_bytes(budget or 0)} allowed",
            )
        tile = fitting_tile(config, grid.grid_shape, options, free)
        n = math.prod(math.ceil(s / tile) for s in grid.grid_shape)
        why = (
            "chosen"
            if options.tiling == "tiled" or forced
            else f"whole image would need {fmt_bytes(est)} of {fmt_bytes(budget or 0)} allowed"
        )
        text = f"tiled: {n} tiles of {tile} cells on {options.device} ({why})"
        return RunPlan(config, options, grid, steps, True, tile, est, free, _with_grid(text, grid))
    room = f" of {fmt_bytes(free)} free" if free is not None else ""
    text = f"whole image: about {fmt_bytes(est)}{room} on {options.device}"
    return RunPlan(config, options, grid, steps, False, None, est, free, _with_grid(text, grid))


def _with_grid(text: str, grid: Grid) -> str:
    if not grid.resampled:
        return text
    where = "RAS+ " if grid.affine is not None else ""
    return f"{text}; on the model's {where}grid {'x'.join(map(str, grid.grid_shape))}"


__all__ = [
    "RunOptions",
    "InputGeometry",
    "Grid",
    "RunPlan",
    "plan_run",
    "plan_grid",
    "grid_steps",
    "estimate_run_bytes",
    "device_free_bytes",
    "host_free_bytes",
    "fmt_bytes",
    "HEADROOM",
]
