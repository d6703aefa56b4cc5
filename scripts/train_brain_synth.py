#!/usr/bin/env python
"""Train the brain-extraction model on skull-stripped and head volumes (and optionally synthetic ones).

Trains from scratch (or fine-tunes ``--start``) on a mix of

- real volumes (``--real`` randomly transformed copies each): the Colin27 T1 head scan (``ch2``) and
  its skull-stripped copy (``ch2bet``), Debian ``mricron-data``, brain mask ``ch2bet > 0``;
- optionally (``--synthetic``) volumes drawn from a label map of Colin27 (SynthStrip-style): brain
  = ``ch2bet > 0`` split into CSF / grey / white matter (multi-Otsu inside the brain) and the 116 AAL
  regions (``aal.nii.gz``), non-brain head tissue split into three intensity classes, air. Every
  volume gets a random intensity per class (T1-like ordering or fully random), a smooth bias field,
  blur with random slice thickness, noise and gamma, and a random field of view (whole head, cut at
  random planes, or brain only = skull-stripped). They made the head scans worse (see the card).

Geometry: random rotation within +-12 (real) or +-15 (synthetic) degrees per axis around RAS+
(never another axis order), scale, shift; everything on the 3 mm training grid of ``train_brain.py``.
Validation (model selection only, never trained on): the MNI152 template that nilearn bundles
(brain-only). Held out (never used for training or model selection): the ITK subject of Debian
``insighttoolkit5-examples``, both as the head scan and skull-stripped (the head scan masked by its
brain mask); ``--no-test`` leaves it out of the report (for experiments).

    python scripts/train_brain_synth.py --out models/brain_mri.safetensors --synthetic 0 --real 24 \
        --iterations 3000 --seed 1 --threads 2

Rerunnable on a CPU; seeded; ``--resume`` continues from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from _budget import print_progress, train_with_budget
from train_brain import GRID, SPACING, _rotation, augmented_copies, brain_card_facts, brain_config, brain_figures

from napari_octreenca.data_sources import ITK_DATA, MRICRON, load_nifti_zyx, mni152_path
from napari_octreenca.nca.modelfile import load_model, read_extra, save_model
from napari_octreenca.run.baselines import otsu_brain_mask
from napari_octreenca.run.resample import segment_at_model_spacing
from napari_octreenca.run.training import TrainConfig, TrainPair, hard_dice

TEST_IMG, TEST_MASK = ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz", ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz"
FINE = 2  # synthesise at 1.5 mm (GRID * 2), then average down to 3 mm: partial-volume edges
# label-map classes
AIR, CSF, GM, WM, HEAD0 = 0, 1, 2, 3, 4  # HEAD0..HEAD0+2 = non-brain head tissue; AAL regions from 10
AAL0 = 10


def label_map() -> tuple[np.ndarray, tuple[float, float, float]]:
    """Colin27 tissue label map (ZYX, RAS+, 1 mm): air, CSF/GM/WM, 3 head classes, AAL regions."""
    from scipy import ndimage
    from skimage.filters import threshold_multiotsu, threshold_otsu

    t1, sp = load_nifti_zyx(MRICRON / "ch2.nii.gz")
    brain = load_nifti_zyx(MRICRON / "ch2bet.nii.gz")[0] > 0
    aal = load_nifti_zyx(MRICRON / "aal.nii.gz")[0].astype(np.int32)
    lab = np.zeros(t1.shape, np.int16)
    t_in = threshold_multiotsu(t1[brain], classes=3)
    lab[brain] = np.digitize(t1[brain], t_in) + CSF
    gm_regions = brain & (aal > 0) & (lab != WM)
    lab[gm_regions] = AAL0 + aal[gm_regions]
    head = ndimage.binary_fill_holes(ndimage.binary_closing(t1 > 0.5 * threshold_otsu(t1), iterations=3))
    rest = head & ~brain
    t_out = threshold_multiotsu(t1[rest], classes=3)
    lab[rest] = np.digitize(t1[rest], t_out) + HEAD0
    return lab, sp


def _class_means(rng: np.random.Generator, n_labels: int) -> np.ndarray:
    """Mean intensity per label: T1-like ordering with jitter (70 %) or fully random (SynthStrip)."""
    means = rng.uniform(0, 1, n_labels)
    if rng.random() < 0.7:
        base = {AIR: 0.02, CSF: 0.25, GM: 0.5, WM: 0.75, HEAD0: 0.15, HEAD0 + 1: 0.5, HEAD0 + 2: 0.9}
        for k, v in base.items():
            means[k] = np.clip(v + rng.normal(0, 0.08), 0, 1)
        gm = means[GM]
        means[AAL0:] = np.clip(gm + rng.normal(0, 0.04, n_labels - AAL0), 0, 1)
    else:
        means[AIR] = rng.uniform(0, 0.3)
    return means


def synthetic_copy(lab: np.ndarray, sp: tuple[float, ...], rng: np.random.Generator) -> TrainPair:
    """One randomised synthetic volume and its brain mask on the 3 mm training grid."""
    from scipy import ndimage

    fine_grid = tuple(g * FINE for g in GRID)
    fine_sp = np.asarray(SPACING) / FINE
    spv = np.asarray(sp, float)
    rot = _rotation(np.deg2rad(rng.uniform(-15, 15, 3)))
    scale = rng.uniform(0.88, 1.12) * rng.uniform(0.95, 1.05, 3)
    shift = rng.uniform(-20, 20, 3)
    mat = rot @ np.diag(1 / scale)
    matrix = np.diag(1 / spv) @ mat @ np.diag(fine_sp)
    centre_in = (np.asarray(lab.shape) - 1) / 2 * spv
    centre_out = (np.asarray(fine_grid) - 1) / 2 * fine_sp
    offset = (centre_in - mat @ (centre_out + shift)) / spv
    lab_f = ndimage.affine_transform(lab, matrix, offset, output_shape=fine_grid, order=0, mode="constant", cval=AIR)
    brain = (lab_f >= CSF) & (lab_f < HEAD0) | (lab_f >= AAL0)
    fov = rng.random()
    if fov < 0.3:  # brain only: an already skull-stripped scan
        lab_f = np.where(brain, lab_f, AIR)
    elif fov < 0.6:  # cut the field of view at random planes (partial coverage of the head)
        for ax in range(3):
            n = lab_f.shape[ax]
            lo, hi = int(rng.integers(0, n // 6)), n - int(rng.integers(0, n // 6))
            sl = [slice(None)] * 3
            sl[ax] = slice(0, lo)
            lab_f[tuple(sl)] = AIR
            sl[ax] = slice(hi, n)
            lab_f[tuple(sl)] = AIR
        brain = (lab_f >= CSF) & (lab_f < HEAD0) | (lab_f >= AAL0)
    means = _class_means(rng, int(lab.max()) + 1)
    img = means[lab_f].astype(np.float32)
    img += rng.normal(0, rng.uniform(0.01, 0.06), img.shape).astype(np.float32) * (lab_f != AIR)  # texture
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, g) for g in fine_grid], indexing="ij", sparse=True)
    c = rng.normal(0, 0.2, 6)
    img *= np.exp(c[0] * zz + c[1] * yy + c[2] * xx + c[3] * zz * yy + c[4] * yy * xx + c[5] * xx * xx)
    sigma = rng.uniform(0.3, 1.2, 3)
    sigma[int(rng.integers(3))] *= rng.uniform(1, 3)  # one thick-slice axis
    img = ndimage.gaussian_filter(img, sigma)
    img = img.reshape(GRID[0], FINE, GRID[1], FINE, GRID[2], FINE).mean(axis=(1, 3, 5))
    mask = brain.reshape(GRID[0], FINE, GRID[1], FINE, GRID[2], FINE).mean(axis=(1, 3, 5)) > 0.5
    img = np.clip(img + rng.normal(0, rng.uniform(0.0, 0.04), img.shape), 0, None)
    img = img ** rng.uniform(0.7, 1.4)
    return TrainPair(img.astype(np.float32), mask.astype(np.uint8), axes="ZYX")


def held_out_volumes() -> dict[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]]:
    """The ITK subject as a head scan and skull-stripped (head scan x brain mask)."""
    img, sp = load_nifti_zyx(TEST_IMG)
    truth = load_nifti_zyx(TEST_MASK)[0] > 0
    return {"itk_head": (img, truth, sp), "itk_skull_stripped": (img * truth, truth, sp)}


def validation_volumes() -> dict[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]]:
    """Model selection only (never trained on): the MNI152 2009a template that nilearn ships, brain-only.

    An average of 152 adults, another source than Colin27 (one adult) and the ITK test subject.
    """
    img, sp = load_nifti_zyx(mni152_path())
    return {"mni152_skull_stripped": (img, img > 0, sp)}


def evaluate_held_out(
    model: torch.nn.Module, volumes: dict[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]] | None = None
) -> dict[str, float]:
    """Dice of the model and of the Otsu baseline on every volume (default: the held-out test subject)."""
    out: dict[str, float] = {}
    for name, (img, truth, sp) in (held_out_volumes() if volumes is None else volumes).items():
        res = segment_at_model_spacing(model, img, sp, axes="ZYX")
        out[f"{name}_dice"] = round(hard_dice(res.labels == 1, truth), 4)
        out[f"{name}_otsu_dice"] = round(hard_dice(otsu_brain_mask(img, sp), truth), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", default="", help="model to fine-tune (default: train from scratch)")
    ap.add_argument("--out", default="/tmp/brain_mri_synth.safetensors")
    ap.add_argument("--checkpoint", default="/tmp/brain_mri_synth.ckpt.safetensors")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--synthetic", type=int, default=40, help="synthetic volumes")
    ap.add_argument("--real", type=int, default=8, help="transformed copies each of ch2 and ch2bet")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--lr", type=float, default=1.6e-3)
    ap.add_argument("--final-lr", type=float, default=0.05, help="learning rate at the end, as a share of --lr")
    ap.add_argument("--no-test", action="store_true", help="report validation only (for model selection)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate --start and --out, do not train")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.eval_only:
        for p in filter(None, (args.start, args.out)):
            m = load_model(p)
            val = evaluate_held_out(m, validation_volumes())
            print(p, json.dumps(val if args.no_test else dict(val, **evaluate_held_out(m))), flush=True)
        return
    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    lab, sp = label_map()
    pairs = [synthetic_copy(lab, sp, rng) for _ in range(args.synthetic)]
    t1, t1_sp = load_nifti_zyx(MRICRON / "ch2.nii.gz")
    bet = load_nifti_zyx(MRICRON / "ch2bet.nii.gz")[0]
    pairs += augmented_copies(t1, bet > 0, t1_sp, args.real, args.seed)
    pairs += augmented_copies(bet, bet > 0, t1_sp, args.real, args.seed + 1)
    print(f"prepared {len(pairs)} training volumes {GRID} in {time.perf_counter() - t_start:.1f} s", flush=True)

    start = load_model(args.start) if args.start else brain_config()
    prev_extra = read_extra(args.start) if args.start else {}
    tcfg = TrainConfig(
        iterations=args.iterations,
        batch_size=args.batch,
        level_patch=(32, 32, 32),
        lr=args.lr,
        lr_gamma=args.final_lr ** (1 / max(args.iterations, 1)),  # exponential decay to final-lr x lr
        seed=args.seed,
        checkpoint_every=10,
        foreground_fraction=0.5,
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
    metrics = evaluate_held_out(model, validation_volumes())
    if not args.no_test:
        metrics.update(evaluate_held_out(model))
    wall = time.perf_counter() - t_start
    print(json.dumps(metrics), flush=True)
    command = (
        f"python scripts/train_brain_synth.py --iterations {done} --batch {args.batch} --synthetic {args.synthetic} "
        f"--real {args.real} --seed {args.seed} --threads {args.threads} --lr {args.lr} --final-lr {args.final_lr}"
        + (f" --start {args.start}" if args.start else "")
    )
    machine = f"2-core CPU dev machine, {args.threads} threads, fused CPU training step ({platform.machine()})"
    extra = dict(prev_extra) if args.start else brain_card_facts()
    for key in ("metrics", "held_out_metrics", "held_out_metrics_skull_stripped", "baseline"):
        extra.pop(key, None)  # a fine-tuned file must not carry its start's figures
    if not args.no_test:
        extra.update(brain_figures(metrics))
    extra.update(
        {
            "training_data": (
                f"{args.synthetic} synthetic volumes drawn from a Colin27 label map (ch2 + ch2bet + aal) and "
                * bool(args.synthetic)
            )
            + f"{args.real} randomly transformed copies each of the Colin27 head scan (ch2.nii.gz) and of its "
            "skull-stripped copy (ch2bet.nii.gz), brain mask ch2bet > 0; Debian mricron-data",
            "validation_data": "the ICBM 2009a MNI152 template bundled by nilearn (brain-only, mask T1 > 0), "
            "never trained on",
            "seed": args.seed,
            "iterations": done,
            "train_command": command,
            "train_wall_seconds": round(wall, 0),
            "train_loop_seconds": round(train_seconds, 0),
            "train_machine": machine,
        }
    )
    save_model(model, args.out, extra=extra)
    print(f"wrote {args.out}; wall {wall:.0f} s; held-out {metrics}", flush=True)


if __name__ == "__main__":
    main()
