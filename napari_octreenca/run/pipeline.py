"""``run_segment``: segment files, folders or globs; what ``octreenca segment`` calls.

The run planner (``run.planner``) decides per input: small inputs run whole; inputs whose
whole-image run would need more memory than the budget (or any run with ``tile`` or ``scheduler``),
fixed-spacing models included (resampled tile by tile), go through the tiled pipeline with a resumable work folder ``<output>.octreenca-work-<run key>`` beside the output
(removed when the output is complete; work folders of other settings are removed when a run
starts). OME-Zarr outputs are filled tile by tile; NIfTI/TIFF outputs are written from the
finished tiles at the end, atomically.

Outputs are protected before anything runs: each output path is locked for the run (a second
run on it fails at once, or waits), an output that is an input is refused unless
``overwrite``, and an unknown output suffix is an error. ``keep_going`` processes every input
and raises :class:`BatchError` listing the failures at the end.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import itertools
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..fileutil import output_lock
from ..io.readers import FRAME_SUFFIXES, ImageData, file_kind, read_image, to_numpy
from ..io.writers import OUTPUT_SUFFIXES, output_suffix, write_labels
from ..nca.config import check_seed
from ..nca.errors import Cancelled, InputError, OctreeNCAError, OctreeNCAWarning
from ..nca.modelfile import with_run_settings
from ..nca.registry import open_model
from .execute import execute
from .planner import InputGeometry, RunOptions, RunPlan, plan_run

Progress = Callable[[dict[str, Any]], Any] | None
#: Default memory budget for a whole-image run (bytes); above it the run is tiled.
WHOLE_BUDGET = 3 << 30
#: Ensemble size when none is asked for (inputs that run whole; tiled ones run once).
DEFAULT_RUNS = 3
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
                # Sub-folders of pictures (e.g. an earlier run's output folder) are not 2D inputs.
                members = sorted(f for f in p.iterdir() if _readable(f) and _batch_member(f, video_model))
                if not members:
                    raise InputError(f"the folder {p} holds no readable images")
                out.extend(members)
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"input {item!r} does not exist")
    return out


def _batch_member(f: Path, video_model: bool) -> bool:
    """A file, an OME-Zarr store, or (for video models) a folder of frames."""
    return not f.is_dir() or video_model or file_kind(f) == "ome-zarr"


def _is_image_dir(p: Path) -> bool:
    try:
        file_kind(p)
        return True
    except InputError:
        return False


class BatchError(OctreeNCAError):
    """Some inputs of a batch failed (the others were written): ``failures`` = [(input, error)]."""

    def __init__(self, failures: list[tuple[Path, BaseException]], written: list[Path], total: int):
        self.failures = failures
        self.written = written
        names = ", ".join(p.name for p, _ in failures[:5]) + (", ..." if len(failures) > 5 else "")
        super().__init__(f"{len(failures)} of {total} inputs failed ({names}); the other {len(written)} were written")


class OutOfMemory(OctreeNCAError, MemoryError):
    """A run needed more memory than there is; the message names the input and a flag that helps."""


def _readable(f: Path) -> bool:
    if f.name.startswith(".") or WORK_SUFFIX in f.name:
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


def run_segment(
    inputs: list[str],
    output: str,
    model: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    backend: str = "auto",
    seed: int = 0,
    runs: int | None = 1,
    tile: int | None = None,
    scheduler: str | None = None,
    progress: Progress = None,
    memory_budget: int | None = None,
    keep_work: bool = False,
    use_pyramid: bool = False,
    overwrite: bool = False,
    wait: bool = False,
    keep_going: bool | None = None,
    normalization: str | None = None,
    fire_rate: float | None = None,
) -> list[Path]:
    """Segment every input and write labels; returns the output paths (see ``octreenca segment``).

    ``output`` is a file for one input (its extension picks the format), else a folder that gets
    ``<name>_labels.<ext>`` per input. Rerunning after an interruption resumes tiled inputs from
    their work folders. ``use_pyramid`` lets tiled runs read octree level images from the
    file's own pyramid where the shapes fit (faster; not bitwise equal to a whole run).
    An output that is an input is refused unless ``overwrite``; an output another run is
    writing fails at once unless ``wait``. ``keep_going`` (default: on when an input is a
    folder or a glob) goes on after a failed input and raises :class:`BatchError` at the end.
    ``normalization`` (a name of ``nca.modelfile.ORIGINAL_NORMALIZATIONS``) and ``fire_rate``
    replace the model's own for this run. With ``runs >= 2`` inputs segmented whole get a quality
    estimate (``run.quality``), reported to ``progress`` as stage ``quality`` and stored in the
    output's metadata (``octreenca segment`` runs 3 by default). ``model`` may also name a classical baseline (``baselines.BASELINE_MODELS``, e.g. ``otsu-brain``).
    """
    from .baselines import BASELINE_MODELS

    if model in BASELINE_MODELS:
        return _run_baseline(inputs, output, model, progress)
    net = with_run_settings(open_model(model, device), normalization, fire_rate)
    cfg = net.config
    check_seed(seed, runs or DEFAULT_RUNS)
    paths = expand_inputs(list(inputs), video_model="T" in cfg.axes)
    if not paths:
        raise InputError("no inputs given")
    if keep_going is None:
        keep_going = any(_is_batch_item(item, video_model="T" in cfg.axes) for item in inputs)
    jobs = plan_outputs(paths, Path(output), overwrite=overwrite)
    # runs=None: an ensemble of 3 (median + quality estimate) where the input runs whole, one run
    # where it runs tile by tile (3x the time and no estimate there yet).
    options = RunOptions(
        device=device,
        dtype=dtype,
        backend=backend,
        seed=seed,
        runs=runs or DEFAULT_RUNS,
        tile=tile,
        scheduler=scheduler,
        memory_budget=memory_budget if memory_budget is not None else _budget(),
    )
    results: list[Path] = []
    failures: list[tuple[Path, BaseException]] = []
    for k, (src, dest) in enumerate(jobs):
        if progress is not None:
            progress({"stage": "input", "input": k + 1, "inputs": len(jobs), "path": str(src), "output": str(dest)})
        t0 = time.perf_counter()
        try:
            with output_lock(dest, wait=wait), _warnings_naming(src):
                tiled = _segment_file(
                    net,
                    src,
                    dest,
                    options,
                    progress=progress,
                    keep_work=keep_work,
                    use_pyramid=use_pyramid,
                    single_run_if_tiled=runs is None,
                )
        except (KeyboardInterrupt, Cancelled):
            raise
        except Exception as exc:
            _name_input(exc, src, dest)
            if not keep_going:
                raise
            failures.append((src, exc))
            if progress is not None:
                progress(
                    {
                        "stage": "failed",
                        "input": k + 1,
                        "inputs": len(jobs),
                        "path": str(src),
                        "error": _one_line(exc) if src.name in _one_line(exc) else f"{src}: {_one_line(exc)}",
                    }
                )
            continue
        if progress is not None:
            progress(
                {
                    "stage": "written",
                    "input": k + 1,
                    "inputs": len(jobs),
                    "path": str(dest),
                    "tiled": tiled,
                    "seconds": time.perf_counter() - t0,
                }
            )
        results.append(dest)
    if failures:
        raise BatchError(failures, results, len(jobs))
    return results


def _segment_file(
    net: Any,
    src: Path,
    dest: Path,
    options: RunOptions,
    *,
    progress: Progress,
    keep_work: bool,
    use_pyramid: bool,
    single_run_if_tiled: bool = False,
) -> bool:
    """Segment one input into ``dest`` (the caller holds its lock); returns whether it ran tiled."""
    cfg = net.config
    im = read_image(src)
    plan = plan_run(cfg, InputGeometry.of(im), options)
    if plan.tiled and single_run_if_tiled and options.runs > 1:
        plan = plan_run(cfg, InputGeometry.of(im), replace(options, runs=1))
    try:
        if plan.tiled:
            _check_sample(im, cfg)
            _segment_tiled(net, plan, im, src, dest, progress=progress, keep_work=keep_work, use_pyramid=use_pyramid)
        else:
            seg = execute(net, plan, im.data, callback=_step_progress(progress), prepare_callback=progress)
            _prepare_output(dest, resuming=False)
            meta = {"model": cfg.name, "seeds": list(seg.seeds), "quality": seg.quality}
            write_labels(dest, seg.labels, like=im, class_names=cfg.class_names, metadata=meta)
    except MemoryError:
        raise OutOfMemory(_memory_advice(src, plan.tiled, options.tile)) from None
    if progress is not None:
        verdict = "not estimated for tiled runs (yet)" if plan.tiled else seg.verdict
        progress(
            {"stage": "quality", "path": str(dest), "quality": None if plan.tiled else seg.quality, "verdict": verdict}
        )
    return plan.tiled


@contextmanager
def _warnings_naming(src: Path) -> Iterator[None]:
    """Warnings raised while segmenting ``src`` are re-issued with its name (a batch has many inputs)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            pending = list(caught)
    for w in pending:
        if issubclass(w.category, OctreeNCAWarning):
            text = str(w.message)
            warnings.warn(w.category(text if str(src) in text else f"{src}: {text}"), stacklevel=3)
        else:  # someone else's: as it was, under the caller's filters
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _check_sample(im: ImageData, cfg: Any) -> None:
    """Value checks for a tiled run, which never holds the whole input: on a few windows of the
    smallest pyramid level (at most 4 per axis, 256 cells wide), so a slide without a pyramid
    costs a handful of chunk reads, not a second pass over the file."""
    from .inputs import check_float32_range, check_range

    lv = im.levels[-1] if im.levels else im.data
    spatial = [i for i, a in enumerate(im.axes) if a != "C"]
    per_axis: list[list[slice]] = []
    for i in range(lv.ndim):
        n = int(lv.shape[i])
        if i not in spatial or n <= 256:
            per_axis.append([slice(None)])
            continue
        starts = np.linspace(0, n - 256, 4 if len(spatial) == 2 else 3).astype(int)
        per_axis.append([slice(int(a), int(a) + 256) for a in sorted(set(starts))])
    windows = [to_numpy(lv[idx]) for idx in itertools.product(*per_axis)]
    sample = np.concatenate([w.reshape(-1) for w in windows])
    if np.issubdtype(sample.dtype, np.floating) and not np.isfinite(sample).all():
        raise InputError("the input contains NaN or infinite values; fill or mask them first")
    check_float32_range(sample)
    check_range(sample, cfg)


def _memory_advice(src: Path, tiled: bool, tile: int | None) -> str:
    """One line naming the input and the flag that lowers the peak memory of its run."""
    if tiled:
        smaller = max(64, (tile or 1024) // 2)
        return f"out of memory segmenting {src} tile by tile: retry with a smaller --tile (e.g. {smaller}) or --dtype bfloat16"
    return f"out of memory segmenting {src} as a whole image: retry with --tile 1024 (tile by tile, out of core) or --dtype bfloat16"


def _name_input(exc: BaseException, src: Path, dest: Path) -> None:
    """Prefix our own one-line errors with the input they are about, unless they name it already; an
    OSError that names no file gets the output (disk full, read-only disk) or the input."""
    if isinstance(exc, OSError) and exc.errno is not None and not exc.filename:
        exc.filename = str(dest) if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else str(src)
    if not (isinstance(exc, OctreeNCAError) and len(exc.args) == 1 and isinstance(exc.args[0], str)):
        return
    if str(src) not in exc.args[0] and src.name not in exc.args[0]:
        exc.args = (f"{src}: {exc.args[0]}",)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_batch_item(item: str, video_model: bool) -> bool:
    """A folder of separate images or a glob (as ``expand_inputs`` sees them): the inputs of a batch."""
    p = Path(item)
    if any(ch in item for ch in "*?[") and not p.exists():
        return True
    if not p.is_dir():
        return False
    kind = file_kind(p) if _is_image_dir(p) else "batch"
    return not (kind == "ome-zarr" or (kind == "frames" and video_model))


# -- outputs: where each input goes, and what must not be overwritten ------------------------------
def plan_outputs(paths: list[Path], out: Path, *, overwrite: bool = False) -> list[tuple[Path, Path]]:
    """(input, output) pairs; refuses unknown output suffixes and outputs that would destroy inputs.

    An output that is an input (or lies inside an input folder or store) is refused unless
    ``overwrite``; an OME-Zarr image given as its own output is fine (the labels go into its
    ``labels`` group and the image stays). When the output folder is an input folder, earlier
    results there (``<name>_labels.<ext>`` of another input) are refused as inputs unless
    ``overwrite``, which replaces them and does not read them as inputs.
    """
    if _single_output(out, len(paths)):
        pairs = [(paths[0], out)]
    else:
        out.mkdir(parents=True, exist_ok=True)
        paths = _drop_earlier_results(paths, out, overwrite)
        pairs = [(p, out / default_output_name(p)) for p in paths]
    seen: dict[Path, Path] = {}
    for src, dest in pairs:
        key = _real(dest)
        if key in seen:
            raise InputError(
                f"{seen[key]} and {src} would both be written to {dest}; segment them into separate folders"
            )
        seen[key] = src
        if not overwrite:
            _refuse_input_as_output(dest, paths)
    return pairs


def _single_output(out: Path, n_inputs: int) -> bool:
    """Whether ``out`` is one output file; an unknown suffix is an error, not a folder."""
    known = _has_output_suffix(out)
    if known and n_inputs == 1:
        return True
    if known and not out.is_dir():
        raise InputError(f"{n_inputs} inputs need an output folder, not the file {out}")
    if not known and not out.is_dir() and Path(str(out).rstrip("/")).suffix:
        raise InputError(
            f"cannot tell the output format of {out}: name a file {', '.join(OUTPUT_SUFFIXES)} "
            "or a folder without a suffix"
        )
    return False


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _refuse_input_as_output(dest: Path, inputs: list[Path]) -> None:
    d = _real(dest)
    for src in inputs:
        s = _real(src)
        if d == s and src.is_dir() and output_suffix(dest) == ".zarr" and file_kind(src) == "ome-zarr":
            continue  # labels are added to the image's own store; the image is kept
        if d == s or (src.is_dir() and s in d.parents):
            raise InputError(
                f"the output {dest} is the input {src} (or inside it): writing would destroy the input; "
                "choose another output, or pass --overwrite if that is what you want"
            )


def _drop_earlier_results(paths: list[Path], out: Path, overwrite: bool) -> list[Path]:
    """Inputs minus earlier results in the output folder (``<name>_labels.<ext>`` of another input)."""
    folder = _real(out)
    produced = {default_output_name(p) for p in paths}
    earlier = [p for p in paths if _real(p.parent) == folder and p.name in produced]
    if earlier and not overwrite:
        raise InputError(
            f"the output folder {out} is also an input folder and holds earlier results "
            f"({earlier[0].name}): choose another output folder, or pass --overwrite to replace them"
        )
    return [p for p in paths if p not in earlier]


def _prepare_output(dest: Path, resuming: bool) -> None:
    """Before writing: an OME-Zarr output loses its "complete" listing first (and old labels when fresh)."""
    if output_suffix(dest) == ".zarr" and not resuming:
        _drop_old_labels(dest)


def _run_baseline(inputs: list[str], output: str, name: str, progress: Progress) -> list[Path]:
    """``run_segment`` for a classical baseline: the same inputs and outputs, no NCA."""
    from .baselines import BASELINE_MODELS, run_baseline

    kind = BASELINE_MODELS[name]
    paths = expand_inputs(list(inputs), video_model=bool(kind.get("video")))
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
        progress(
            {
                "stage": "step",
                "level": info.level,
                "step": info.step + 1,
                "steps": info.level_steps,
                "done": info.done,
                "total": info.total,
                "tile": None,
                "tiles": None,
            }
        )

    return hook


def _segment_tiled(
    net: Any,
    plan: RunPlan,
    im: ImageData,
    src: Path,
    dest: Path,
    *,
    progress: Progress,
    keep_work: bool,
    use_pyramid: bool = False,
) -> None:
    from ..io.ome_zarr import OmeZarrLabelsSink
    from .outofcore import remove_work_folder
    from .tiling import ArraySink

    o = plan.options
    suffix = output_suffix(dest)
    work = work_folder(
        dest,
        _run_key(
            net,
            src,
            seed=o.seed,
            runs=o.runs,
            tile=plan.tile,
            dtype=o.dtype,
            backend=o.backend,
            use_pyramid=use_pyramid,
            steps=list(plan.steps),
        ),
    )
    _remove_other_work(dest, keep=work)
    resuming = (work / "meta.json").exists()
    cfg = net.config
    if suffix == ".zarr":
        _prepare_output(dest, resuming)
        sink: Any = OmeZarrLabelsSink(
            dest, im.spatial_axes, scale=im.scale, translate=im.translate, class_names=cfg.class_names, source=str(src)
        )
    else:
        sink = ArraySink(logits=False)
    seg = execute(
        net,
        plan,
        im.data,
        tile_callback=progress,
        store=work,
        sink=sink,
        source_path=str(src),
        logits=False,
        pyramid=im.levels if use_pyramid and len(im.levels) > 1 else None,
    )
    if suffix != ".zarr":
        write_labels(dest, seg.labels, like=im, class_names=cfg.class_names)
    if not keep_work:
        remove_work_folder(work)


def work_folder(dest: Path, key: str) -> Path:
    """The work folder of one run on ``dest``: ``<dest>.octreenca-work-<key>`` (one per run settings)."""
    return dest.parent / f"{dest.name}{WORK_SUFFIX}-{key}"


def find_work_folders(dest: Path) -> list[Path]:
    """Work folders beside ``dest`` (this run's and stale ones of earlier runs)."""
    return sorted(dest.parent.glob(glob.escape(dest.name + WORK_SUFFIX) + "*"))


def _run_key(net: Any, src: Path, **settings: Any) -> str:
    """Short hash of what makes a run on ``src`` different from another (model, input file, settings)."""
    from .outofcore import model_digest

    st = src.stat()
    parts = {
        "model": model_digest(net),
        "src": str(_real(src)),
        "size": st.st_size,
        "mtime": st.st_mtime_ns,
        **settings,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _remove_other_work(dest: Path, keep: Path) -> None:
    """Work folders of earlier runs with other settings cannot be resumed by this one: remove them."""
    from .outofcore import remove_work_folder

    for w in find_work_folders(dest):
        if w != keep and w.is_dir():
            remove_work_folder(w)


def _drop_old_labels(dest: Path) -> None:
    """A fresh run must not leave an older, complete-looking labels image at ``dest``.

    The listing goes first, then the arrays: killed in between, nothing looks complete.
    """
    if not dest.exists():
        return
    import zarr

    from ..io.ome_zarr import unlist_labels

    seg = dest / "labels" / "segmentation"
    if (dest / "labels").is_dir():
        unlist_labels(zarr.open_group(str(dest / "labels"), mode="a"), "segmentation")
    if (dest / "zarr.json").exists() and (dest / "0").exists():  # an image store: keep the image
        shutil.rmtree(seg, ignore_errors=True)
    elif (dest / "zarr.json").exists() or (dest / ".zgroup").exists():
        shutil.rmtree(dest)
    elif dest.is_dir() and any(dest.iterdir()) or dest.is_file():
        raise InputError(f"the output {dest} exists and is not a zarr store: remove it or choose another output")


__all__ = [
    "OUTPUT_SUFFIXES",
    "BatchError",
    "OutOfMemory",
    "default_output_name",
    "expand_inputs",
    "find_work_folders",
    "plan_outputs",
    "run_segment",
    "work_folder",
]
