"""Turning user arrays into network input: axis handling, validation and normalisation."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..nca.config import ModelConfig, Normalization
from ..nca.errors import InputError, OctreeNCAWarning

_AXIS_LETTERS = set("TZYXC")


@dataclass(frozen=True)
class AxisPlan:
    """How an input array's axes map onto the model's ``(C, *spatial)`` layout."""

    input_axes: str  # e.g. "TYXC"
    model_axes: str  # e.g. "YXT" (spatial, in network order)
    permutation: tuple[int, ...]  # input axes -> (C, *model spatial); C may be absent
    has_channel: bool

    @property
    def spatial_input_axes(self) -> str:
        return "".join(a for a in self.input_axes if a != "C")

    def to_input_order(self) -> tuple[int, ...]:
        """Permutation taking model spatial order back to the input's spatial order."""
        return tuple(self.model_axes.index(a) for a in self.spatial_input_axes)


def _guess_axes(shape: tuple[int, ...], config: ModelConfig) -> str:
    nd, sd, cin = len(shape), config.spatial_dims, config.image_channels
    # Arrays conventionally put the slice/time axis first, whatever order the network uses.
    spatial = "YX" if sd == 2 else ("TYX" if "T" in config.axes else "ZYX")
    if nd == sd:
        return spatial
    if nd == sd + 1:
        if shape[-1] == cin:
            return spatial + "C"
        if shape[0] == cin:
            return "C" + spatial
        raise InputError(
            f"input of shape {shape} has no axis of length {cin} (the model's input channels); "
            f"pass axes= (e.g. {spatial + 'C'!r}) or convert the image"
        )
    raise InputError(
        f"input of shape {shape} has {nd} axes; this {sd}D model takes {sd} spatial axes "
        f"plus an optional channel axis ({spatial!r} or {spatial + 'C'!r})"
    )


def plan_axes(shape: tuple[int, ...], config: ModelConfig, axes: str | None = None) -> AxisPlan:
    """Validate ``axes`` (or guess them) for an input of ``shape`` and a model ``config``."""
    axes = (axes or _guess_axes(shape, config)).upper()
    if len(axes) != len(shape):
        raise InputError(f"axes {axes!r} name {len(axes)} axes but the input has shape {shape}")
    if set(axes) - _AXIS_LETTERS or len(set(axes)) != len(axes):
        raise InputError(f"axes {axes!r} must use each of T, Z, Y, X, C at most once")
    spatial = axes.replace("C", "")
    model_axes = config.axes
    # Time and depth are interchangeable third axes: a video model sees T where an MRI has Z.
    trans = {"T": "Z", "Z": "T"}
    mapped = "".join(a if a in model_axes else trans.get(a, a) for a in spatial)
    if sorted(mapped) != sorted(model_axes):
        raise InputError(
            f"input axes {axes!r} do not fit the model's spatial axes {model_axes!r} ({config.spatial_dims}D model)"
        )
    has_c = "C" in axes
    if has_c:
        c = shape[axes.index("C")]
        if c != config.image_channels:
            raise InputError(
                f"the input has {c} channels but the model expects {config.image_channels}; "
                "convert the image (e.g. RGB for H&E models, a single channel for MRI models)"
            )
    elif config.image_channels != 1:
        raise InputError(f"the input has no channel axis but the model expects {config.image_channels} channels")
    # Rename the input's axes to the model's letters, then order as (C, *model_axes).
    renamed = "".join(trans.get(a, a) if a not in model_axes and a != "C" else a for a in axes)
    order = (["C"] if has_c else []) + list(model_axes)
    perm = tuple(renamed.index(a) for a in order)
    return AxisPlan(axes, model_axes, perm, has_c)


def check_values(x: torch.Tensor) -> None:
    """Reject empty arrays, NaN/inf values and values that overflow float32 with a clear message."""
    if x.numel() == 0 or any(s == 0 for s in x.shape):
        raise InputError(f"the input is empty (shape {tuple(x.shape)})")
    if x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
        n = int((~torch.isfinite(x)).sum())
        raise InputError(f"the input contains {n} NaN or infinite values; fill or mask them first")
    check_float32_range(x)


class InputRangeWarning(OctreeNCAWarning):
    """The input's values are far from those the model was trained on: the result may be wrong."""


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _min_max(x: torch.Tensor | np.ndarray) -> tuple[float, float]:
    if isinstance(x, torch.Tensor):
        return float(x.min()), float(x.max())
    a = np.asarray(x)
    return float(a.min()), float(a.max())


def check_float32_range(x: torch.Tensor | np.ndarray) -> None:
    """Refuse values the network's float32 cannot hold (they would become inf and silently wrong labels)."""
    if isinstance(x, torch.Tensor):
        wide = x.dtype in (torch.float64, torch.int64)
    else:
        wide = np.asarray(x).dtype in (np.float64, np.int64, np.uint64)
    if wide:  # narrower dtypes fit in float32 by construction
        lo, hi = _min_max(x)
        if max(abs(lo), abs(hi)) > FLOAT32_MAX:
            raise InputError(
                f"the input holds values up to {max(abs(lo), abs(hi)):.3g}, beyond float32 "
                f"(about {FLOAT32_MAX:.3g}); rescale the image first"
            )


def input_range_of(images: list[object]) -> tuple[float, float, str]:
    """Raw value range and dtype of training images, to store in the model's config."""
    arrays = [np.asarray(im) for im in images]
    lo = min(float(a.min()) for a in arrays)
    hi = max(float(a.max()) for a in arrays)
    return lo, hi, str(np.result_type(*arrays))


def check_range(x: torch.Tensor | np.ndarray, config: ModelConfig) -> str | None:
    """Warn (``InputRangeWarning``) when raw input values are far from the training images' range.

    Only for models whose file stores that range (``config.input_range``) and whose
    normalisation is fixed (z-score and percentile adapt to each image). "Far": more than one
    training span beyond either end, or a span below 1/50 of the training span (a 0..1 float
    image into a 0..255 model). Returns the warning text, or None.
    """
    if config.input_range is None or config.normalization.mode not in ("fixed", "none"):
        return None
    lo, hi = config.input_range
    span = max(hi - lo, 1e-12)
    in_lo, in_hi = _min_max(x)
    dtype = str(x.dtype).replace("torch.", "")
    far = in_hi > hi + span or in_lo < lo - span or (in_hi - in_lo) < span / 50
    if not far:
        return None
    msg = (
        f"the input's values ({dtype}, {in_lo:.4g}..{in_hi:.4g}) are far from the training images' "
        f"({config.input_dtype or '?'}, {lo:.4g}..{hi:.4g}): the labels may be wrong; rescale the image "
        f"to the training range"
    )
    warnings.warn(InputRangeWarning(msg), stacklevel=3)
    return msg


def to_tensor(image: object) -> torch.Tensor:
    """numpy, torch, dask or array-like -> torch tensor (no copy where possible, dtype kept)."""
    if isinstance(image, torch.Tensor):
        return image.detach()
    if hasattr(image, "compute") and hasattr(image, "chunks"):  # dask
        # Local threads: a default distributed Client cannot ship file-backed arrays.
        image = image.compute(scheduler="threads")
    arr = np.asarray(image)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "uif":
        raise InputError(f"unsupported input dtype {arr.dtype}; use an integer or float array")
    if arr.dtype in (np.uint16, np.uint32, np.uint64):
        arr = arr.astype(np.float32 if arr.dtype == np.uint16 else np.float64)
    with warnings.catch_warnings():  # a read-only array (e.g. from a file) is fine: it is only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(arr))


@dataclass(frozen=True)
class NormStats:
    """Per-channel statistics of the image-dependent modes (tiles reuse the whole image's)."""

    mode: str
    offset: list[torch.Tensor]  # zscore: mean; percentile: low
    scale: list[torch.Tensor | float]  # zscore: std (or 1.0); percentile: high - low (or 1.0)


def norm_stats(x: torch.Tensor, norm: Normalization) -> NormStats | None:
    """Statistics of a float ``(C, *spatial)`` tensor for ``zscore``/``percentile`` (else None)."""
    if norm.mode in ("fixed", "none"):
        return None
    flat = x.reshape(x.shape[0], -1)
    offs: list[torch.Tensor] = []
    scales: list[torch.Tensor | float] = []
    for v in flat:
        if norm.mode == "zscore":
            if norm.threshold is not None:
                sel = v[v > norm.threshold]
                v = sel if sel.numel() > 0 else v
            mean, std = v.mean(), v.std()
            offs.append(mean)
            scales.append(std if float(std) > 0 else 1.0)
        else:
            if v.numel() > 1 << 24:  # quantile() has a size limit: estimate on a strided sample
                v = v[:: v.numel() // (1 << 24) + 1]
            lo = torch.quantile(v, norm.low / 100)
            hi = torch.quantile(v, norm.high / 100)
            offs.append(lo)
            scales.append(hi - lo if float(hi - lo) > 0 else 1.0)
    return NormStats(norm.mode, offs, scales)


def apply_stats(x: torch.Tensor, stats: NormStats) -> torch.Tensor:
    """Normalise a float ``(C, *spatial)`` tensor with given statistics."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        y = (x[i] - stats.offset[i]) / stats.scale[i]
        out[i] = y.clamp_(0, 1) if stats.mode == "percentile" else y
    return out


def normalize(x: torch.Tensor, norm: Normalization, stats: NormStats | None = None) -> torch.Tensor:
    """Normalise a ``(C, *spatial)`` tensor (any dtype) to float32 network input, on its device.

    ``stats`` overrides the image's own statistics (tiles use the whole image's).
    """
    x = x.float()
    if norm.mode == "none":
        return x
    if norm.mode == "fixed":
        mean = torch.tensor(norm.mean, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
        std = torch.tensor(norm.std, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
        return (x * norm.scale - mean) / std
    used = stats if stats is not None else norm_stats(x, norm)
    assert used is not None  # percentile/zscore modes always have statistics
    return apply_stats(x, used)


def prepare(
    image: object,
    config: ModelConfig,
    axes: str | None = None,
    device: torch.device | str = "cpu",
    cancel: Callable[[], bool] | None = None,
    progress: Callable[[dict[str, Any]], Any] | None = None,
) -> tuple[torch.Tensor, AxisPlan]:
    """Validate, permute to ``(1, C, *spatial)`` and normalise an input on ``device``.

    Models with ``input_features`` get their derived channels appended after the image's
    (``cancel`` is asked and ``progress`` told while they are computed).
    """
    from .features import derived_channels

    x = to_tensor(image)
    plan = plan_axes(tuple(x.shape), config, axes)
    check_values(x)
    check_range(x, config)
    x = x.permute(plan.permutation)
    if not plan.has_channel:
        x = x.unsqueeze(0)
    extra = derived_channels(x, config, cancel, progress)
    # Upload in the source dtype (uint8 stays 1 byte/px) and normalise on the device.
    x = normalize(x.to(device), config.normalization)
    if extra is not None:
        x = torch.cat([x, extra.to(x.device)])
    return x.unsqueeze(0).contiguous(), plan
