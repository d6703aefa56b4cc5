"""How far to trust a segmentation: the NCA quality metric, calibrated per model. Qt-free.

An NCA updates a random subset of cells at every step (the fire mask), so runs with different
seeds give slightly different results. Where the model is sure of itself they agree; on inputs
unlike its training data (another modality, an unfamiliar field of view) they drift apart. The
published NCA quality metric measures that spread. Here, for every label ``k``:

    score_k = mean over all voxels of std_runs(sigmoid(logit_k))

i.e. the spread between the runs per voxel of the image. (The published metric divides the summed
spread by the segmented volume instead; measured here, that rewards the typical failure on a wrong
modality - labelling almost everything, confidently - with a *low* score: the H&E model on a
laparoscopy frame scored 0.016 per segmented pixel against 0.034 on held-out skin, but 0.013 per
image pixel against 0.004.) The image's score is the largest over the labels.

The spread cannot see a model that is wrong and sure of it. One such failure is common enough to
check as well: on another modality the bundled models tend to label (almost) the whole image, with
little spread (the H&E model on MRI slices: 99-100 % labelled, score 0.006-0.009). A label that
covers more than ``max_fraction`` of the image (default :data:`DEFAULT_MAX_FRACTION`) is flagged
too: none of the bundled tasks looks like that.
The opposite, a result with almost nothing labelled, is a failure where every input holds the
object (the video model on a clip where nothing moves labels a few voxels, confidently): a model's
calibration may set ``min_fraction``, and a result whose largest label covers less of the image is
flagged as well.
A model file may carry a ``quality`` entry in its provenance: the
``threshold`` above which results are flagged, measured on held-out data of good and failing
segmentations (``calibrated_on`` says which); other models use :data:`DEFAULT_THRESHOLD`.

A second, independent signal catches the confident miss that neither check sees (the brain model
on an already skull-stripped scan labels only the central core, and its runs agree): where a model's
calibration names a classical baseline (``agreement``: ``baseline``, ``label``, ``threshold``), the
runs' median labels are compared with that baseline's mask on the model's grid (Dice). A model that
disagrees strongly with a baseline known to be decent on its task is flagged. The baseline runs on
the model's grid (e.g. 3 mm for the brain model), where it costs well under a second. Only a decent
baseline helps: ``otsu-epidermis`` agrees with the H&E model's good held-out results at Dice 0.0-0.52
and with its failures at up to 0.76, so ``he_epidermis`` has no such check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Threshold for models without their own calibration (set from the bundled models' calibrations).
DEFAULT_THRESHOLD = 0.01
#: Largest share of the image one label may cover before the result is flagged as implausible.
DEFAULT_MAX_FRACTION = 0.9
#: Fewest runs the estimate needs, and how many the command line uses by default.
MIN_RUNS = 2
DEFAULT_RUNS = 3


@dataclass(frozen=True)
class Quality:
    """The quality estimate of one segmentation."""

    score: float  # the image's score (largest over the labels)
    per_label: dict[str, float]  # score per class name
    segmented: bool  # False: no voxel got any label
    coverage: dict[str, float]  # share of the image each label covers (median of the runs)
    max_fraction: float
    threshold: float
    calibrated: bool  # False: the default threshold, not one measured for this model
    runs: int
    flagged: bool
    verdict: str  # plain words for people
    #: Dice with the calibrated baseline's mask per checked label (None: no baseline check for this model).
    agreement: dict[str, float] | None = None
    agreement_threshold: float | None = None
    baseline: str | None = None  # the baseline compared with (e.g. "otsu-brain")
    #: Smallest share of the image the largest label must cover (None: no such check for this model).
    min_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Agreement:
    """How well the median labels of one class match a classical baseline's mask."""

    baseline: str
    label: str
    dice: float
    threshold: float


def label_scores(run_logits: Sequence[Any], class_names: Sequence[str]) -> dict[str, float]:
    """NCA quality score per class from the logits of every run (each ``(classes, *spatial)``)."""
    import torch

    stack = torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in run_logits])
    probs = torch.sigmoid(stack)
    spread = probs.std(dim=0)
    return {name: float(spread[k].mean()) for k, name in enumerate(class_names)}


def coverage(run_logits: Sequence[Any], class_names: Sequence[str]) -> dict[str, float]:
    """Share of the image each class covers in the runs' median labels (arg-max of logits > 0)."""
    import torch

    stack = torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in run_logits])
    best, idx = stack.median(dim=0).values.max(dim=0)
    n = best.numel()
    return {name: float(((best > 0) & (idx == k)).sum()) / n for k, name in enumerate(class_names)}


def _verdict(
    score: float,
    threshold: float,
    calibrated: bool,
    worst: str,
    segmented: bool,
    cover: dict[str, float],
    max_fraction: float,
    check: Agreement | None = None,
    min_fraction: float | None = None,
) -> tuple[bool, str]:
    if not segmented:
        return True, "nothing was segmented: the model found none of its classes here (wrong model or input?)"
    widest = max(cover, key=lambda k: cover[k])
    if cover[widest] > max_fraction:
        return True, (
            f"implausible: {widest} covers {cover[widest]:.0%} of the image; the input is probably not "
            "what the model was trained on (another modality or stain?)"
        )
    if min_fraction is not None and cover[widest] < min_fraction:
        return True, (
            f"almost nothing was segmented: {widest} covers {cover[widest]:.2%} of the image (less than "
            f"{min_fraction:.2%}, which every good result measured for this model exceeds); the model probably "
            "missed what it looks for (for a video: does anything move?)"
        )
    note = "" if calibrated else " (threshold not calibrated for this model)"
    reasons = []
    if score > threshold:
        reasons.append(f"the stochastic runs disagree ({worst}: score {score:.4f} > {threshold:.4f})")
    if check is not None and check.dice < check.threshold:
        blind = "" if reasons else ", a confident miss the spread cannot see"
        reasons.append(
            f"it disagrees with the {check.baseline} baseline ({check.label}: Dice {check.dice:.3f} < "
            f"{check.threshold:.3f}){blind}"
        )
    if reasons:
        return True, (
            "unreliable: " + "; ".join(reasons) + "; the input may be unlike the model's training data (another "
            f"modality, stain, field of view or preprocessing?) - check it or try a baseline{note}"
        )
    agrees = (
        ""
        if check is None
        else f"; it agrees with the {check.baseline} baseline (Dice {check.dice:.3f} >= {check.threshold:.3f})"
    )
    return False, f"looks reliable: the stochastic runs agree (score {score:.4f} <= {threshold:.4f}){agrees}{note}"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def baseline_agreement(
    labels: np.ndarray,
    image: np.ndarray,
    axes: str,
    spacing: Sequence[float] | None,
    class_names: Sequence[str],
    entry: dict[str, Any],
) -> Agreement:
    """Dice between the class ``entry["label"]`` of ``labels`` and the mask of baseline ``entry["baseline"]``.

    ``labels`` (0 = background, k = class k) and ``image`` (raw values, axes ``axes``) lie on the same
    grid, the model's, with voxel size ``spacing``; ``entry`` is a calibration's ``agreement`` entry.
    """
    from .baselines import run_baseline

    name, label = str(entry["baseline"]), str(entry["label"])
    mask = run_baseline(name, image, axes, spacing) > 0
    ours = np.asarray(labels) == class_names.index(label) + 1
    return Agreement(name, label, dice(ours, mask), float(entry["threshold"]))


def assess(
    run_logits: Sequence[Any],
    class_names: Sequence[str],
    calibration: dict[str, Any] | None = None,
    agreement: Agreement | None = None,
) -> Quality:
    """Quality of a segmentation from its runs' logits; ``calibration`` is a model's ``quality`` entry
    and ``agreement`` the comparison with its baseline (:func:`baseline_agreement`), where it has one."""
    if len(run_logits) < MIN_RUNS:
        raise ValueError(f"the quality estimate needs at least {MIN_RUNS} runs, got {len(run_logits)}")
    per = label_scores(run_logits, class_names)
    worst = max(per, key=lambda k: per[k])
    cover = coverage(run_logits, class_names)
    segmented = any(v > 0 for v in cover.values())
    calibrated = bool(calibration and "threshold" in calibration)
    threshold = float(calibration["threshold"]) if calibrated else DEFAULT_THRESHOLD  # type: ignore[index]
    max_fraction = float((calibration or {}).get("max_fraction", DEFAULT_MAX_FRACTION))
    floor = (calibration or {}).get("min_fraction")
    min_fraction = None if floor is None else float(floor)
    flagged, verdict = _verdict(
        per[worst], threshold, calibrated, worst, segmented, cover, max_fraction, agreement, min_fraction
    )
    return Quality(
        score=per[worst],
        per_label=per,
        segmented=segmented,
        coverage=cover,
        max_fraction=max_fraction,
        threshold=threshold,
        calibrated=calibrated,
        runs=len(run_logits),
        flagged=flagged,
        verdict=verdict,
        agreement=None if agreement is None else {agreement.label: agreement.dice},
        agreement_threshold=None if agreement is None else agreement.threshold,
        baseline=None if agreement is None else agreement.baseline,
        min_fraction=min_fraction,
    )


def model_calibration(config: Any) -> dict[str, Any] | None:
    """The ``quality`` calibration stored in a model config's provenance, if any."""
    entry = (getattr(config, "provenance", None) or {}).get("quality")
    return entry if isinstance(entry, dict) else None


def calibrate_threshold(good: Sequence[float], bad: Sequence[float]) -> float:
    """A threshold between the scores of good and of failing segmentations (geometric midpoint of
    the largest good and the smallest failing score); an error if the two groups overlap."""
    hi_good, lo_bad = max(good), min(bad)
    if not hi_good < lo_bad:
        raise ValueError(
            f"good (max {hi_good:.4f}) and failing (min {lo_bad:.4f}) scores overlap: no threshold separates them"
        )
    return float(np.sqrt(hi_good * lo_bad))


def one_sided_threshold(good: Sequence[float], bad: Sequence[float], flag_above: bool) -> tuple[float, list[int]]:
    """A threshold for one of several signals: just beyond every good value, half-way (arithmetic) to
    the nearest failing value on the flagged side. Failing values on the good side are this signal's
    blind spot (another signal must catch them). Returns the threshold and the indices of ``bad`` it
    flags; an error if no failing value lies beyond the good ones."""
    sign = 1.0 if flag_above else -1.0
    edge = max(sign * g for g in good)
    beyond = [sign * b for b in bad if sign * b > edge]
    if not beyond:
        raise ValueError(
            f"no failing value lies beyond the good ones (edge {sign * edge:.4f}): this signal separates none"
        )
    threshold = sign * (edge + min(beyond)) / 2
    return float(threshold), [i for i, b in enumerate(bad) if sign * b > sign * threshold]


__all__ = [
    "Quality",
    "assess",
    "label_scores",
    "coverage",
    "DEFAULT_MAX_FRACTION",
    "model_calibration",
    "calibrate_threshold",
    "one_sided_threshold",
    "Agreement",
    "baseline_agreement",
    "dice",
    "DEFAULT_THRESHOLD",
    "DEFAULT_RUNS",
    "MIN_RUNS",
]
