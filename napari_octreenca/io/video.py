"""Videos (.mp4, .avi, ...) as lazy ``(T, H, W, 3)`` uint8 dask arrays via PyAV, fps kept.

Each dask chunk is a run of frames decoded on demand: seek to the keyframe before the chunk's
first frame, decode forward and keep the frames whose presentation time falls in the chunk.
Frame indices come from timestamps (``round((pts - start) * time_base * fps)``), so seeking does
not shift frames.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from ..nca.errors import InputError
from .image import ImageData

#: Frames per dask chunk (about 37 MB of 854x480 RGB).
FRAMES_PER_CHUNK = 32


def _open(path: str) -> Any:
    try:
        import av
    except ImportError:
        raise InputError("reading videos needs PyAV: pip install av") from None
    try:
        return av.open(path)
    except Exception as exc:  # av.error.InvalidDataError and friends
        raise InputError(f"cannot open video {path}: {exc}") from exc


def _probe(path: str) -> tuple[int, int, int, Fraction, Fraction, int]:
    """(frames, height, width, fps, time_base, start_pts); counts packets when the header has no count."""
    with _open(path) as c:
        if not c.streams.video:
            raise InputError(f"{path} has no video stream")
        s = c.streams.video[0]
        fps = s.average_rate or s.guessed_rate or Fraction(25)
        tb = s.time_base
        start = s.start_time if s.start_time is not None else 0
        h, w = s.codec_context.height, s.codec_context.width
        n = s.frames
        if not n:  # header without a frame count (some AVI/MKV): count the packets
            n = sum(1 for pkt in c.demux(s) if pkt.size)
    return int(n), int(h), int(w), Fraction(fps), Fraction(tb), int(start)


def _decode(path: str, a: int, b: int, fps: Fraction, tb: Fraction, start: int, h: int, w: int) -> np.ndarray:
    """Frames ``[a, b)`` as uint8 ``(b - a, h, w, 3)``."""
    out = np.zeros((b - a, h, w, 3), np.uint8)
    got = np.zeros(b - a, bool)
    with _open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        if a > 0:
            target = start + int(Fraction(a) / fps / tb)
            c.seek(target, stream=s, backward=True, any_frame=False)
        for frame in c.decode(s):
            pts = frame.pts if frame.pts is not None else frame.dts
            i = int(round(float((pts - start) * tb * fps))) if pts is not None else a + int(got.sum())
            if i >= b:
                break
            if i >= a:
                out[i - a] = frame.to_ndarray(format="rgb24")
                got[i - a] = True
    if not got.all():
        missing = int((~got).sum())
        raise InputError(f"{path}: {missing} of frames {a}..{b - 1} could not be decoded (truncated file?)")
    return out


def read_video(path: Path | str) -> ImageData:
    """Lazy ``TYXC`` uint8 video; ``metadata['fps']`` is the frame rate, time scale ``1/fps`` s."""
    import dask
    import dask.array as da

    p = str(path)
    n, h, w, fps, tb, start = _probe(p)
    if n == 0:
        raise InputError(f"{path} has no frames")
    chunks = []
    for a in range(0, n, FRAMES_PER_CHUNK):
        b = min(n, a + FRAMES_PER_CHUNK)
        d = dask.delayed(_decode, pure=True)(p, a, b, fps, tb, start, h, w)
        chunks.append(da.from_delayed(d, (b - a, h, w, 3), np.uint8))
    data = da.concatenate(chunks, axis=0)
    meta = {"path": p, "fps": float(fps), "frames": n, "time_base": str(tb)}
    return ImageData(data, [data], "TYXC", (1.0 / float(fps), 1.0, 1.0), (0.0, 0.0, 0.0), None, meta, "video")


def write_video(path: Path | str, frames: np.ndarray, fps: float, *, lossless: bool = True) -> Path:
    """Encode ``(T, H, W, 3)`` uint8 frames (H264 RGB lossless in .mp4/.mkv, FFV1 in .avi)."""
    import av

    p = Path(path)
    frames = np.asarray(frames, np.uint8)
    opts: dict[str, str] = {}
    codec, pix = "mpeg4", "yuv420p"
    if lossless:
        codec, opts, pix = (
            ("ffv1", {}, "bgr0")
            if p.suffix.lower() == ".avi"
            else ("libx264rgb", {"qp": "0", "preset": "ultrafast"}, "rgb24")
        )
    with av.open(str(p), "w") as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=opts)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return p
