"""he_epidermis under re-staining, with and without Reinhard stain normalisation of the input.

The held-out right third of ``skin.tif`` (never used for training), unchanged and re-stained with 8
fixed seeds (``train_epidermis_hed.hed_jitter``), segmented by the bundled model as it is and after
matching the input's CIELAB mean and spread over tissue pixels to the training region's
(Reinhard). Prints the Dice figures as JSON (benchmarks/RESULTS.md, "stain sensitivity"):

    python scripts/check_stain_normalisation.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from train_epidermis import split
from train_epidermis_hed import hed_jitter

from napari_octreenca.data_sources import skin_sample
from napari_octreenca.nca.modelfile import load_model
from napari_octreenca.run.resample import segment_at_model_spacing

#: CIELAB lightness below which a pixel counts as tissue (the glass is brighter).
TISSUE_L = 88.0
SEEDS = range(100, 108)


def lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread of each CIELAB channel over the tissue pixels of an RGB uint8 image."""
    from skimage.color import rgb2lab

    lab = rgb2lab(rgb)
    tissue = lab[lab[..., 0] < TISSUE_L]
    return tissue.mean(0), tissue.std(0)


def reinhard(rgb: np.ndarray, ref: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``rgb`` with its tissue pixels' CIELAB statistics matched to ``ref`` (background kept)."""
    from skimage.color import lab2rgb, rgb2lab

    lab = rgb2lab(rgb)
    mask = lab[..., 0] < TISSUE_L
    mean, std = lab_stats(rgb)
    out = np.where(mask[..., None], (lab - mean) / np.maximum(std, 1e-6) * ref[1] + ref[0], lab)
    return np.clip(np.rint(lab2rgb(out) * 255), 0, 255).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return round(float(2 * (a & b).sum() / max(1, a.sum() + b.sum())), 4)


def main() -> None:
    img, mask = skin_sample()
    (train_img, _), (test_img, test_mask) = split(img, mask)
    ref = lab_stats(train_img)
    model = load_model(Path(__file__).resolve().parents[1] / "models" / "he_epidermis.safetensors")

    def score(x: np.ndarray) -> float:
        return dice(segment_at_model_spacing(model, x, (1.0, 1.0), axes="YXC", runs=1).labels == 1, test_mask)

    restained = [hed_jitter(test_img, np.random.default_rng(s)) for s in SEEDS]
    plain = [score(x) for x in restained]
    normed = [score(reinhard(x, ref)) for x in restained]
    print(
        json.dumps(
            {
                "unchanged": score(test_img),
                "unchanged_normalised": score(reinhard(test_img, ref)),
                "restained": plain,
                "restained_normalised": normed,
                "restained_mean": round(float(np.mean(plain)), 4),
                "restained_normalised_mean": round(float(np.mean(normed)), 4),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
