#!/usr/bin/env python
"""Train the bundled video object segmentation model on DAVIS 2016 and evaluate held-out sequences.

Data: ``../shared/data/davis2016`` (15 DAVIS 2016 sequences, 854 x 480 RGB, one binary mask per
frame). Three whole sequences are held out (``HELD_OUT``); the other twelve train. The model is
the surgery preset's architecture with one output class, running on the video as a 3D
``(Y, X, T)`` volume at a quarter of the frame resolution (``config.spacing = (4, 4, 1)``: 120 x 214
pixels per frame). Training samples random 12-frame windows; inference runs on whole sequences.

Metrics (DAVIS conventions): J = mean over frames of the mask IoU at full resolution, per held-out
sequence; temporal stability = mean IoU between consecutive predicted masks, next to the same
figure for the ground truth (a stable prediction has about the same value). Baseline: a fixed
spatial prior (the mean training mask, thresholded).

    python scripts/train_davis.py --data ../shared/data/davis2016

The frames are third-party data and never enter the repository; the weights may ship.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from _budget import print_progress, train_with_budget

from napari_octreenca.data_sources import davis_sequence
from napari_octreenca.nca.config import preset
from napari_octreenca.nca.modelfile import save_model
from napari_octreenca.run.baselines import MOTION_FACTOR, motion_video_saliency, prior_video_mask
from napari_octreenca.run.features import MOTION_CLIP
from napari_octreenca.run.resample import resample_to_model_spacing, segment_at_model_spacing
from napari_octreenca.run.training import TrainConfig, TrainPair

SPACING_YXT = (4.0, 4.0, 1.0)
SPACING_TYX = (1.0, 4.0, 4.0)
WINDOW = 12
HELD_OUT = ("blackswan", "car-roundabout", "dance-twirl")
#: A training-source sequence kept out of training: the figure that decides whether a retrained
#: model is worth shipping (the held-out sequences are only reported, never used to choose).
VALIDATION = "libby"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "davis2016"


def sequences(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "images").is_dir())


def to_model_grid(frames: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Down-sample a (T, Y, X, 3) clip and its masks exactly as inference does."""
    small = resample_to_model_spacing(frames, (1.0, 1.0, 1.0), SPACING_TYX, channel_axis=-1)
    small = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    m = resample_to_model_spacing(masks.astype(np.float32), (1.0, 1.0, 1.0), SPACING_TYX) > 0.5
    return small, m.astype(np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return 1.0 if u == 0 else float(np.logical_and(a, b).sum() / u)


def video_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """J (mean per-frame IoU) and temporal stability of a (T, Y, X) prediction."""
    j = float(np.mean([iou(p, t) for p, t in zip(pred, truth)]))
    stab_pred = float(np.mean([iou(pred[i], pred[i + 1]) for i in range(len(pred) - 1)]))
    stab_true = float(np.mean([iou(truth[i], truth[i + 1]) for i in range(len(truth) - 1)]))
    return {"J": round(j, 4), "consecutive_iou_pred": round(stab_pred, 4), "consecutive_iou_truth": round(stab_true, 4)}


#: Thresholds tried for the motion baseline, in units of a frame's median + std motion.
MOTION_THRESHOLDS = (0.75, 1.0, 1.5, 2.0, 2.5)


def motion_baseline_j(frames: np.ndarray, masks: np.ndarray, ks) -> list[float]:
    """J of the classical motion baseline (the model's motion channel above ``k``, in units of
    the frame's median + std motion) for each ``k`` in ``ks``."""
    sal = motion_video_saliency(frames, MOTION_FACTOR)  # what `--model motion-video` runs
    return [float(np.mean([iou(p, t) for p, t in zip(sal > k / MOTION_CLIP, masks > 0)])) for k in ks]


def choose_motion_threshold(root: Path, train_names) -> float:
    """The motion baseline's threshold with the best mean J on the training sequences only."""
    scores: dict[float, list[float]] = {k: [] for k in MOTION_THRESHOLDS}
    for n in train_names:
        frames, masks = davis_sequence(root, n)
        for k, j in zip(MOTION_THRESHOLDS, motion_baseline_j(frames, masks, MOTION_THRESHOLDS)):
            scores[k].append(j)
    best = max(MOTION_THRESHOLDS, key=lambda k: float(np.mean(scores[k])))
    print("motion baseline on training sequences:", {k: round(float(np.mean(v)), 4) for k, v in scores.items()})
    return best


def evaluate_held_out(
    model: torch.nn.Module, root: Path, names=HELD_OUT, train_names=None, motion_k: float | None = None
) -> dict[str, dict]:
    """Per held-out sequence: the model's J and stability, and the baselines' J (the spatial
    prior and, with ``motion_k``, the motion threshold)."""
    out: dict[str, dict] = {}
    train_masks = None
    if train_names:
        train_masks = [davis_sequence(root, n)[1][::4, ::4, ::4] for n in train_names]
    for name in names:
        frames, masks = davis_sequence(root, name)
        t0 = time.perf_counter()
        res = segment_at_model_spacing(model, frames, (1.0, 1.0, 1.0), axes="TYXC")
        m = video_metrics(res.labels == 1, masks > 0)
        m["segment_seconds"] = round(time.perf_counter() - t0, 1)
        if train_masks is not None:
            prior = prior_video_mask(train_masks, masks.shape[1:], len(masks))
            m["baseline_prior_J"] = round(float(np.mean([iou(p, t) for p, t in zip(prior, masks > 0)])), 4)
        if motion_k is not None:
            m["baseline_motion_J"] = round(motion_baseline_j(frames, masks, (motion_k,))[0], 4)
        out[name] = m
        print(name, m, flush=True)
    return out


CLIP_FRAMES = 16


def clip_metric(model: torch.nn.Module, root: Path, names=HELD_OUT) -> dict[str, object]:
    """J on the first ``CLIP_FRAMES`` frames of the shortest held-out sequence, segmented on their
    own: a figure the unit test can reproduce in seconds."""
    name = min(names, key=lambda n: len(list((root / n / "images").glob("*.jpg"))))
    frames, masks = davis_sequence(root, name)
    frames, masks = frames[:CLIP_FRAMES], masks[:CLIP_FRAMES]
    res = segment_at_model_spacing(model, frames, (1.0, 1.0, 1.0), axes="TYXC")
    m = video_metrics(res.labels == 1, masks > 0)
    return {"sequence": name, "frames": CLIP_FRAMES, **m}


def motion_metrics(per_sequence: dict[str, dict]) -> dict[str, float]:
    """The motion baseline's card figures: its mean J and its J per held-out sequence."""
    return {
        "baseline_motion_mean_J": round(float(np.mean([m["baseline_motion_J"] for m in per_sequence.values()])), 4),
        **{f"motion_J_{k}": v["baseline_motion_J"] for k, v in per_sequence.items()},
    }


def update_motion_baseline(path: str, root: Path, train_names, validation: str) -> None:
    """Add the motion baseline's figures to an existing model file's facts (held-out and validation)."""
    from napari_octreenca.nca.modelfile import load_model, read_extra

    model, extra = load_model(path), read_extra(path)
    k = choose_motion_threshold(root, train_names)
    held = extra["held_out_metrics"]["per_sequence"]
    for name in list(held) + ([validation] if validation else []):
        frames, masks = davis_sequence(root, name)
        j = round(motion_baseline_j(frames, masks, (k,))[0], 4)
        target = held[name] if name in held else extra.setdefault("validation_metrics", {}).setdefault(name, {})
        target["baseline_motion_J"] = j
        print(name, "motion baseline J", j, flush=True)
    extra["metrics"].update(motion_metrics(held))
    extra["motion_baseline_threshold"] = k
    save_model(model, path, extra=extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", default="models/davis_video.safetensors")
    ap.add_argument("--checkpoint", default="/tmp/davis_video.ckpt.safetensors")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--iterations", type=int, default=4000)
    ap.add_argument(
        "--validation",
        default=VALIDATION,
        help="training-source sequence kept out of training for the ship decision ('' trains on all twelve)",
    )
    ap.add_argument(
        "--features",
        default="motion",
        help="derived input channels ('motion': camera-compensated optical flow; '' for RGB only)",
    )
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop training after this wall time")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--update-clip", action="store_true", help="add the short-clip figure to --out's facts")
    ap.add_argument(
        "--update-motion-baseline", action="store_true", help="add the motion baseline's figures to --out's facts"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = sequences(args.data)
    features = tuple(f for f in args.features.split(",") if f)
    train_names = [n for n in names if n not in HELD_OUT and n != args.validation]
    if args.validation and args.validation not in names:
        raise SystemExit(f"validation sequence {args.validation!r} is not in {args.data}")
    if args.update_clip:
        from napari_octreenca.nca.modelfile import load_model, read_extra

        model = load_model(args.out)
        extra = read_extra(args.out)
        extra["held_out_metrics"]["clip"] = clip_metric(model, args.data)
        print(extra["held_out_metrics"]["clip"], flush=True)
        save_model(model, args.out, extra=extra)
        return
    if args.update_motion_baseline:
        update_motion_baseline(args.out, args.data, train_names, args.validation)
        return
    if args.eval_only:
        from napari_octreenca.nca.modelfile import load_model

        k = choose_motion_threshold(args.data, train_names)
        print(
            json.dumps(
                evaluate_held_out(load_model(args.out), args.data, train_names=train_names, motion_k=k), indent=1
            )
        )
        return

    t_start = time.perf_counter()
    pairs = []
    for n in train_names:
        small, m = to_model_grid(*davis_sequence(args.data, n))
        pairs.append(TrainPair(small, m, axes="TYXC"))
    print(
        f"{len(pairs)} training sequences {pairs[0].image.shape[1:3]} in {time.perf_counter() - t_start:.0f} s",
        flush=True,
    )
    h, w = pairs[0].image.shape[1:3]
    crop = (h, w, WINDOW)
    cfg = preset("surgery").replace(
        name="davis_video",
        description="Primary-object video segmentation (DAVIS-style), video as (Y, X, T); not for clinical use",
        output_channels=1,
        class_names=("object",),
        spacing=SPACING_YXT,
        train_size=crop,
        scale_coarsest_steps=False,  # whole clips are long in T; the coarsest level already spans a frame
        input_channels=3 + len(features),
        input_features=features,
    )
    tcfg = TrainConfig(
        iterations=args.iterations,
        batch_size=args.batch,
        crop=crop,
        level_patch=(48, 64, WINDOW),
        lr=1.6e-3,
        # down to a tenth of the rate by the last iteration, whatever their number
        lr_gamma=0.1 ** (1 / max(1, args.iterations)),
        seed=args.seed,
        checkpoint_every=25,
        foreground_fraction=0.5,
    )

    model, done, train_seconds = train_with_budget(
        cfg,
        pairs,
        tcfg,
        callback=print_progress,
        checkpoint=args.checkpoint,
        resume=args.resume,
        max_minutes=args.max_minutes,
    )
    del pairs
    motion_k = choose_motion_threshold(args.data, train_names)
    validation = (
        evaluate_held_out(model, args.data, names=(args.validation,), train_names=train_names, motion_k=motion_k)
        if args.validation
        else {}
    )
    metrics = evaluate_held_out(model, args.data, train_names=train_names, motion_k=motion_k)
    clip = clip_metric(model, args.data)
    wall = time.perf_counter() - t_start
    mean_j = round(float(np.mean([m["J"] for m in metrics.values()])), 4)
    extra = {
        "card": "davis_video.md",
        "task": "primary-object video segmentation (binary foreground), video as a (Y, X, T) volume",
        "not_for_clinical_use": True,
        "training_data": "DAVIS 2016 (annotations CC BY 4.0, videos under their owners' terms, research use): "
        + ", ".join(train_names)
        + (
            f"; validation (kept out of training, used only for the ship decision): {args.validation}"
            if args.validation
            else ""
        ),
        "held_out_data": "whole DAVIS 2016 sequences never seen in training: " + ", ".join(HELD_OUT),
        "preprocessing": "frames down-sampled 4x (anti-aliased) to 120 x 214, (RGB / 255 - 0.5) / 0.25"
        + (
            ", plus a motion channel (run.features: TV-L1 optical flow minus the median flow, averaged over 5 "
            "frames, blurred, in units of the frame's median + std motion)"
            if features
            else ""
        )
        + ", whole clip as one (Y, X, T) volume; logits up-sampled back linearly to 480 x 854",
        "training_sequences": train_names,
        "held_out_metrics": {"mean_J": mean_j, "per_sequence": metrics, "clip": clip},
        "validation_sequence": args.validation or None,
        "validation_metrics": validation,
        "metrics": {
            "held_out_mean_J": mean_j,
            **{f"J_{k}": v["J"] for k, v in metrics.items()},
            "baseline_prior_mean_J": round(float(np.mean([m["baseline_prior_J"] for m in metrics.values()])), 4),
            **motion_metrics(metrics),
        },
        "motion_baseline_threshold": motion_k,
        "baseline": {
            "method": "fixed spatial prior: mean training mask thresholded at the best training IoU",
            "mean_J": round(float(np.mean([m["baseline_prior_J"] for m in metrics.values()])), 4),
        },
        "seed": args.seed,
        "iterations": done,
        "train_command": f"python scripts/train_davis.py --iterations {args.iterations} --batch {args.batch} "
        f"--seed {args.seed} --threads {args.threads} --validation '{args.validation}' --features '{args.features}'",
        "train_wall_seconds": round(wall, 0),
        "train_loop_seconds": round(train_seconds, 0),
        "train_machine": f"2-core CPU dev machine, {args.threads} torch thread(s) ({platform.machine()})",
        "segment_call": "segment_at_model_spacing(model, frames_tyxc, (1.0, 1.0, 1.0), axes='TYXC')",
    }
    save_model(model, args.out, extra=extra)
    print(json.dumps(extra["held_out_metrics"]), flush=True)
    print(f"wrote {args.out}; wall {wall:.0f} s; seed {args.seed}; mean J {mean_j}", flush=True)


if __name__ == "__main__":
    main()
