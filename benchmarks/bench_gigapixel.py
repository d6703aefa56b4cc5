"""Gigapixel benchmark: segment a 1.25-gigapixel pyramidal slide out of core, kill it midway, resume.

1. Generates (once) a realistic synthetic H&E-like slide of the published PESO size
   (23742 x 52644 RGB by default) as a pyramidal, JPEG-tiled OME-TIFF (levels 4x apart like SVS),
   strip by strip: never more than one strip of pixels in memory.
2. Runs ``run_segment`` (the ``octreenca segment`` code path) with the pathology preset and
   RANDOM weights (compute cost does not depend on the weights), ``backend="auto"``, tiled, output
   an OME-Zarr labels pyramid, in a child process whose peak RSS (VmHWM) is sampled.
3. With ``--kill-at F`` the child is SIGKILLed after a fraction F of the output tiles and rerun;
   the rerun must compute only the remaining tiles (counted from its progress events).

Run in the background on a shared machine:
    nohup python benchmarks/bench_gigapixel.py --work /tmp/gigapixel --kill-at 0.5 > /tmp/gigapixel.log 2>&1 &
Prints one JSON summary line at the end (``RESULT {...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

PESO = (23742, 52644)


# -- synthetic slide ------------------------------------------------------------------------------
def _smooth_noise(shape: tuple[int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)


def _bilinear_rows(field: np.ndarray, y0: int, y1: int, width: int, step: int) -> np.ndarray:
    """Rows [y0, y1) of ``field`` (sampled every ``step`` px) upsampled bilinearly to full width."""
    ys = (np.arange(y0, y1) + 0.5) / step - 0.5
    xs = (np.arange(width) + 0.5) / step - 0.5
    ys = np.clip(ys, 0, field.shape[0] - 1)
    xs = np.clip(xs, 0, field.shape[1] - 1)
    iy = np.minimum(ys.astype(np.int64), field.shape[0] - 2)
    ix = np.minimum(xs.astype(np.int64), field.shape[1] - 2)
    fy = (ys - iy).astype(np.float32)[:, None]
    fx = (xs - ix).astype(np.float32)[None, :]
    a = field[iy][:, ix]
    b = field[iy][:, ix + 1]
    c = field[iy + 1][:, ix]
    d = field[iy + 1][:, ix + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


class SlideRenderer:
    """H&E-like texture: white glass, pink stroma (eosin) in tissue islands, purple nuclei
    (haematoxylin) clustered in glands, pixel noise; deterministic from the seed."""

    def __init__(self, height: int, width: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.h, self.w = height, width
        self.tissue = _smooth_noise((-(-height // 256) + 2, -(-width // 256) + 2), rng, 2.0)
        self.tissue /= self.tissue.std() + 1e-6
        self.glands = _smooth_noise((-(-height // 64) + 2, -(-width // 64) + 2), rng, 1.5)
        self.glands /= self.glands.std() + 1e-6
        self.nuclei = rng.standard_normal((-(-height // 6) + 2, -(-width // 6) + 2)).astype(np.float16)
        self.seed = seed

    def rows(self, y0: int, y1: int) -> np.ndarray:
        w = self.w
        tissue = _bilinear_rows(self.tissue, y0, y1, w, 256) > -0.2
        glands = _bilinear_rows(self.glands, y0, y1, w, 64)
        nuc = _bilinear_rows(self.nuclei.astype(np.float32), y0, y1, w, 6) + 0.6 * glands
        rng = np.random.default_rng((self.seed, y0))
        noise = rng.integers(-10, 11, (y1 - y0, w, 1), dtype=np.int16)
        out = np.empty((y1 - y0, w, 3), np.int16)
        out[:] = (238, 236, 240)  # glass
        stroma = np.array([226, 150, 190], np.int16)
        lumen = np.array([245, 225, 235], np.int16)
        nucleus = np.array([95, 62, 150], np.int16)
        out[tissue] = stroma
        out[tissue & (glands > 1.2)] = lumen
        out[tissue & (nuc > 1.3)] = nucleus
        out += noise
        return np.clip(out, 0, 255).astype(np.uint8)


def generate_slide(path: Path, height: int, width: int, seed: int = 0, strip: int = 512) -> Path:
    """Pyramidal JPEG-tiled OME-TIFF (levels 1, 1/4, 1/16), written strip by strip, atomically."""
    import tifffile

    if path.exists():
        return path
    r = SlideRenderer(height, width, seed)
    lv1 = np.zeros((-(-height // 4), -(-width // 4), 3), np.uint8)
    tile = 512

    def tiles():
        for y0 in range(0, height, strip):
            y1 = min(height, y0 + strip)
            rows = r.rows(y0, y1)
            lv1[y0 // 4 : -(-y1 // 4)] = rows[::4, ::4]
            for x0 in range(0, width, tile):
                t = np.zeros((tile, tile, 3), np.uint8)
                block = rows[:, x0 : x0 + tile]
                t[: block.shape[0], : block.shape[1]] = block
                yield t

    tmp = path.with_name(path.name + ".part.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        meta = {"axes": "YXS", "PhysicalSizeX": 0.48, "PhysicalSizeY": 0.48}
        tif.write(
            tiles(),
            shape=(height, width, 3),
            dtype=np.uint8,
            tile=(tile, tile),
            subifds=2,
            photometric="rgb",
            compression="jpeg",
            compressionargs={"level": 90},
            metadata=meta,
        )
        tif.write(
            lv1, subfiletype=1, tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": 90}
        )
        tif.write(
            lv1[::4, ::4],
            subfiletype=1,
            tile=(tile, tile),
            photometric="rgb",
            compression="jpeg",
            compressionargs={"level": 90},
        )
    os.replace(tmp, path)
    return path


def make_model(path: Path, seed: int = 0) -> Path:
    """Pathology preset with random weights (fc1 random too, so the output is not all zero)."""
    import torch

    from napari_octreenca import new_model, save_model

    if path.exists():
        return path
    model = new_model("pathology", seed=seed)
    with torch.no_grad():
        for level in model.levels:
            level.fc1.weight.normal_(0.0, 0.02)
    save_model(model, path)
    return path


# -- the run in a child process ---------------------------------------------------------------------
CHILD = """
import json, sys, time
from napari_octreenca.run.pipeline import run_segment
t0 = time.time()
def progress(ev):
    if ev.get("stage") in ("output", "state", "image", "input", "written"):
        ev = {k: v for k, v in ev.items() if isinstance(v, (int, float, str, bool, type(None)))}
        ev["t"] = round(time.time() - t0, 2)
        print("EV " + json.dumps(ev), flush=True)
run_segment([sys.argv[1]], sys.argv[2], sys.argv[3], backend=sys.argv[5], tile=int(sys.argv[4]), progress=progress)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("DONE " + json.dumps({"seconds": time.time() - t0, "vmhwm_kb": int(hwm)}), flush=True)
"""


def _hwm_kb(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_child(slide: Path, out: Path, model: Path, tile: int, backend: str, kill_after: int | None) -> dict:
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(slide), str(out), str(model), str(tile), backend],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    peak = [0]

    def watch() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _hwm_kb(proc.pid))
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()
    t0 = time.time()
    stats = {"computed": 0, "skipped": 0, "output_tiles": 0, "killed": False}
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("EV "):
            ev = json.loads(line[3:])
            if "computed" in ev:
                stats["computed" if ev["computed"] else "skipped"] += 1
            if ev.get("stage") == "output":
                stats["output_tiles"] = ev["tiles"]
                if ev["computed"]:
                    stats["output_computed"] = stats.get("output_computed", 0) + 1
                print(f"[{ev['t']:8.1f}s] output tile {ev['tile']}/{ev['tiles']}", flush=True)
                if kill_after is not None and stats.get("output_computed", 0) >= kill_after:
                    peak[0] = max(peak[0], _hwm_kb(proc.pid))
                    proc.send_signal(signal.SIGKILL)
                    stats["killed"] = True
                    break
            elif ev.get("stage") in ("state", "image") and ev["tile"] == ev["tiles"]:
                print(f"[{ev['t']:8.1f}s] {ev['stage']} level {ev['level']} done ({ev['tiles']} tiles)", flush=True)
        elif line.startswith("DONE "):
            done = json.loads(line[5:])
            peak[0] = max(peak[0], done["vmhwm_kb"])
    proc.wait()
    stats.update(seconds=time.time() - t0, returncode=proc.returncode, peak_rss_gb=peak[0] / 2**20)
    return stats


def checksum(out: Path) -> str:
    """SHA-256 over the level-0 labels, chunk by chunk."""
    import hashlib

    import zarr

    arr = zarr.open_array(str(out / "labels" / "segmentation" / "0"), mode="r")
    h = hashlib.sha256()
    step = 2048
    for y in range(0, arr.shape[0], step):
        h.update(np.ascontiguousarray(arr[y : y + step]).tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/octreenca-gigapixel"))
    ap.add_argument("--height", type=int, default=PESO[0])
    ap.add_argument("--width", type=int, default=PESO[1])
    ap.add_argument("--tile", type=int, default=2048)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--kill-at", type=float, default=None, help="kill after this fraction of output tiles, then resume")
    ap.add_argument("--reference", action="store_true", help="also run uninterrupted and compare checksums")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t = time.time()
    slide = generate_slide(args.work / f"slide_{args.height}x{args.width}.ome.tif", args.height, args.width)
    gen_s = time.time() - t
    model = make_model(args.work / "pathology_random.safetensors")
    out = args.work / f"labels_{args.height}x{args.width}.zarr"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    from napari_octreenca.run.pipeline import find_work_folders

    for work in find_work_folders(out):  # <out>.octreenca-work-<run key>
        shutil.rmtree(work, ignore_errors=True)
    n_out = -(-args.height // args.tile) * -(-args.width // args.tile)
    parts = []
    kill_after = None if args.kill_at is None else max(1, int(n_out * args.kill_at))
    parts.append(run_child(slide, out, model, args.tile, args.backend, kill_after))
    if parts[-1]["killed"]:
        parts.append(run_child(slide, out, model, args.tile, args.backend, None))
    result = {
        "size": [args.height, args.width],
        "megapixels": args.height * args.width / 1e6,
        "tile": args.tile,
        "generate_seconds": round(gen_s, 1),
        "parts": parts,
        "seconds": round(sum(p["seconds"] for p in parts), 1),
        "peak_rss_gb": round(max(p["peak_rss_gb"] for p in parts), 3),
        "output_tiles": n_out,
        "checksum": checksum(out) if parts[-1]["returncode"] == 0 else None,
    }
    result["mp_per_s"] = round(result["megapixels"] / result["seconds"], 3)
    if len(parts) == 2:
        result["resume_output_tiles_computed"] = parts[1].get("output_computed", 0)
        result["resume_output_tiles_skipped"] = parts[1]["skipped"]
    if args.reference:
        ref = args.work / f"reference_{args.height}x{args.width}.zarr"
        shutil.rmtree(ref, ignore_errors=True)
        rp = run_child(slide, ref, model, args.tile, args.backend, None)
        result["reference_seconds"] = round(rp["seconds"], 1)
        result["reference_checksum"] = checksum(ref)
        result["identical_to_uninterrupted"] = result["reference_checksum"] == result["checksum"]
    import torch

    from napari_octreenca.backends import get_backend

    result["backend"] = get_backend(args.backend).name
    result["torch_threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
