"""Peak resident memory of a bundled fixed-spacing model on a whole slide (issue: big data for the
models we ship).

Builds a ``size`` x ``size`` RGB tiled TIFF from the real H&E skin section (mirrored tiles of it,
JPEG-compressed, written tile by tile so the builder never holds the slide), then runs
``octreenca segment SLIDE OUT --model he_epidermis --tile T`` in a child process and reports its
wall time and peak resident set (``ru_maxrss`` of the child), with the machine's load.

    python benchmarks/bench_bigslide.py --size 20000 --tile 512 --work /tmp/bigslide
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def build_slide(path: Path, size: int, tile: int = 512) -> None:
    """A ``size`` x ``size`` RGB slide of mirrored copies of the skin section, tile by tile (no
    physical pixel size, like the section the model was trained on: its spacing is in pixels)."""
    import tifffile

    from napari_octreenca.data_sources import skin_sample

    img, _ = skin_sample()
    h, w = img.shape[:2]
    # One period of the mirrored pattern (continuous borders, like real tissue).
    period = np.concatenate(
        [np.concatenate([img, img[:, ::-1]], 1), np.concatenate([img[::-1], img[::-1, ::-1]], 1)], 0
    )

    def tiles():
        for y in range(0, size, tile):
            for x in range(0, size, tile):
                ys = np.arange(y, y + tile) % (2 * h)
                xs = np.arange(x, x + tile) % (2 * w)
                yield np.ascontiguousarray(period[np.ix_(ys, xs)])

    tifffile.imwrite(
        path,
        tiles(),
        shape=(size, size, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        bigtiff=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--model", default="he_epidermis")
    ap.add_argument("--work", default="/tmp/octreenca-bigslide")
    ap.add_argument("--output", default="labels.zarr", help="output name inside --work (.zarr or .tif)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"slide{args.size}.tif"
    if not slide.exists():
        t0 = time.perf_counter()
        build_slide(slide, args.size)
        print(f"built {slide} ({slide.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    out = work / args.output
    cmd = [
        sys.executable,
        "-m",
        "napari_octreenca.cli",
        "segment",
        str(slide),
        str(out),
        "--model",
        args.model,
        "--tile",
        str(args.tile),
        "--overwrite",
    ]
    load = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n")
    print(
        f"{args.model} on {args.size}x{args.size} (tile {args.tile}): exit {proc.returncode}, {seconds:.0f} s, "
        f"peak RSS {peak_kb / 1024**2:.2f} GB; load average before {load[0]:.1f}; "
        f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}"
    )
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
