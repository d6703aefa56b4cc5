"""Derived input channels (``run.features``): the motion channel of video models."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_octreenca.nca.config import ModelConfig, preset
from napari_octreenca.nca.errors import Cancelled, ConfigError, InputError
from napari_octreenca.nca.octree import OctreeNCA
from napari_octreenca.run.features import motion_saliency
from napari_octreenca.run.inference import segment
from napari_octreenca.run.inputs import prepare
from napari_octreenca.run.planner import InputGeometry, RunOptions, plan_run
from napari_octreenca.run.tiling import segment_tiled


def panning_clip(frames: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A textured background panning one pixel a frame, with a red square moving 4 pixels a
    frame across it: (T, 60, 100, 3) uint8 and the square's (T, 60, 100) mask."""
    rng = np.random.default_rng(0)
    bg = ndi.gaussian_filter((rng.random((80, 140, 3)) * 255).astype(np.uint8), (3, 3, 0))
    clip, masks = [], []
    for t in range(frames):
        f = bg[10:70, 10 + t : 110 + t].copy()
        m = np.zeros(f.shape[:2], bool)
        m[20:35, 10 + 4 * t : 25 + 4 * t] = True
        f[m] = (200, 40, 40)
        clip.append(f)
        masks.append(m)
    return np.stack(clip), np.stack(masks)


def motion_config() -> ModelConfig:
    return preset("surgery").replace(
        input_channels=4, input_features=("motion",), output_channels=1, class_names=("object",)
    )


def test_motion_marks_the_moving_object_not_the_panning_background() -> None:
    clip, masks = panning_clip()
    sal = motion_saliency(clip)
    assert sal.shape == masks.shape and sal.dtype == np.float32
    assert 0.0 <= float(sal.min()) and float(sal.max()) <= 1.0
    # The camera's pan is removed: the background is near zero, the square stands out.
    assert float(sal[masks].mean()) > 0.5
    assert float(sal[~masks].mean()) < 0.1


def test_motion_of_a_still_clip_or_one_frame() -> None:
    clip, _ = panning_clip(1)
    assert not motion_saliency(clip).any()
    still = np.repeat(clip, 4, axis=0)
    assert float(motion_saliency(still).max()) <= 1.0  # no NaN from a zero reference motion
    assert np.isfinite(motion_saliency(still)).all()


def test_motion_can_be_cancelled() -> None:
    clip, _ = panning_clip()
    with pytest.raises(Cancelled, match="motion"):
        motion_saliency(clip, cancel=lambda: True)


def test_config_round_trip_and_validation() -> None:
    cfg = motion_config()
    assert cfg.image_channels == 3
    d = cfg.to_dict()
    assert d["input_features"] == ["motion"]
    assert ModelConfig.from_dict(d) == cfg
    # Models without features keep writing the keys they always wrote.
    assert "input_features" not in preset("surgery").to_dict()
    with pytest.raises(ConfigError, match="input_features"):
        cfg.replace(input_features=("optical-flow",))
    with pytest.raises(ConfigError, match="time axis"):
        preset("radiology").replace(input_channels=2, input_features=("motion",))
    with pytest.raises(ConfigError, match="exceed"):
        cfg.replace(input_channels=1)


def test_prepare_appends_the_motion_channel_and_takes_rgb() -> None:
    clip, masks = panning_clip()
    cfg = motion_config()
    x, plan = prepare(clip, cfg, "TYXC")
    assert x.shape == (1, 4) + tuple(clip.shape[1:3]) + (clip.shape[0],)  # (1, C, Y, X, T)
    # The derived channel is the saliency in the model's (Y, X, T) order, mapped like RGB.
    sal = torch.from_numpy(motion_saliency(clip)).permute(1, 2, 0)
    assert torch.allclose(x[0, 3], (sal - 0.5) / 0.25, atol=1e-6)
    with pytest.raises(InputError, match="expects 3"):
        prepare(np.zeros(clip.shape[:3] + (4,), np.uint8), cfg, "TYXC")


def test_segment_with_a_motion_model_and_cancel_during_motion() -> None:
    clip, _ = panning_clip(6)
    model = OctreeNCA(motion_config())
    told: list[dict] = []
    res = segment(model, clip, axes="TYXC", steps=[1, 1, 1, 1, 1], prepare_callback=told.append)
    assert res.labels.shape == clip.shape[:3]
    assert [t["frame"] for t in told] == list(range(1, 7)) and {t["frames"] for t in told} == {6}
    assert {t["stage"] for t in told} == {"motion"}
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled, match="motion"):
        segment(model, clip, axes="TYXC", cancel=ev)


def test_motion_models_run_whole_only() -> None:
    clip, _ = panning_clip(4)
    cfg = motion_config()
    geom = InputGeometry(shape=clip.shape, axes="TYXC")
    assert not plan_run(cfg, geom, RunOptions(device="cpu")).tiled
    with pytest.raises(InputError, match="runs only whole"):
        plan_run(cfg, geom, RunOptions(device="cpu", tiling="tiled"))
    with pytest.raises(InputError, match="runs only whole"):
        plan_run(cfg, geom, RunOptions(device="cpu"), free=1000)  # too big for the budget
    with pytest.raises(InputError, match="runs only whole"):
        segment_tiled(OctreeNCA(cfg), clip, axes="TYXC", tile=32)


def test_motion_baseline_finds_the_moving_square() -> None:
    from napari_octreenca.run.baselines import motion_video_mask, run_baseline

    clip, masks = panning_clip()
    pred = motion_video_mask(clip, factor=1.0)
    assert pred.shape == masks.shape
    # It finds the mover, smeared along its path by the five-frame average, and not the pan.
    inter = (pred & masks).sum()
    assert inter / masks.sum() > 0.8
    assert inter / pred.sum() > 0.3
    labels = run_baseline("motion-video", clip, "TYXC")
    assert labels.dtype == np.uint8 and labels.shape == masks.shape
    with pytest.raises(InputError, match="motion-video needs a video"):
        run_baseline("motion-video", clip[0], "YXC")


def test_motion_baseline_by_name_from_the_cli(tmp_path) -> None:
    """`octreenca segment FRAMES_FOLDER out.tif --model motion-video` labels the moving square."""
    from skimage.io import imsave

    from napari_octreenca.cli import main
    from napari_octreenca.io.readers import read_image

    clip, masks = panning_clip()
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(clip):
        imsave(folder / f"{t:05d}.png", frame, check_contrast=False)
    out = tmp_path / "moving.tif"
    assert main(["segment", str(folder), str(out), "--model", "motion-video", "--quiet"]) == 0
    labels = np.asarray(read_image(out).data)
    assert labels.shape == masks.shape
    assert (labels.astype(bool) & masks).sum() / masks.sum() > 0.5


def test_cli_prints_motion_progress(tmp_path, capsys) -> None:
    """`octreenca segment FRAMES_FOLDER out.tif --model motion.safetensors`: the motion channel
    (seconds on a real clip, before the first step) reports its progress on stderr."""
    from skimage.io import imsave

    from napari_octreenca.cli import main
    from napari_octreenca.nca.modelfile import save_model

    clip, _ = panning_clip(5)
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(clip):
        imsave(folder / f"{t:05d}.png", frame, check_contrast=False)
    cfg = motion_config().replace(steps=(1, 1, 1, 1, 1))
    model = save_model(OctreeNCA(cfg), tmp_path / "motion.safetensors")
    out = tmp_path / "labels.tif"
    assert main(["segment", str(folder), str(out), "--model", str(model), "--runs", "1"]) == 0
    err = capsys.readouterr().err
    assert "computing motion: frame 5/5" in err
    assert out.exists()
