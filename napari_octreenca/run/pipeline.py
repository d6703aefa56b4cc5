"""``run_segment``: segment files, folders or globs; what ``octreenca segment`` calls.

Small inputs go through ``run.inference.segment`` whole; inputs whose whole-image run would need more
memory than the budget (or any run with ``tile`` or ``scheduler``) go through the exact tiled
pipeline with a resumable work folder ``<output>.octreenca-work`` beside the output (removed
when the output is complete). OME-Zarr outputs are filled tile by tile; NIfTI/TIFF outputs are
written from the finished tiles at the end, atomically.
"""

from __future__ import annotations

import glob
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..nca.errors import InputError
from .inference import segment
from ..nca.modelfile import with_run_settings
from ..nca.registry import open_model
from .resample import model_grid_shape, model_spacing_in_input_order, segment_at_model_spacing
from ..io.readers import FRAME_SUFFIXES, ImageData, file_kind, read_image, to_numpy
from ..io.writers import OUTPUT_SUFFIXES, output_suffix, write_labels

Progress = Callable[[dict[str, Any]], Any] | None
#: Default memory budget for a whole-image run (bytes); above it the run is tiled.
WHOLE_BUDGET = 3 << 30
WORK_SUFFIX = ".octreenca-work"


def expand_inputs(inputs: list[str], video_model: bool = False) -> list[Path]:
    """Files, folders and globs -> input paths (a folder of frames is one video for video models)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if any(ch in item for ch in "*?[") and not p.exists():
            matches = sorted(glob.glob(item))
            if not matches:
                raise InputError(f"the pattern {item!r} matches no files")
            out.extend(Path(m) for m in matches)
        elif p.is_dir():
            kind = file_kind(p) if _is_image_dir(p) else "batch"
            if kind == "ome-zarr" or (kind == "frames" and video_model):
                out.append(p)
            else:
                members = sorted(f for f in p.iterdir() if _readable(f))
                if not members:
                    raise InputError(f"the folder {p} holds no readable images")
                out.extend(members)
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"input {item!r} does not exist")
    return out


def _is_image_dir(p: Path) -> bool:
    try:
        file_kind(p)
        return True
    except InputError:
        return False


def _readable(f: Path) -> bool:
    if f.name.startswith(".") or f.name.endswith(WORK_SUFFIX):
        return False
    try:
        file_kind(f)
        return True
    except InputError:
        return False


def default_output_name(src: Path, im: ImageData | None = None) -> str:
    """``<stem>_labels<ext>``: NIfTI stays NIfTI, pictures become PNG, everything else OME-Zarr."""
    name = src.name
    for s in (".nii.gz", ".ome.tif", ".ome.tiff", ".ome.zarr"):
        if name.lower().endswith(s):
            stem, kind = name[: -len(s)], s
            break
    else:
        stem, kind = (src.stem, src.suffix.lower()) if src.is_file() else (src.name, "")
    if kind in (".nii", ".nii.gz"):
        ext = ".nii.gz"
    elif kind in FRAME_SUFFIXES and kind not in (".tif", ".tiff"):
        ext = ".png"
    else:
        ext = ".zarr"
    return f"{stem}_labels{ext}"


def whole_bytes(cells: int, model: Any) -> int:
    """Peak memory of a whole-image run: input + pyramid, two state buffers, slab scratch."""
    cfg = model.config
    return int(cells * 4 * (cfg.input_channels * 1.4 + 2 * cfg.update_channels + 1.5 * cfg.output_channels)) + (256 << 20)


def run_segment(inputs: list[str], output: str, model: str, *, device: str = "cpu", dtype: str = "float32",
                backend: str = "auto", seed: int = 0, runs: int = 1, tile: int | None = None,
                scheduler: str | None = None, progress: Progress = None, memory_budget: int | None = None,
                keep_work: bool = False, use_pyramid: bool = False, normalization: str | None = None,
                fire_rate: float | None = None) -> list[Path]:
    """Segment every input and write labels; returns the output paths (see ``octreenca segment``).

    ``output`` is a file for one input (its extension picks the format), else a folder that gets
    ``<name>_labels.<ext>`` per input. Rerunning after an interruption resumes tiled inputs from
    their work folders. ``use_pyramid`` lets tiled runs read octree level images from the
    file's own pyramid where the shapes fit (faster; not bitwise equal to a whole run).
    ``normalization`` (a name of ``nca.modelfile.ORIGINAL_NORMALIZATIONS``) and ``fire_rate``
    replace the model's own for this run. With ``runs >= 2`` inputs segmented whole get a quality
    estimate (``run.quality``), reported to ``progress`` as stage ``quality`` and stored in the
    output's metadata (``octreenca segment`` runs 3 by default). ``model`` may also name a classical baseline (``baselines.BASELINE_MODELS``, e.g. ``otsu-brain``).
    """
    from ..baselines import BASELINE_MODELS

    if model in BASELINE_MODELS:
        return _run_baseline(inputs, output, model, progress)
    net = with_run_settings(open_model(model, device), normalization, fire_rate)
    cfg = net.config
    paths = expand_inputs(list(inputs), video_model="T" in cfg.axes)
    if not paths:
        raise InputError("no inputs given")
    out = Path(output)
    single = len(paths) == 1 and _has_output_suffix(out)
    if not single:
        if _has_output_suffix(out) and not out.is_dir():
            raise InputError(f"{len(paths)} inputs need an output folder, not the file {out}")
        out.mkdir(parents=True, exist_ok=True)
    budget = memory_budget if memory_budget is not None else _budget()
    results = []
    for k, src in enumerate(paths):
        dest = out if single else out / default_output_name(src)
        if progress is not None:
            progress({"stage": "input", "input": k + 1, "inputs": len(paths), "path": str(src), "output": str(dest)})
        im = read_image(src)
        spatial = [n for n, a in zip(im.shape, im.axes) if a != "C"]
        cells = int(np.prod(spatial))
        if cfg.spacing is not None:
            # Models with a fixed spacing run on the input resampled to it (a much smaller grid);
            # the exact tiled path works on the input's own grid, so they always go whole.
            cells = int(np.prod(model_grid_shape(spatial, im.scale, model_spacing_in_input_order(cfg, im.axes))))
        tiled = cfg.spacing is None and (tile is not None or scheduler is not None or whole_bytes(cells, net) > budget)
        t0 = time.perf_counter()
        if tiled:
            _segment_tiled(net, im, src, dest, device=device, dtype=dtype, backend=backend, seed=seed,
                           runs=runs, tile=tile, scheduler=scheduler, progress=progress, keep_work=keep_work,
                           use_pyramid=use_pyramid)
        else:
            seg = _segment_whole(net, im, device=device, dtype=dtype, backend=backend, seed=seed, runs=runs,
                                 callback=_step_progress(progress))
            meta = {"model": cfg.name, "seeds": list(seg.seeds), "quality": seg.quality}
            write_labels(dest, seg.labels, like=im, class_names=cfg.class_names, metadata=meta)
        if progress is not None:
            verdict = "not estimated for tiled runs (yet)" if tiled else seg.verdict
            progress({"stage": "quality", "path": str(dest), "quality": None if tiled else seg.quality,
                      "verdict": verdict})
        if progress is not None:
            progress({"stage": "written", "input": k + 1, "inputs": len(paths), "path": str(dest), "tiled": tiled,
                      "seconds": time.perf_counter() - t0})
        results.append(dest)
    return results


def _run_baseline(inputs: list[str], output: str, name: str, progress: Progress) -> list[Path]:
    """``run_segment`` for a classical baseline: the same inputs and outputs, no NCA."""
    from ..baselines import BASELINE_MODELS, run_baseline

    kind = BASELINE_MODELS[name]
    paths = expand_inputs(list(inputs))
    out = Path(output)
    single = len(paths) == 1 and _has_output_suffix(out)
    if not single:
        out.mkdir(parents=True, exist_ok=True)
    results = []
    for k, src in enumerate(paths):
        dest = out if single else out / default_output_name(src)
        im = read_image(src)
        labels = run_baseline(name, to_numpy(im.data), im.axes, im.scale)
        write_labels(dest, labels, like=im, class_names=(kind["class"],), metadata={"model": name, "quality": None})
        if progress is not None:
            progress({"stage": "written", "input": k + 1, "inputs": len(paths), "path": str(dest), "tiled": False})
        results.append(dest)
    return results


def _segment_whole(net: Any, im: ImageData, **kwargs: Any) -> Any:
    """``run.inference.segment`` on the whole input; models with ``config.spacing`` get the input resampled
    to it (and NIfTI volumes reoriented to RAS+ through their affine) and the labels back on the
    input's grid."""
    data = to_numpy(im.data)
    if net.config.spacing is None:
        return segment(net, data, axes=im.axes, **kwargs)
    use_affine = im.kind == "nifti" and im.axes == "ZYX" and im.affine is not None and net.config.spatial_dims == 3
    if use_affine:
        return segment_at_model_spacing(net, data, axes=im.axes, affine=im.affine, **kwargs)
    return segment_at_model_spacing(net, data, im.scale, axes=im.axes, **kwargs)


def _has_output_suffix(p: Path) -> bool:
    try:
        output_suffix(p)
        return True
    except InputError:
        return False


def _budget() -> int:
    """Whole runs may use up to a third of the available memory (at most WHOLE_BUDGET)."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return WHOLE_BUDGET
    return int(min(WHOLE_BUDGET, avail // 3))


def _step_progress(progress: Progress) -> Any:
    if progress is None:
        return None

    def hook(info: Any) -> None:
        progress({"stage": "step", "level": info.level, "step": info.step + 1, "steps": info.level_steps,
                  "done": info.done, "total": info.total, "tile": None, "tiles": None})

    return hook


def _segment_tiled(net: Any, im: ImageData, src: Path, dest: Path, *, device: str, dtype: str, backend: str,
                   seed: int, runs: int, tile: int | None, scheduler: str | None, progress: Progress,
                   keep_work: bool, use_pyramid: bool = False) -> None:
    from ..io.ome_zarr import OmeZarrLabelsSink
    from .tiling import ArraySink, segment_tiled

    suffix = output_suffix(dest)
    work = dest.parent / (dest.name + WORK_SUFFIX)
    resuming = (work / "meta.json").exists()
    cfg = net.config
    if suffix == ".zarr":
        if not resuming:
            _drop_old_labels(dest)
        sink: Any = OmeZarrLabelsSink(dest, im.spatial_axes, scale=im.scale, translate=im.translate,
                                      class_names=cfg.class_names, source=str(src))
    else:
        sink = ArraySink(logits=False)
    seg = segment_tiled(net, im.data, axes=im.axes, tile=tile, backend=backend, dtype=dtype, seed=seed, runs=runs,
                        callback=progress, store=work, sink=sink, scheduler=scheduler, device=device,
                        source_path=str(src), logits=False, restart=True,
                        pyramid=im.levels if use_pyramid and len(im.levels) > 1 else None)
    if suffix != ".zarr":
        write_labels(dest, seg.labels, like=im, class_names=cfg.class_names)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)


def _drop_old_labels(dest: Path) -> None:
    """A fresh run must not leave an older, complete-looking labels image at ``dest``."""
    if not dest.exists():
        return
    seg = dest / "labels" / "segmentation"
    if (dest / "zarr.json").exists() and (dest / "0").exists():  # an image store: keep the image
        shutil.rmtree(seg, ignore_errors=True)
        import zarr

        lg = zarr.open_group(str(dest / "labels"), mode="a")
        ome = dict(lg.attrs.get("ome", {}))
        ome["labels"] = [n for n in ome.get("labels", []) if n != "segmentation"]
        lg.attrs["ome"] = ome
    else:
        shutil.rmtree(dest)


__all__ = ["run_segment", "expand_inputs", "default_output_name", "OUTPUT_SUFFIXES"]
