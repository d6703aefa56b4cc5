"""Exact tiled (and out-of-core) OctreeNCA inference.

Why tiles are exact: after ``s`` steps a cell depends only on cells within ``s * radius``, and the
fire mask is a hash of the global coordinate. So a tile of a level is computed from its region
expanded by a halo of ``steps * radius`` cells (clipped at the image border, where the block's
reflect padding then equals the whole image's), and its core equals the whole-image result.
The state entering a level is the nearest up-sampling of the coarser level's finished state
(fine cell ``j`` comes from coarse cell ``j // f``), and the level's image is the stride/block
down-sampling of the finer image, which blocks aligned to the factor compute locally.

Layout of a run: the coarse levels ``>= store_from`` are computed tile by tile into chunked zarr
arrays (their images too); the finest levels are computed per output tile recursively (a level-0
tile needs a slightly larger level-1 region, which needs a level-2 region read from the store),
so the big level-1 state never exists in full. Memory is bounded by the tile size; every tile is
marked done after its chunks are written, so a killed run resumes (see ``outofcore.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backends import Backend, LevelRun, get_backend
from ..nca.config import ModelConfig, Normalization, check_fire_rate, check_seed, check_steps
from ..nca.errors import Cancelled, InputError
from ..nca.octree import OctreeNCA, downsample, upsample_raw
from .inference import Segmentation, combine_runs, is_cancelled, labels_from_logits, resolve_dtype
from .inputs import AxisPlan, NormStats, norm_stats, normalize, plan_axes, to_tensor
from .outofcore import WorkStore, fingerprint, model_digest, numpy_to_tensor, storage_dtype, tensor_to_numpy

#: Progress callback: receives a dict with stage, level, seed, tile, tiles, step.
Progress = Callable[[dict[str, Any]], Any]
#: Default tile edge in level-0 cells.
DEFAULT_TILE = {2: 1024, 3: 96}
#: Images with at most this many values per channel get bitwise-exact global statistics.
_EXACT_STATS_LIMIT = 1 << 27


# -- geometry ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    """A half-open box ``[start, stop)`` of cells (one entry per spatial axis)."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def expand(self, halo: int, shape: tuple[int, ...]) -> Box:
        """Grow by ``halo`` cells on every side, clipped to ``[0, shape)``."""
        return Box(
            tuple(max(0, a - halo) for a in self.start),
            tuple(min(n, b + halo) for b, n in zip(self.stop, shape)),
        )

    def coarse(self, factor: tuple[int, ...], shape: tuple[int, ...]) -> Box:
        """The cells of the coarser level (factor ``factor``, shape ``shape``) that cover this box."""
        return Box(
            tuple(a // f for a, f in zip(self.start, factor)),
            tuple(min(n, -(-b // f)) for b, f, n in zip(self.stop, factor, shape)),
        )

    def fine(self, factor: tuple[int, ...], shape: tuple[int, ...]) -> Box:
        """The cells of the finer level (shape ``shape``) this box's cells are made of."""
        return Box(
            tuple(a * f for a, f in zip(self.start, factor)),
            tuple(min(n, b * f) for b, f, n in zip(self.stop, factor, shape)),
        )

    def permute(self, order: tuple[int, ...]) -> Box:
        return Box(tuple(self.start[o] for o in order), tuple(self.stop[o] for o in order))


def tile_grid(shape: tuple[int, ...], tile: tuple[int, ...]) -> list[Box]:
    """Tiles of ``tile`` cells covering ``shape`` (C order; the last ones may be smaller)."""
    counts = [math.ceil(n / t) for n, t in zip(shape, tile)]
    boxes = []
    for idx in np.ndindex(*counts):
        start = tuple(i * t for i, t in zip(idx, tile))
        stop = tuple(min(n, s + t) for s, t, n in zip(start, tile, shape))
        boxes.append(Box(start, stop))
    return boxes


def _crop(x: torch.Tensor, start: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
    for ax, (s, n) in enumerate(zip(start, size)):
        x = x.narrow(2 + ax, s, n)
    return x


# -- the input, lazily ------------------------------------------------------------------------
@dataclass
class SourceImage:
    """Regions of the input at level 0, in the model's axis order, normalised like ``prepare``.

    ``array`` is anything sliceable (numpy, dask, zarr). With ``path`` the array can be reopened
    on another process (dask workers) instead of being pickled.
    """

    def __init__(
        self,
        array: Any,
        plan: AxisPlan,
        norm: Normalization,
        *,
        path: str | None = None,
        level_index: int = 0,
        stats: NormStats | None | str = "compute",
    ):
        self._array = array
        self.plan = plan
        self.norm = norm
        self.path = path
        self.level_index = level_index
        shape = tuple(int(s) for s in array.shape)
        off = 1 if plan.has_channel else 0
        self.input_shape = shape
        self.shape = tuple(shape[p] for p in plan.permutation[off:])  # model order
        # Pyramid levels reuse the finest level's statistics (passed in).
        self.stats = compute_stats(array, plan, norm) if isinstance(stats, str) else stats

    @property
    def array(self) -> Any:
        if self._array is None:
            from ..io.readers import read_image

            if self.path is None:
                raise InputError("this tiled run's input lives in another process: give source_path")
            self._array = read_image(self.path).levels[self.level_index]
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.path is not None:
            state["_array"] = None  # reopened from the file on the worker
        return state

    def read(self, box: Box) -> torch.Tensor:
        """``(1, in, *box.size)`` float32 normalised input of a model-order box at level 0."""
        plan = self.plan
        off = 1 if plan.has_channel else 0
        slc: list[slice] = [slice(None)] * len(self.input_shape)
        for m, p in enumerate(plan.permutation[off:]):
            slc[p] = slice(box.start[m], box.stop[m])
        region = self.array[tuple(slc)]
        if hasattr(region, "compute"):
            region = region.compute(scheduler="synchronous")  # never on a distributed client
        x = to_tensor(np.asarray(region)).permute(plan.permutation)
        if not plan.has_channel:
            x = x.unsqueeze(0)
        return normalize(x, self.norm, self.stats).unsqueeze(0)


def _local(a: Any) -> Any:
    return a.compute(scheduler="threads") if hasattr(a, "compute") and hasattr(a, "dask") else a


def _whole_channels(array: Any, plan: AxisPlan) -> torch.Tensor:
    x = to_tensor(array).permute(plan.permutation)
    return (x if plan.has_channel else x.unsqueeze(0)).float()


def compute_stats(array: Any, plan: AxisPlan, norm: Normalization) -> NormStats | None:
    """Global statistics for the ``zscore``/``percentile`` modes (None for fixed/none).

    Inputs up to 2**27 values per channel are loaded once and reduced exactly as
    ``run.inputs.normalize`` does (bitwise the same); larger ones are reduced lazily in float64
    (z-score) or on a strided sample (percentiles), which matches to about 1e-7.
    """
    if norm.mode in ("fixed", "none"):
        return None
    n = int(np.prod(array.shape))
    c = array.shape[plan.input_axes.index("C")] if plan.has_channel else 1
    offs: list[torch.Tensor] = []
    scales: list[torch.Tensor | float] = []
    if n // c <= _EXACT_STATS_LIMIT:
        return norm_stats(_whole_channels(_local(array), plan), norm)
    import dask.array as da

    arr = da.asarray(array) if not hasattr(array, "chunks") or not hasattr(array, "compute") else array
    caxis = plan.input_axes.index("C") if plan.has_channel else None
    for i in range(c):
        ch = arr if caxis is None else da.take(arr, i, axis=caxis)
        ch = ch.astype(np.float64)
        if norm.mode == "zscore":
            if norm.threshold is not None:
                keep = ch > norm.threshold
                cnt = int(keep.sum().compute(scheduler="threads"))
                if cnt > 0:
                    ch = ch[keep]
            mean, std = da.compute(ch.mean(), ch.std(ddof=1), scheduler="threads")
            offs.append(torch.tensor(float(mean), dtype=torch.float32))
            s = torch.tensor(float(std), dtype=torch.float32)
            scales.append(s if float(s) > 0 else 1.0)
        else:
            step = max(1, int(round((ch.size / (1 << 24)) ** (1 / ch.ndim))))
            sample = torch.from_numpy(
                np.asarray(ch[(slice(None, None, step),) * ch.ndim].compute(scheduler="threads")).ravel()
            )
            sample = sample.float()
            lo = torch.quantile(sample, norm.low / 100)
            hi = torch.quantile(sample, norm.high / 100)
            offs.append(lo)
            scales.append(hi - lo if float(hi - lo) > 0 else 1.0)
    return NormStats(norm.mode, offs, scales)


# -- output sinks ------------------------------------------------------------------------------
class ArraySink:
    """Writes labels (and logits/spread) tiles into arrays of the work store (input axis order).

    Picklable: a dask worker reopens the arrays from the store folder.
    """

    def __init__(self, logits: bool = True):
        self.want_logits = logits
        self.arrays: dict[str, Any] = {}
        self.root: str | None = None
        self.names: list[str] = []

    def open(self, store: WorkStore, shape: tuple[int, ...], tile: tuple[int, ...], classes: int, runs: int) -> None:
        label_dtype = np.uint8 if classes < 255 else np.uint16
        self.root = None if store.root is None else str(store.root)
        self.arrays["labels"] = store.array("out/labels", shape, tile, label_dtype)
        if self.want_logits:
            self.arrays["logits"] = store.array("out/logits", (classes,) + shape, (classes,) + tile, np.float32)
            if runs > 1:
                self.arrays["spread"] = store.array("out/spread", (classes,) + shape, (classes,) + tile, np.float32)
        self.names = list(self.arrays)

    def _array(self, name: str) -> Any:
        if name not in self.arrays:
            import zarr

            assert self.root is not None, "an in-memory sink cannot be used from another process"
            self.arrays[name] = zarr.open_array(str(Path(self.root) / "out" / name), mode="r+")
        return self.arrays[name]

    def write(self, box: Box, labels: np.ndarray, logits: np.ndarray, spread: np.ndarray | None) -> None:
        sl = box.slices()
        self._array("labels")[sl] = labels
        if "logits" in self.names:
            self._array("logits")[(slice(None),) + sl] = logits
        if "spread" in self.names and spread is not None:
            self._array("spread")[(slice(None),) + sl] = spread

    def finish(self) -> None:
        """Called once every tile is done."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["arrays"] = {}
        return state


# -- the run -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One pass over a grid of tiles: materialise an image level, a level state, or the output."""

    kind: str  # "image" | "state" | "output"
    level: int
    seed: int | None
    tiles: tuple[Box, ...]

    @property
    def name(self) -> str:
        return (
            self.kind
            if self.kind == "output"
            else f"{self.kind}_s{self.seed}_L{self.level}"
            if self.seed is not None
            else f"{self.kind}_L{self.level}"
        )

    def marker(self, index: int) -> str:
        return f"{self.name}_{index}"


class TiledRun:
    """All that a tile needs; picklable, so dask workers rebuild it (arrays reopen lazily)."""

    def __init__(
        self,
        model: OctreeNCA,
        source: SourceImage,
        *,
        seeds: list[int],
        steps: list[int],
        fire_rate: float,
        dtype: torch.dtype,
        backend: str,
        device: str,
        tile: tuple[int, ...],
        store_from: int,
        store_path: str | None,
        key: str,
        sink: Any,
        restart: bool = False,
    ):
        self.model = model
        self.cfg: ModelConfig = model.config
        self.source = source
        self.seeds = seeds
        self.steps = steps
        self.fire_rate = fire_rate
        self.dtype = dtype
        self.backend_name = backend
        self.device = device
        self.tile = tile
        self.store_from = store_from
        self.store_path = store_path
        self.key = key
        self.sink = sink
        self.shapes = self.cfg.level_shapes(source.shape)
        self.order = source.plan.to_input_order()
        self.radius = self.cfg.kernel_size // 2
        self._store: WorkStore | None = None
        self._backend: Backend | None = None
        self._restart = restart
        self.cancel: Any = None
        self.pyramid: dict[int, SourceImage] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_store=None, _backend=None, cancel=None, _restart=False)
        return state

    # -- resources ---------------------------------------------------------------------------
    @property
    def store(self) -> WorkStore:
        if self._store is None:
            self._store = WorkStore(self.store_path, self.key, restart=self._restart)
        return self._store

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = get_backend(self.backend_name, self.device, self.dtype)
        return self._backend

    def level_tile(self, level: int) -> tuple[int, ...]:
        return tuple(min(t, n) for t, n in zip(self.tile, self.shapes[level]))

    def image_tile(self, level: int) -> tuple[int, ...]:
        """Chunks of a materialised image level: a level-0 footprint of about one tile."""
        cum = [1] * len(self.tile)
        for f in self.cfg.factors[:level]:
            cum = [c * fi for c, fi in zip(cum, f)]
        return tuple(max(8, min(n, -(-t // c))) for t, c, n in zip(self.tile, cum, self.shapes[level]))

    def _image_array(self, level: int) -> Any:
        shape = (self.cfg.input_channels,) + self.shapes[level]
        return self.store.array(
            f"image/L{level}", shape, (shape[0],) + self.image_tile(level), storage_dtype(self.dtype)
        )

    def _state_array(self, level: int, seed: int) -> Any:
        shape = (self.cfg.update_channels,) + self.shapes[level]
        return self.store.array(
            f"state/s{seed}/L{level}", shape, (shape[0],) + self.level_tile(level), storage_dtype(self.dtype)
        )

    # -- stages --------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        out: list[Stage] = []
        top = self.cfg.levels - 1
        for level in range(self.store_from, top + 1):
            out.append(Stage("image", level, None, tuple(tile_grid(self.shapes[level], self.image_tile(level)))))
        for seed in self.seeds:
            for level in range(top, self.store_from - 1, -1):
                out.append(Stage("state", level, seed, tuple(tile_grid(self.shapes[level], self.level_tile(level)))))
        out.append(Stage("output", 0, None, tuple(tile_grid(self.shapes[0], self.level_tile(0)))))
        return out

    def prepare(self, stages: list[Stage]) -> None:
        """Create every work array up front (workers then only open them: no creation races)."""
        for st in stages:
            if st.kind == "image":
                self._image_array(st.level)
            elif st.kind == "state":
                assert st.seed is not None
                self._state_array(st.level, st.seed)

    def run_tile(self, stage: Stage, index: int) -> bool:
        """Compute tile ``index`` of ``stage`` unless already done; True if it was computed."""
        marker = stage.marker(index)
        if self.store.is_done(marker):
            return False
        box = stage.tiles[index]
        if stage.kind == "image":
            if stage.level in self.pyramid:  # the file's own level: read, not resized
                img = self.pyramid[stage.level].read(box).to(self.dtype)
            else:
                img = self.image_region(stage.level, box, use_store=False)
            self._image_array(stage.level)[(slice(None),) + box.slices()] = tensor_to_numpy(img[0])
        elif stage.kind == "state":
            assert stage.seed is not None
            st = self.compute_state(stage.level, box, stage.seed)
            self._state_array(stage.level, stage.seed)[(slice(None),) + box.slices()] = tensor_to_numpy(st[0])
        else:
            self._write_output(box)
        self.store.mark_done(marker)
        return True

    def _write_output(self, box: Box) -> None:
        out_c = self.cfg.output_channels
        outs = [self.compute_state(0, box, s)[0, :out_c].float().cpu() for s in self.seeds]
        logits, spread = combine_runs(outs)  # the same ensemble rule as the whole-image path
        perm = (0,) + tuple(o + 1 for o in self.order)
        logits = logits.permute(perm).contiguous()
        spread_np = None if spread is None else spread.permute(perm).contiguous().numpy()
        self.sink.write(box.permute(self.order), labels_from_logits(logits), logits.numpy(), spread_np)

    # -- the exact recursion ---------------------------------------------------------------------
    def image_region(self, level: int, box: Box, use_store: bool = True) -> torch.Tensor:
        """``(1, in, *box.size)`` image of ``level`` in the state dtype, as ``run_octree`` builds it."""
        if level == 0:
            return self.source.read(box).to(self.device).to(self.dtype)
        if level in self.pyramid and level < self.store_from:
            return self.pyramid[level].read(box).to(self.device).to(self.dtype)
        if use_store and level >= self.store_from:
            a = self._image_array(level)[(slice(None),) + box.slices()]
            return numpy_to_tensor(a, self.dtype).unsqueeze(0).to(self.device)
        f = self.cfg.factors[level - 1]
        fine = self.image_region(level - 1, box.fine(f, self.shapes[level - 1]))
        return downsample(fine, f, self.cfg.resize)

    def state_region(self, level: int, box: Box, seed: int) -> torch.Tensor:
        """Finished state of ``level`` over ``box``: from the store, or computed."""
        if level >= self.store_from:
            a = self._state_array(level, seed)[(slice(None),) + box.slices()]
            return numpy_to_tensor(a, self.dtype).unsqueeze(0).to(self.device)
        return self.compute_state(level, box, seed)

    def compute_state(self, level: int, box: Box, seed: int) -> torch.Tensor:
        """State of ``level`` over ``box`` after the level's steps, exactly as the whole run."""
        cfg = self.cfg
        ext = box.expand(self.steps[level] * self.radius, self.shapes[level])
        if level == cfg.levels - 1:
            state = torch.zeros((1, cfg.update_channels) + ext.size, dtype=self.dtype, device=self.device)
        else:
            f = cfg.factors[level]
            parent = ext.coarse(f, self.shapes[level + 1])
            up = upsample_raw(self.state_region(level + 1, parent, seed), f)
            offset = tuple(e - p * fi for e, p, fi in zip(ext.start, parent.start, f))
            state = _crop(up, offset, ext.size).contiguous()
        image = self.image_region(level, ext)
        run = LevelRun(level=level, steps=self.steps[level], seed=seed, fire_rate=self.fire_rate, origin=ext.start)
        state = self.backend.run_level(self.model.level_nca(level), image, state, run, self._step_hook)
        core = tuple(b - e for b, e in zip(box.start, ext.start))
        return _crop(state, core, box.size).contiguous()

    def _step_hook(self, step: int, state: torch.Tensor) -> None:
        if is_cancelled(self.cancel):
            raise Cancelled("cancelled during a tile")


# -- executors ---------------------------------------------------------------------------------
def run_local(run: TiledRun, stages: Iterable[Stage], progress: Progress | None, cancel: Any) -> dict[str, int]:
    """Run every stage's tiles in this process; returns computed/skipped counts."""
    counts = {"computed": 0, "skipped": 0}
    run.cancel = cancel
    for stage in stages:
        n = len(stage.tiles)
        for i in range(n):
            if is_cancelled(cancel):
                raise Cancelled(f"cancelled at {stage.name}, tile {i + 1}/{n}")
            done = run.run_tile(stage, i)
            counts["computed" if done else "skipped"] += 1
            if progress is not None:
                progress(
                    {
                        "stage": stage.kind,
                        "level": stage.level,
                        "seed": stage.seed,
                        "step": None,
                        "tile": i + 1,
                        "tiles": n,
                        "computed": done,
                    }
                )
    return counts


def match_pyramid(
    levels: list[Any], source: SourceImage, cfg: ModelConfig, shapes: list[tuple[int, ...]], path: str | None
) -> dict[int, SourceImage]:
    """Octree level -> the input pyramid level whose spatial shape equals it (level 0 excluded)."""
    off = 1 if source.plan.has_channel else 0
    found: dict[int, SourceImage] = {}
    for i, arr in enumerate(levels[1:], start=1):
        shape = tuple(int(arr.shape[p]) for p in source.plan.permutation[off:])
        if source.plan.has_channel and arr.shape[source.plan.permutation[0]] != cfg.input_channels:
            continue
        for lv in range(1, cfg.levels):
            if shapes[lv] == shape and lv not in found:
                found[lv] = SourceImage(arr, source.plan, source.norm, path=path, level_index=i, stats=source.stats)
    return found


# -- the public entry ------------------------------------------------------------------------------
def default_tile(spatial_dims: int) -> int:
    return DEFAULT_TILE[spatial_dims]


@dataclass(frozen=True)
class TileSettings:
    """The numbers of a tiled run (what the planner decides and the user asks)."""

    #: Tile edge in level-0 cells (int or one per model axis); None = ``default_tile``.
    tile: int | tuple[int, ...] | None = None
    backend: str = "auto"
    dtype: str | torch.dtype = "float32"
    device: str = "cpu"
    seed: int = 0
    runs: int = 1
    steps: list[int] | None = None
    fire_rate: float | None = None
    #: Levels from this one up keep their state in the store (None: the two coarsest below level 2).
    store_from: int | None = None


@dataclass(frozen=True)
class TileOutputs:
    """Where a tiled run keeps its work and puts its results."""

    store: str | Path | None = None  # a folder: out of core and resumable; None: in memory
    restart: bool = False  # a store of a different run is replaced instead of refused
    logits: bool = True  # keep the logits (and spread), not only the labels
    sink: Any = None  # receives finished tiles (default: ArraySink in the store)
    scheduler: Any = None  # a dask Client or address: tiles on dask.distributed workers
    source_path: str | None = None  # lets workers reopen a file input
    source_level: int = 0
    pyramid: list[Any] | None = None  # the input's own levels, finest first


_SETTINGS = {f.name for f in fields(TileSettings)}
_OUTPUTS = {f.name for f in fields(TileOutputs)}


def segment_tiled(
    model: OctreeNCA,
    image: Any,
    *,
    axes: str | None = None,
    settings: TileSettings | None = None,
    outputs: TileOutputs | None = None,
    callback: Progress | None = None,
    cancel: Any = None,
    **options: Any,
) -> Segmentation:
    """Segment ``image`` tile by tile; the result equals :func:`run.inference.segment` (within 1e-6).

    ``image`` is numpy, dask or zarr with ``axes`` (guessed like ``segment`` when omitted).
    ``settings`` (:class:`TileSettings`) and ``outputs`` (:class:`TileOutputs`) say how; their
    fields may also be given by name (``tile=256, store="work"``). With ``store`` (a folder) the
    coarse level states and the outputs live in a chunked zarr store there and a rerun resumes
    from the tiles already done; without it they live in memory. Returns an
    ``run.inference.Segmentation`` whose ``labels``/``logits`` are numpy (in memory) or zarr arrays
    (with ``store``). ``callback`` gets a dict per tile (stage, level, seed, tile, tiles);
    ``cancel`` (Event or callable) raises ``Cancelled`` within one step. ``scheduler`` runs the
    tiles on dask.distributed workers (needs ``store`` on a filesystem the workers share).
    ``pyramid`` supplies the image of every octree level whose shape it matches exactly instead
    of resizing lazily: faster for slides, but equal to the whole run only if the file's levels
    were made by the model's own resizing (``nearest`` = striding), which scanners' JPEG
    pyramids are not.
    """
    unknown = set(options) - _SETTINGS - _OUTPUTS
    if unknown:
        raise TypeError(f"segment_tiled() got unexpected keyword arguments {sorted(unknown)}")
    if model.config.input_features:
        from .features import refuse_tiles

        refuse_tiles(model.config, "segment_tiled was called; use segment")
    settings = replace(settings or TileSettings(), **{k: v for k, v in options.items() if k in _SETTINGS})
    outputs = replace(outputs or TileOutputs(), **{k: v for k, v in options.items() if k in _OUTPUTS})
    t0 = time.perf_counter()
    run, plan, counts = _run_tiles(model, image, axes, settings, outputs, callback, cancel)
    return _tiled_result(run, plan, settings, outputs, counts, time.perf_counter() - t0)


def _run_tiles(
    model: OctreeNCA,
    image: Any,
    axes: str | None,
    s: TileSettings,
    o: TileOutputs,
    callback: Progress | None,
    cancel: Any,
) -> tuple[TiledRun, AxisPlan, dict[str, int]]:
    """Validate, set up the tiled run and its store, and run every stage (locally or on dask)."""
    cfg = model.config
    if s.runs < 1:
        raise InputError(f"runs must be >= 1, got {s.runs}")
    shape = tuple(int(n) for n in image.shape)
    plan = plan_axes(shape, cfg, axes)
    if any(n == 0 for n in shape):
        raise InputError(f"the input is empty (shape {shape})")
    source = SourceImage(image, plan, cfg.normalization, path=o.source_path, level_index=o.source_level)
    dt = resolve_dtype(s.dtype)
    check_seed(s.seed, s.runs)  # the same checks as segment() and the command line
    steps = list(check_steps(s.steps, cfg.levels)) if s.steps is not None else cfg.steps_for(source.shape)
    fire = cfg.fire_rate if s.fire_rate is None else check_fire_rate(s.fire_rate)
    tile = default_tile(cfg.spatial_dims) if s.tile is None else s.tile
    tiles = (tile,) * cfg.spatial_dims if isinstance(tile, int) else tuple(int(t) for t in tile)
    if len(tiles) != cfg.spatial_dims or any(t < 1 for t in tiles):
        raise InputError(f"tile must be a positive int or {cfg.spatial_dims} ints, got {tile!r}")
    store_from = s.store_from
    if store_from is None:
        store_from = min(2, cfg.levels - 1) if cfg.levels > 1 else 1
    if not 1 <= store_from <= cfg.levels:
        raise InputError(f"store_from must be in 1..{cfg.levels}, got {store_from}")
    be = get_backend(s.backend if isinstance(s.backend, str) else s.backend.name, s.device, dt)  # fail early
    seeds = [s.seed + r for r in range(s.runs)]
    key = fingerprint(
        {
            "model": model_digest(model),
            "config": cfg.to_dict(),
            "shape": shape,
            "axes": plan.input_axes,
            "seeds": seeds,
            "steps": steps,
            "fire_rate": fire,
            "dtype": str(dt),
            "backend": be.name,
            "tile": tiles,
            "store_from": store_from,
            "logits": o.logits,
            "stats": None
            if source.stats is None
            else [[float(v) for v in source.stats.offset], [float(v) for v in source.stats.scale]],
        }
    )
    sink = o.sink if o.sink is not None else ArraySink(logits=o.logits)
    run = TiledRun(
        model.cpu() if s.device == "cpu" else model.to(s.device),
        source,
        seeds=seeds,
        steps=steps,
        fire_rate=fire,
        dtype=dt,
        backend=be.name,
        device=str(s.device),
        tile=tiles,
        store_from=store_from,
        store_path=None if o.store is None else str(o.store),
        key=key,
        sink=sink,
        restart=o.restart,
    )
    if o.pyramid:
        run.pyramid = match_pyramid(o.pyramid, source, cfg, run.shapes, o.source_path)
        run.key = fingerprint({"base": key, "pyramid": sorted(run.pyramid)})
    out_tile = tuple(run.level_tile(0)[a] for a in run.order)
    spatial_in = tuple(source.shape[a] for a in run.order)
    sink.open(run.store, spatial_in, out_tile, cfg.output_channels, s.runs)
    stages = run.stages()
    run.prepare(stages)
    if o.scheduler is not None:
        if o.store is None:
            raise InputError("a dask scheduler needs store= (a folder all workers can reach)")
        from .distributed import run_distributed

        counts = run_distributed(run, stages, o.scheduler, callback, cancel)
    else:
        counts = run_local(run, stages, callback, cancel)
    if hasattr(sink, "finish"):
        sink.finish()
    return run, plan, counts


def _tiled_result(
    run: TiledRun, plan: AxisPlan, s: TileSettings, o: TileOutputs, counts: dict[str, int], seconds: float
) -> Segmentation:
    """The finished run as a ``Segmentation`` (numpy in memory, zarr arrays with a store)."""
    cfg = run.model.config
    record = {
        "model": cfg.name,
        "backend": run.backend_name,
        "device": str(s.device),
        "dtype": str(run.dtype).replace("torch.", ""),
        "seeds": run.seeds,
        "fire_rate": run.fire_rate,
        "steps": run.steps,
        "input_axes": plan.input_axes,
        "tiled": True,
        "tile": list(run.tile),
        "store_from": run.store_from,
        "tiles_computed": counts["computed"],
        "tiles_skipped": counts["skipped"],
        "store": None if o.store is None else str(o.store),
        "pyramid_levels": sorted(run.pyramid),
    }
    arrays = getattr(run.sink, "arrays", {})
    labels, lg, spread = arrays.get("labels"), arrays.get("logits"), arrays.get("spread")
    if o.store is None:  # in memory: hand back numpy arrays
        labels = None if labels is None else labels[...]
        lg = None if lg is None else lg[...]
        spread = None if spread is None else spread[...]
    return Segmentation(
        labels=labels,
        logits=lg,
        spread=spread,
        class_names=cfg.class_names,
        axes=plan.spatial_input_axes,
        seeds=run.seeds,
        seconds=seconds,
        record=record,
    )


__all__ = [
    "Box",
    "tile_grid",
    "segment_tiled",
    "TileSettings",
    "TileOutputs",
    "TiledRun",
    "Stage",
    "SourceImage",
    "ArraySink",
    "compute_stats",
]
