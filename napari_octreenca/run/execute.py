"""Carrying out a ``RunPlan``: whole or tiled, on the input grid or on a model's fixed-spacing grid.

On a resampled grid a tiled run never needs the input in memory: the grid image is a dask array
whose chunks are resampled from the input windows they need (``resample.lazy_resampled``); the
NCA runs tile by tile on it with its logits in the work store; then the logits are resampled back
onto the input grid one output tile at a time, each tile reading the grid window it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..io.image import to_numpy
from ..nca.errors import Cancelled
from .inference import Segmentation, is_cancelled, labels_from_logits, segment
from .planner import Grid, RunPlan

#: Edge (input cells) of the tiles in which resampled logits are brought back to the input grid.
BACK_TILE = 1024


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a host or device out-of-memory error (torch raises a few kinds)."""
    if isinstance(exc, MemoryError):
        return True
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _common(plan: RunPlan) -> dict[str, Any]:
    o = plan.options
    return dict(
        device=o.device,
        dtype=o.dtype,
        backend=o.backend,
        seed=o.seed,
        runs=o.runs,
        fire_rate=o.fire_rate,
        steps=list(plan.steps),
    )


def tile_settings(plan: RunPlan) -> Any:
    """The plan's numbers for ``tiling.segment_tiled``."""
    from .tiling import TileSettings

    return TileSettings(tile=plan.tile, **_common(plan))


def run_whole(
    model: Any, plan: RunPlan, image: Any, *, callback: Any = None, cancel: Any = None, prepare_callback: Any = None
) -> Segmentation:
    """The whole image at once (resampled and reoriented as the plan says)."""
    from .resample import segment_at_model_spacing

    g = plan.grid
    kw = dict(_common(plan), callback=callback, cancel=cancel, prepare_callback=prepare_callback)
    data = image if hasattr(image, "detach") else to_numpy(image)
    if g.affine is not None:
        seg = segment_at_model_spacing(model, data, axes="ZYX", affine=g.affine, **kw)
    elif g.spacing is not None:
        seg = segment_at_model_spacing(model, data, g.spacing, axes=g.axes, **kw)
    else:
        seg = segment(model, data, axes=g.axes, **kw)
    seg.record["plan"] = plan.record()
    return seg


def run_tiled(
    model: Any,
    plan: RunPlan,
    image: Any,
    *,
    callback: Any = None,
    cancel: Any = None,
    store: str | Path | None = None,
    sink: Any = None,
    source_path: str | None = None,
    pyramid: list[Any] | None = None,
    logits: bool = True,
) -> Segmentation:
    """Tile by tile (out of core with ``store``), resampling tile by tile on fixed-spacing grids."""
    from .tiling import TileOutputs, segment_tiled

    g = plan.grid
    if not g.resampled:
        seg = segment_tiled(
            model,
            image,
            axes=g.axes,
            settings=tile_settings(plan),
            callback=callback,
            cancel=cancel,
            outputs=TileOutputs(
                store=store,
                restart=store is not None,
                logits=logits,
                sink=sink,
                scheduler=plan.options.scheduler,
                source_path=source_path,
                pyramid=pyramid,
            ),
        )
    elif g.affine is not None:
        seg = _tiled_ras(model, plan, image, store, sink, callback, cancel)
    else:
        seg = _tiled_on_grid(model, plan, image, g, store, sink, logits, callback, cancel)
    seg.record["plan"] = plan.record()
    return seg


def _tiled_on_grid(
    model: Any, plan: RunPlan, image: Any, g: Grid, store: Any, sink: Any, logits: bool, callback: Any, cancel: Any
) -> Segmentation:
    from .outofcore import WorkStore
    from .resample import lazy_resampled
    from .tiling import ArraySink, Box, TileOutputs, segment_tiled

    cfg = model.config
    tile = int(plan.tile or 256)
    lazy = lazy_resampled(image, g.axes, g.grid_shape, tile)
    grid_store = None if store is None else Path(store) / "grid"
    gseg = segment_tiled(
        model,
        lazy,
        axes=g.axes,
        settings=tile_settings(plan),
        callback=callback,
        cancel=cancel,
        outputs=TileOutputs(
            store=grid_store, restart=store is not None, sink=ArraySink(logits=True), scheduler=plan.options.scheduler
        ),
    )
    # Back onto the input grid, one output tile at a time.
    out_tile = tuple(min(BACK_TILE, n) for n in g.input_shape)
    work = WorkStore(None if store is None else Path(store) / "back", "back", restart=True)
    out = sink if sink is not None else ArraySink(logits=logits)
    runs = len(gseg.seeds)
    out.open(work, g.input_shape, out_tile, cfg.output_channels, runs)
    for box in _boxes(g.input_shape, out_tile):
        if is_cancelled(cancel):
            raise Cancelled("segmentation cancelled")
        lg = _back_box(gseg.logits, g, box)
        sp = None if gseg.spread is None else _back_box(gseg.spread, g, box)
        out.write(Box(box[0], box[1]), labels_from_logits(lg), lg, sp)
    if hasattr(out, "finish"):
        out.finish()
    arrays = getattr(out, "arrays", {})
    labels, lgs, spread = arrays.get("labels"), arrays.get("logits"), arrays.get("spread")
    if store is None:
        labels = None if labels is None else labels[...]
        lgs = None if lgs is None else lgs[...]
        spread = None if spread is None else spread[...]
    record = dict(
        gseg.record,
        input_spacing=list(g.spacing or ()),
        model_spacing=list(g.model_spacing or ()),
        model_grid=list(g.grid_shape),
    )
    return Segmentation(labels, lgs, spread, gseg.class_names, gseg.axes, gseg.seeds, gseg.seconds, record)


def _back_box(grid_values: Any, g: Grid, box: tuple[tuple[int, ...], tuple[int, ...]]) -> np.ndarray:
    from .resample import resample_box

    nd = len(g.input_shape)
    return resample_box(
        grid_values,
        g.grid_shape,
        g.input_shape,
        box[0],
        box[1],
        spatial_axes=list(range(1, nd + 1)),
        order=1,
        antialias=False,
    ).astype(np.float32)


def _boxes(shape: tuple[int, ...], tile: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    import itertools

    ranges = [range(0, n, t) for n, t in zip(shape, tile)]
    return [
        (start, tuple(min(n, s + t) for s, n, t in zip(start, shape, tile))) for start in itertools.product(*ranges)
    ]


def _tiled_ras(
    model: Any, plan: RunPlan, image: Any, store: Any, sink: Any, callback: Any, cancel: Any
) -> Segmentation:
    """A NIfTI volume for a fixed-spacing 3D model, in tiles: volumes fit in memory, so reorient it
    whole, run the grid in tiles, and put the (in-memory) results back in the file's order."""
    from .resample import reorient_ras_to_zyx, reorient_zyx_to_ras

    g = plan.grid
    vol, sp = reorient_zyx_to_ras(to_numpy(image), g.affine)
    inner = Grid("ZYX", tuple(vol.shape), g.grid_shape, sp, g.model_spacing)
    seg = _tiled_on_grid(model, plan, vol, inner, None, None, True, callback, cancel)
    logits = reorient_ras_to_zyx(seg.logits, g.affine, channel_axis=0)
    spread = None if seg.spread is None else reorient_ras_to_zyx(seg.spread, g.affine, channel_axis=0)
    labels = labels_from_logits(logits)
    if sink is not None:
        from .outofcore import WorkStore
        from .tiling import Box

        shape = tuple(labels.shape)
        sink.open(WorkStore(None, "ras"), shape, shape, logits.shape[0], len(seg.seeds))
        sink.write(Box((0,) * 3, shape), labels, logits, spread)
        if hasattr(sink, "finish"):
            sink.finish()
    record = dict(seg.record, reoriented="RAS+")
    return Segmentation(labels, logits, spread, seg.class_names, "ZYX", seg.seeds, seg.seconds, record)


# -- the entry point ------------------------------------------------------------------------------------
Notice = Callable[[str], Any]


def execute(
    model: Any,
    plan: RunPlan,
    image: Any,
    *,
    callback: Any = None,
    tile_callback: Any = None,
    cancel: Any = None,
    store: Any = None,
    sink: Any = None,
    source_path: str | None = None,
    pyramid: list[Any] | None = None,
    logits: bool = True,
    notice: Notice | None = None,
    prepare_callback: Any = None,
) -> Any:
    """Run ``plan`` on ``image`` (numpy, dask or zarr in the geometry it was planned for).

    ``callback`` gets a ``StepInfo`` per step (whole runs), ``tile_callback`` a dict per tile
    (tiled runs). ``store`` (a folder) makes a tiled run out of core and resumable; ``sink``
    receives the finished label tiles (e.g. an OME-Zarr writer). A whole run that runs out of
    memory is retried tiled when the plan allows it; ``notice`` is told why.
    ``prepare_callback`` gets a dict per frame while derived input channels (motion) are computed.
    Returns a ``run.inference.Segmentation`` on the input's grid.
    """
    if not plan.tiled:
        try:
            return run_whole(model, plan, image, callback=callback, cancel=cancel, prepare_callback=prepare_callback)
        except Exception as exc:
            if not (plan.options.retry_tiled and is_out_of_memory(exc)):
                raise
            _free_device_cache(plan.options.device)
            plan = plan.as_tiled(f"{plan.options.device} ran out of memory for the whole image")
            if notice is not None:
                notice(plan.text)
    seg = run_tiled(
        model,
        plan,
        image,
        callback=tile_callback,
        cancel=cancel,
        store=store,
        sink=sink,
        source_path=source_path,
        pyramid=pyramid,
        logits=logits,
    )
    seg.record["retried_tiled_after_oom"] = bool(plan.notes)
    return seg


def _free_device_cache(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


__all__ = ["execute", "run_whole", "run_tiled", "is_out_of_memory"]
