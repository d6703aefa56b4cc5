"""Inference: run an OctreeNCA over an image, level by level, with callbacks and ensembles."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch

from ..backends import Backend, LevelRun, get_backend
from ..nca.config import check_fire_rate, check_seed, check_steps
from ..nca.device import check_device
from ..nca.errors import Cancelled, InputError
from ..nca.octree import OctreeNCA, downsample, upsample
from .inputs import AxisPlan, prepare, to_tensor

if TYPE_CHECKING:
    import zarr

#: numpy in memory; a zarr array when a tiled run keeps its outputs in a work store.
ArrayLike: TypeAlias = "np.ndarray | zarr.Array"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class StepInfo:
    """What a per-step callback receives. ``state`` is a view of the live buffer: do not keep it."""

    run: int
    runs: int
    level: int
    step: int
    level_steps: int
    done: int  # steps finished in this run, all levels
    total: int  # steps of one run, all levels
    state: torch.Tensor  # (1, C - in, *spatial) logits + hidden, in the network's axis order


StepHook = Callable[[StepInfo], Any]
CancelCheck = Callable[[], bool] | threading.Event | None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; choose float32 or bfloat16") from None


def is_cancelled(cancel: CancelCheck) -> bool:
    """Whether a cancel Event is set or a cancel callable returns True."""
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


@torch.no_grad()
def run_octree(
    model: OctreeNCA,
    image: torch.Tensor,
    *,
    seed: int = 0,
    fire_rate: float | None = None,
    steps: list[int] | None = None,
    backend: Backend | str = "auto",
    dtype: str | torch.dtype = "float32",
    callback: StepHook | None = None,
    cancel: CancelCheck = None,
    run_index: int = 0,
    runs: int = 1,
) -> torch.Tensor:
    """Run all levels on a normalised ``(1, in, *spatial)`` image; returns ``(1, out, *spatial)`` logits.

    Only the current level's state is alive: the up-sampled state replaces the coarser one, and
    the image pyramid holds just the ``in`` image channels.
    """
    cfg = model.config
    dt = resolve_dtype(dtype)
    device = image.device
    if isinstance(backend, str):
        backend = get_backend(backend, device, dt)
    fire_rate = cfg.fire_rate if fire_rate is None else check_fire_rate(fire_rate)
    check_seed(seed)
    spatial = tuple(image.shape[2:])
    shapes = cfg.level_shapes(spatial)
    steps = list(check_steps(steps, cfg.levels)) if steps is not None else cfg.steps_for(spatial)
    total = sum(steps)
    model = model.to(device)

    # Image pyramid, coarsest last; kept in the state dtype to halve memory in bf16.
    pyramid = [image.to(dt)]
    for f in cfg.factors:
        pyramid.append(downsample(pyramid[-1], f, cfg.resize))
    state: torch.Tensor | None = None
    done = 0
    for level in range(cfg.levels - 1, -1, -1):
        if state is None:
            state = torch.zeros((1, cfg.update_channels) + shapes[level], dtype=dt, device=device)
        else:
            state = upsample(state, cfg.factors[level], shapes[level])
        img = pyramid.pop()  # free each pyramid level once used
        level_done = done

        def hook(step: int, st: torch.Tensor, level: int = level, base: int = level_done) -> None:
            if callback is not None:
                callback(StepInfo(run_index, runs, level, step, steps[level], base + step + 1, total, st))
            if is_cancelled(cancel):
                raise Cancelled(f"cancelled at level {level}, step {step + 1}")

        if is_cancelled(cancel):
            raise Cancelled(f"cancelled before level {level}")
        run = LevelRun(level=level, steps=steps[level], seed=seed, fire_rate=fire_rate, origin=(0,) * len(spatial))
        state = backend.run_level(model.level_nca(level), img, state, run, hook)
        done += steps[level]
        del img
    assert state is not None
    return state[:, : cfg.output_channels].float()


@dataclass
class Segmentation:
    """Result of :func:`segment`, in the input's spatial axis order."""

    #: Arrays are numpy, except from tiled runs with a work store: zarr arrays there (out of core).
    labels: ArrayLike  # (*spatial) 0 = background, k = class k
    logits: ArrayLike  # (classes, *spatial) float32, median over runs
    spread: ArrayLike | None  # (classes, *spatial) std of probabilities over runs (runs > 1)
    class_names: tuple[str, ...]
    axes: str  # spatial axes of the arrays above
    seeds: list[int]
    seconds: float
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def probabilities(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.asarray(self.logits)))

    @property
    def quality(self) -> dict[str, Any] | None:
        """The quality estimate (``run.quality.Quality.to_dict()``) of an ensemble run, else None."""
        return self.record.get("quality")

    @property
    def verdict(self) -> str:
        """Plain words on how far to trust this result (needs ``runs >= 2``)."""
        q = self.quality
        return q["verdict"] if q else "not estimated: run with runs >= 2 to get a quality estimate"


def labels_from_logits(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Arg-max over classes whose logit is > 0; 0 where none is (one sigmoid per class)."""
    lg = torch.as_tensor(logits)
    best, idx = lg.max(dim=0)
    labels = torch.where(best > 0, idx + 1, torch.zeros_like(idx))
    dtype = np.uint8 if lg.shape[0] < 255 else np.uint16
    return labels.numpy().astype(dtype)


def segment(
    model: OctreeNCA,
    image: object,
    *,
    axes: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    backend: Backend | str = "auto",
    seed: int = 0,
    runs: int = 1,
    fire_rate: float | None = None,
    steps: list[int] | None = None,
    callback: StepHook | None = None,
    cancel: CancelCheck = None,
    prepare_callback: Callable[[dict[str, Any]], Any] | None = None,
) -> Segmentation:
    """Segment ``image`` (numpy, torch or dask array) with ``model``.

    ``axes`` names the input's axes with T, Z, Y, X, C (guessed from the model when omitted:
    2D ``YX``/``YXC``, 3D ``ZYX``, video ``TYXC``). ``runs > 1`` runs an ensemble with seeds
    ``seed .. seed + runs - 1``: the logits are the median and ``spread`` the per-voxel standard
    deviation of the probabilities. ``callback`` gets a :class:`StepInfo` after every step and
    ``cancel`` (an Event or a callable) stops the run within one step by raising ``Cancelled``.
    ``prepare_callback`` gets a dict per frame while derived input channels (motion) are computed.
    """
    if runs < 1:
        raise InputError(f"runs must be >= 1, got {runs}")
    # The same checks as the command line, before any memory is allocated.
    check_seed(seed, runs)
    if fire_rate is not None:
        check_fire_rate(fire_rate)
    if steps is not None:
        check_steps(steps, model.config.levels)
    t0 = time.perf_counter()
    device = check_device(device)
    raw = to_tensor(image)  # kept (no copy for numpy) for the quality estimate's baseline check
    x, plan = prepare(raw, model.config, axes, device, cancel=lambda: is_cancelled(cancel), progress=prepare_callback)
    dt = resolve_dtype(dtype)
    x = x.to(dt)  # in bfloat16 this frees the float32 copy of the input
    be = get_backend(backend, device, dt) if isinstance(backend, str) else backend
    seeds = [seed + r for r in range(runs)]
    outs = []
    for r, s in enumerate(seeds):
        out = run_octree(
            model,
            x,
            seed=s,
            fire_rate=fire_rate,
            steps=steps,
            backend=be,
            dtype=dt,
            callback=callback,
            cancel=cancel,
            run_index=r,
            runs=runs,
        )
        outs.append(out[0].cpu())
    steps_used = list(steps) if steps is not None else model.config.steps_for(tuple(x.shape[2:]))
    del x
    logits, spread = combine_runs(outs)
    order = plan.to_input_order()
    logits = logits.permute(0, *(o + 1 for o in order)).contiguous()
    labels = labels_from_logits(logits)
    quality = _quality(outs, model.config, labels, raw, plan)
    if spread is not None:
        spread = spread.permute(0, *(o + 1 for o in order)).contiguous()
    cfg = model.config
    record = {
        "model": cfg.name,
        "backend": be.name,
        "device": str(device),
        "dtype": str(dt).replace("torch.", ""),
        "seeds": seeds,
        "fire_rate": cfg.fire_rate if fire_rate is None else fire_rate,
        "steps": steps_used,
        "input_axes": plan.input_axes,
    }
    if quality is not None:
        record["quality"] = quality
    return Segmentation(
        labels=labels,
        logits=logits.numpy(),
        spread=None if spread is None else spread.numpy(),
        class_names=cfg.class_names,
        axes=plan.spatial_input_axes,
        seeds=seeds,
        seconds=time.perf_counter() - t0,
        record=record,
    )


def _quality(
    outs: list[torch.Tensor], config: Any, labels: np.ndarray, raw: torch.Tensor, plan: AxisPlan
) -> dict[str, Any] | None:
    """The NCA quality estimate of an ensemble (``run.quality``), on the model's grid; None for one run.

    ``labels`` come from the runs' median and ``raw`` is the input before normalisation, both in the
    input's axis order: the baseline check, where the model's calibration asks for one, compares them.
    """
    from .quality import MIN_RUNS, assess, model_calibration

    if len(outs) < MIN_RUNS:
        return None
    calibration = model_calibration(config)
    entry = (calibration or {}).get("agreement")
    check = _baseline_check(entry, config, labels, raw, plan) if isinstance(entry, dict) else None
    return assess(outs, config.class_names, calibration, check).to_dict()


def _baseline_check(entry: dict[str, Any], config: Any, labels: np.ndarray, raw: torch.Tensor, plan: AxisPlan) -> Any:
    """The median labels' agreement with the calibrated baseline, both on the model's grid, in the
    input's axis order (the grid is at the model's spacing when the run went through ``run.resample``)."""
    from .quality import baseline_agreement

    # The model's spacing (network order) in the input's order; 1 per axis for models without one.
    order = plan.to_input_order()
    spacing = tuple(float(config.spacing[o]) for o in order) if config.spacing else (1.0,) * len(order)
    cpu = raw.detach().cpu()
    image = (cpu.float() if cpu.dtype == torch.bfloat16 else cpu).numpy()
    try:
        return baseline_agreement(labels, image, plan.input_axes, spacing, config.class_names, entry)
    except InputError:  # the baseline cannot read this input's layout: the other checks still apply
        return None


def combine_runs(outs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Median logits and std of probabilities over ensemble runs."""
    if len(outs) == 1:
        return outs[0], None
    stack = torch.stack(outs)
    # The usual median (mean of the two middle values for an even count), at any size.
    ordered = stack.sort(dim=0).values
    mid = len(outs) // 2
    logits = ordered[mid] if len(outs) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    spread = torch.sigmoid(stack).std(dim=0)
    return logits, spread


__all__ = ["segment", "run_octree", "Segmentation", "StepInfo", "labels_from_logits", "AxisPlan"]


def baseline_segmentation(name: str, image: Any, axes: str, scale: Sequence[float] | None = None) -> Segmentation:
    """:func:`~.baselines.run_baseline` as a :class:`Segmentation` (labels only: no logits, no
    quality estimate), so that a GUI shows it like a model's result."""
    from .baselines import BASELINE_MODELS, run_baseline

    t0 = time.perf_counter()
    labels = run_baseline(name, image, axes, scale)
    spatial = axes.upper().replace("C", "")
    return Segmentation(
        labels=labels,
        logits=None,
        spread=None,
        class_names=(str(BASELINE_MODELS[name]["class"]),),
        axes=spatial,
        seeds=[],
        seconds=time.perf_counter() - t0,
        record={"baseline": name, "quality": None},
    )
