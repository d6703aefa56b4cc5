"""Simple classical baselines that give the bundled models' held-out scores a meaning.

- :func:`otsu_brain_mask`: Otsu threshold of a T1 head MRI, erosion to cut the brain from the
  scalp, largest component, dilation back, hole filling (spacing-aware, in mm).
- :func:`otsu_epidermis_mask`: Otsu threshold of the haematoxylin stain of an H&E image (the
  epidermis is the densely nucleated, purple layer), closing/opening, largest component.
- :func:`prior_video_mask`: a fixed spatial prior (the mean training mask, thresholded): what a
  video model gets for free by predicting "the object is where objects usually are".
- :func:`motion_video_mask`: the classical unsupervised cue: what moves against the camera
  (``run.features.motion_saliency`` above a threshold chosen on the training sequences).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Baselines that ``octreenca segment --model NAME`` and :func:`run_baseline` run by name.
BASELINE_MODELS: dict[str, dict[str, Any]] = {
    "otsu-brain": {"class": "brain", "input": "3D T1 head MRI (Z, Y, X), any spacing"},
    "otsu-epidermis": {"class": "epidermis", "input": "2D H&E RGB image (Y, X, 3)"},
    "motion-video": {"class": "object", "input": "video (T, Y, X, 3) or (T, Y, X)", "video": True},
}

#: ``motion_video_mask``'s threshold in units of a frame's median + std motion: the best mean J
#: on the 11 DAVIS 2016 training sequences of ``davis_video`` (``scripts/train_davis.py``
#: prints the choice; no held-out sequence took part).
MOTION_THRESHOLD = 1.5
#: Frames are down-sampled by this factor (as ``davis_video`` does) before the flow is computed.
MOTION_FACTOR = 4.0


def _ellipsoid(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    r = [max(1, int(round(radius_mm / s))) for s in spacing]
    grids = np.ogrid[tuple(slice(-n, n + 1) for n in r)]
    return np.asarray(sum((g * s / radius_mm) ** 2 for g, s in zip(grids, spacing)) <= 1.0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n == 0:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(sizes.argmax())


def otsu_brain_mask(image: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), erode_mm: float = 6.0) -> np.ndarray:
    """Brain mask of a 3D T1 head MRI by Otsu thresholding and morphology (bool, same shape)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    img = ndimage.gaussian_filter(np.asarray(image, np.float32), [1.0 / s for s in spacing])
    fg = img > threshold_otsu(img)
    ball = _ellipsoid(erode_mm, spacing)
    core = _largest_component(ndimage.binary_erosion(fg, ball))
    brain = ndimage.binary_dilation(core, ball) & fg
    brain = ndimage.binary_closing(brain, _ellipsoid(3.0, spacing))
    return ndimage.binary_fill_holes(brain)


def otsu_epidermis_mask(rgb: np.ndarray, close_px: int = 7) -> np.ndarray:
    """Epidermis mask of an H&E ``(Y, X, 3)`` image from the haematoxylin channel (bool)."""
    from scipy import ndimage
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk

    h = ndimage.gaussian_filter(rgb2hed(np.asarray(rgb)[..., :3])[..., 0], 2.0)
    mask = h > threshold_otsu(h)
    mask = ndimage.binary_closing(mask, disk(close_px))
    mask = ndimage.binary_opening(mask, disk(2))
    # (small specks vanish with the largest-component step below)
    return ndimage.binary_fill_holes(_largest_component(mask))


def prior_video_mask(train_masks: Sequence[np.ndarray], shape: tuple[int, int], frames: int) -> np.ndarray:
    """A ``(T, Y, X)`` mask: the mean of the training masks (resized to ``shape``) above the
    threshold that maximises their own mean IoU, repeated over ``frames``."""
    from skimage.transform import resize

    mean = np.mean([resize(np.asarray(m, np.float32).mean(0), shape, order=1) for m in train_masks], axis=0)

    def iou(pred: np.ndarray, m: np.ndarray) -> float:
        u = np.logical_or(pred, m).sum()
        return 1.0 if u == 0 else float(np.logical_and(pred, m).sum() / u)

    small = [resize(np.asarray(m, np.float32), (m.shape[0],) + shape, order=0) > 0.5 for m in train_masks]
    best = max(np.linspace(0.05, 0.6, 12), key=lambda t: np.mean([iou(mean[None] > t, m) for m in small]))
    return np.repeat((mean > best)[None], frames, axis=0)


def motion_video_saliency(frames: np.ndarray, factor: float = MOTION_FACTOR) -> np.ndarray:
    """``run.features.motion_saliency`` of a ``(T, Y, X, C)`` or ``(T, Y, X)`` clip computed at
    1/``factor`` of the frame size (anti-aliased), brought back to the frame size: float ``(T, Y, X)``."""
    from skimage.transform import resize

    from .features import motion_saliency

    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[..., None]
    t, y, x, c = arr.shape
    small_shape = (t, max(1, round(y / factor)), max(1, round(x / factor)), c)
    small = resize(arr.astype(np.float32), small_shape, order=1, anti_aliasing=factor > 1, preserve_range=True)
    return np.asarray(resize(motion_saliency(small), (t, y, x), order=1))


def motion_video_mask(
    frames: np.ndarray, threshold: float = MOTION_THRESHOLD, factor: float = MOTION_FACTOR
) -> np.ndarray:
    """Moving-object mask of a ``(T, Y, X, C)`` or ``(T, Y, X)`` clip (bool ``(T, Y, X)``): the
    camera-compensated motion (:func:`motion_video_saliency`) above ``threshold`` times the
    frame's median + std motion."""
    from .features import MOTION_CLIP

    return motion_video_saliency(frames, factor) > threshold / MOTION_CLIP


def run_baseline(name: str, image: Any, axes: str, scale: Sequence[float] | None = None) -> np.ndarray:
    """Labels (uint8, 1 = the baseline's class) of ``image`` with the baseline ``name``.

    ``axes`` names the image's axes (``ZYX`` for MRI, ``YXC`` for RGB); ``scale`` is the voxel
    size per spatial axis (mm for MRI; used by ``otsu-brain``'s morphology).
    """
    from ..nca.errors import InputError

    if name not in BASELINE_MODELS:
        raise InputError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINE_MODELS)}")
    arr = np.asarray(image)
    axes = axes.upper()
    if name == "otsu-brain":
        if axes != "ZYX" or arr.ndim != 3:
            raise InputError(f"otsu-brain needs a 3D (Z, Y, X) volume, got axes {axes!r}")
        spacing = tuple(scale) if scale is not None else (1.0, 1.0, 1.0)
        return otsu_brain_mask(arr, spacing).astype(np.uint8)
    if name == "motion-video":
        if axes not in ("TYXC", "TYX") or arr.ndim != len(axes):
            raise InputError(f"motion-video needs a video (T, Y, X, C) or (T, Y, X), got axes {axes!r}")
        return motion_video_mask(arr).astype(np.uint8)
    if axes != "YXC" or arr.ndim != 3 or arr.shape[-1] < 3:
        raise InputError(f"otsu-epidermis needs an RGB (Y, X, 3) image, got axes {axes!r} and shape {arr.shape}")
    return otsu_epidermis_mask(arr).astype(np.uint8)


@dataclass(frozen=True)
class BaselineAdvice:
    """A model's held-out comparison with a classical baseline that did better on some inputs."""

    baseline: str  # the name it runs by (``BASELINE_MODELS``), e.g. "otsu-brain"
    label: str  # in plain words, e.g. "the Otsu baseline"
    metric: str  # e.g. "Dice"
    data: str  # what it was measured on, e.g. "held-out scans"
    inputs: tuple[tuple[str, float, float], ...]  # (input, model score, baseline score), headline first

    @property
    def better(self) -> tuple[tuple[str, float, float], ...]:
        """The inputs on which the baseline scored higher than the model."""
        return tuple(i for i in self.inputs if i[2] > i[1])

    @property
    def everywhere(self) -> bool:
        """The baseline did better on every compared input."""
        return len(self.better) == len(self.inputs)

    @property
    def sentence(self) -> str:
        """E.g. "On held-out scans the Otsu baseline did better (Dice 0.95 vs 0.88)", or where it
        did better on some inputs only, "On 1 of 2 held-out scans the Otsu baseline did better ..."
        (short enough for the dock; :meth:`cli_hint` and :attr:`details` name the inputs)."""
        wins = self.better
        _, model, base = wins[0]
        where = self.data if self.everywhere else f"{len(wins)} of {len(self.inputs)} {self.data}"
        return f"On {where} {self.label} did better ({self.metric} {base:.2f} vs {model:.2f})"

    @property
    def details(self) -> str:
        """Every compared input, e.g. for a tooltip."""
        return "; ".join(f"{name}: {self.metric} {b:.3f} vs {m:.3f}" for name, m, b in self.inputs)

    def cli_hint(self) -> str:
        """The command line's one-line hint (naming the inputs where the baseline won on some only)."""
        which = "" if self.everywhere else f" ({', '.join(n for n, _, _ in self.better)})"
        return f"{self.sentence}{which}: use --model {self.baseline}"


def baseline_advice(extra: Mapping[str, Any]) -> BaselineAdvice | None:
    """The advice stored in a model file's ``extra`` JSON (key ``baseline_comparison``, written by
    ``scripts/model_card.py``), or None: no comparison, a baseline that cannot run by name, or
    a model that scored at least as well as the baseline on every held-out input. A baseline that
    did better on some inputs only is still advised, naming those inputs (a user with such an
    input should know)."""
    comp = extra.get("baseline_comparison")
    if not comp or comp.get("baseline") not in BASELINE_MODELS or not comp.get("inputs"):
        return None
    inputs = tuple((str(c["input"]), float(c["model"]), float(c["baseline"])) for c in comp["inputs"])
    if not any(base > model for _, model, base in inputs):
        return None
    label = str(comp.get("baseline_label", comp["baseline"]))
    data = str(comp.get("data", "held-out data"))
    return BaselineAdvice(str(comp["baseline"]), label, str(comp["metric"]), data, inputs)


def model_baseline_advice(model: str | Path) -> BaselineAdvice | None:
    """:func:`baseline_advice` of a bundled model name or model file; None for anything else
    (a baseline's own name, a preset, a missing or unreadable file: the run reports those)."""
    from ..nca.errors import ModelFileError
    from ..nca.modelfile import read_extra
    from ..nca.registry import resolve_model_path

    if str(model) in BASELINE_MODELS:
        return None
    try:
        return baseline_advice(read_extra(resolve_model_path(model)))
    except (ModelFileError, OSError, ValueError):
        return None


__all__ = [
    "BASELINE_MODELS",
    "BaselineAdvice",
    "baseline_advice",
    "model_baseline_advice",
    "run_baseline",
    "otsu_brain_mask",
    "otsu_epidermis_mask",
    "prior_video_mask",
    "motion_video_mask",
    "motion_video_saliency",
    "MOTION_THRESHOLD",
]
