"""Video reading: a video encoded in the test from real DAVIS frames, read back lazily."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_octreenca.io import video
from napari_octreenca.io.readers import read_image
from napari_octreenca.nca.errors import InputError

pytest.importorskip("av", reason="PyAV is not installed (pip install av)")


@pytest.fixture(scope="module")
def davis_frames() -> np.ndarray:
    from helpers import SHARED_DATA
    from PIL import Image

    folder = SHARED_DATA / "davis2016" / "blackswan" / "images"
    files = sorted(folder.glob("*.jpg"))[:20]
    if not files:
        pytest.skip(f"DAVIS frames absent at {folder}")
    # Half size keeps the encoder fast; real content keeps the codec honest.
    return np.stack([np.asarray(Image.open(f).convert("RGB").reduce(2)) for f in files])


@pytest.mark.parametrize("suffix", [".mp4", ".avi"])
def test_lossless_video_roundtrip_lazy(davis_frames: np.ndarray, tmp_path: Path, suffix: str, monkeypatch) -> None:
    monkeypatch.setattr(video, "FRAMES_PER_CHUNK", 6)  # several chunks: exercises seeking
    path = video.write_video(tmp_path / f"clip{suffix}", davis_frames, fps=24, lossless=True)
    im = read_image(path)
    assert im.kind == "video" and im.axes == "TYXC"
    assert im.shape == davis_frames.shape == (20, 240, 427, 3)
    assert im.metadata["fps"] == pytest.approx(24.0) and im.scale[0] == pytest.approx(1 / 24)
    assert len(im.data.chunks[0]) == 4  # lazy, one dask chunk per 6 frames
    np.testing.assert_array_equal(np.asarray(im.data[13:15]), davis_frames[13:15])  # a chunk in the middle
    np.testing.assert_array_equal(np.asarray(im.data), davis_frames)


def test_lossy_video_geometry(davis_frames: np.ndarray, tmp_path: Path) -> None:
    path = video.write_video(tmp_path / "clip_lossy.avi", davis_frames[:8], fps=30, lossless=False)
    im = read_image(path)
    assert im.shape == (8, 240, 427, 3) and im.metadata["fps"] == pytest.approx(30.0)
    arr = np.asarray(im.data)
    assert np.abs(arr.astype(int) - davis_frames[:8]).mean() < 12  # close, not equal (MPEG-4)


def test_broken_video_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match="bad.mp4"):
        read_image(bad)
