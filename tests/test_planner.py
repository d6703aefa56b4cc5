"""The run planner: one place decides grid, steps, whole vs tiled, and the executor carries it out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_octreenca import OctreeNCA, preset, save_model
from napari_octreenca.nca.errors import InputError
from napari_octreenca.run.execute import execute, is_out_of_memory
from napari_octreenca.run.planner import InputGeometry, RunOptions, estimate_run_bytes, plan_run


def _evolving(model: OctreeNCA, seed: int) -> OctreeNCA:
    g = torch.Generator().manual_seed(seed)
    for level in model.levels:
        level.fc1.weight.data = torch.randn(level.fc1.weight.shape, generator=g) * 0.05
    return model


def test_memory_estimate_grows_with_the_image_and_picks_tiles() -> None:
    cfg = preset("pathology")
    small = estimate_run_bytes(cfg, (512, 512))
    big = estimate_run_bytes(cfg, (4096, 4096))
    assert big > 15 * small  # 64x the cells; the fixed slab scratch dominates small images
    assert big >= 2 * cfg.update_channels * 4 * 4096 * 4096
    free = 8 * 1024**3
    whole = plan_run(cfg, InputGeometry((512, 512, 3), "YXC"), free=free)
    assert not whole.tiled and whole.text.startswith("whole image")
    tiled = plan_run(cfg, InputGeometry((40_000, 30_000, 3), "YXC"), free=free)
    assert tiled.tiled and tiled.tile is not None and "tiles" in tiled.text
    assert estimate_run_bytes(cfg, (tiled.tile, tiled.tile)) * 2 <= 0.6 * free
    assert plan_run(cfg, InputGeometry((512, 512, 3), "YXC"), RunOptions(tiling="tiled"), free=free).tiled
    assert plan_run(cfg, InputGeometry((512, 512, 3), "YXC"), RunOptions(tile=128), free=free).tile == 128
    assert not plan_run(cfg, InputGeometry((40_000, 30_000, 3), "YXC"), RunOptions(tiling="whole"), free=free).tiled


def test_steps_and_bad_options_are_checked_before_any_pixel() -> None:
    cfg = preset("pathology", steps=(3, 3, 3, 4), factors=((2, 2),) * 3)
    plan = plan_run(cfg, InputGeometry((64, 64, 3), "YXC"), free=1 << 33)
    assert plan.steps == (3, 3, 3, 4)
    assert plan_run(cfg, InputGeometry((64, 64, 3), "YXC"), RunOptions(steps=(1, 1, 1, 9)), free=1 << 33).steps[-1] == 9
    with pytest.raises(InputError, match="4 non-negative step counts"):
        plan_run(cfg, InputGeometry((64, 64, 3), "YXC"), RunOptions(steps=(1, 2)))
    with pytest.raises(InputError, match="tiling must be one of"):
        RunOptions(tiling="sometimes")
    with pytest.raises(InputError, match="runs must be >= 1"):
        RunOptions(runs=0)


def test_out_of_memory_errors_are_recognised() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(ValueError("bad axes"))


def test_fixed_spacing_model_in_tiles_equals_the_whole_run() -> None:
    """A model trained at 3 pixels per cell: the tiled plan resamples tile by tile (never the whole
    input at once), runs the NCA in tiles on the model grid and brings the logits back per tile;
    labels equal the whole-image run."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:190, :230]
    blob = (yy - 90) ** 2 + (xx - 120) ** 2 < 60**2
    image = np.clip(rng.normal(120, 30, (190, 230, 3)) + 80 * blob[..., None], 0, 255).astype(np.uint8)
    model = _evolving(OctreeNCA(preset("pathology", steps=(3, 3, 4), factors=((2, 2),) * 2, spacing=(3.0, 3.0))), 4)
    geo = InputGeometry(image.shape, "YXC", (1.0, 1.0))
    whole = plan_run(model.config, geo, RunOptions(tiling="whole", seed=2))
    tiled = plan_run(model.config, geo, RunOptions(tile=24, seed=2))
    assert tiled.tiled and tiled.grid.grid_shape == (63, 77) and "model's grid 63x77" in tiled.text
    a = execute(model, whole, image)
    b = execute(model, tiled, image)
    assert b.record["tiled"] and b.record["model_grid"] == [63, 77]
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-4)
    np.testing.assert_array_equal(b.labels, a.labels)


def test_nifti_volume_plans_a_ras_grid_from_the_affine() -> None:
    from napari_octreenca.run.resample import model_grid_shape, reorient_zyx_to_ras

    cfg = preset("radiology", steps=(2, 2, 3), factors=((2, 2, 2), (2, 2, 2)), spacing=(6.0, 6.0, 6.0))
    lsa = np.array([[0, 0, -2.0, 0], [-3.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])  # (i, j, k) -> L, S, A
    vol = np.zeros((20, 30, 40), np.uint8)
    plan = plan_run(cfg, InputGeometry(vol.shape, "ZYX", (1.0, 1.0, 1.0), lsa), free=1 << 33)
    ras, sp = reorient_zyx_to_ras(vol, lsa)
    assert plan.grid.affine is not None and plan.grid.grid_shape == model_grid_shape(ras.shape, sp, (6.0, 6.0, 6.0))
    assert "RAS+ grid" in plan.text


def test_pipeline_runs_fixed_spacing_models_tile_by_tile(tmp_path: Path) -> None:
    """``--tile`` is honoured for a model with a fixed spacing (it used to be ignored)."""
    import tifffile

    from napari_octreenca.run.pipeline import run_segment

    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (150, 170, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "in.tif", image)
    model = _evolving(OctreeNCA(preset("pathology", steps=(2, 2, 3), factors=((2, 2),) * 2, spacing=(2.0, 2.0))), 6)
    path = save_model(model, tmp_path / "m.safetensors")
    events: list[dict] = []
    out = run_segment([str(tmp_path / "in.tif")], str(tmp_path / "out.tif"), str(path), tile=32, progress=events.append)
    assert any(e.get("stage") == "written" and e["tiled"] for e in events)
    whole = run_segment([str(tmp_path / "in.tif")], str(tmp_path / "whole.tif"), str(path))
    np.testing.assert_array_equal(tifffile.imread(out[0]), tifffile.imread(whole[0]))


def test_nifti_volume_in_tiles_equals_the_whole_run() -> None:
    """RAS+ reorientation, resampling to the model's spacing and tiles together give the whole result."""
    cfg = preset("radiology", steps=(2, 2, 3), factors=((2, 2, 2), (2, 2, 2)), spacing=(2.0, 2.0, 2.0))
    model = _evolving(OctreeNCA(cfg), 8)
    lsa = np.array([[0, 0, -1.0, 0], [-1.5, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    zz, yy, xx = np.mgrid[:30, :36, :40]
    vol = (100 + 80 * (((zz - 15) / 12) ** 2 + ((yy - 18) / 14) ** 2 + ((xx - 20) / 15) ** 2 < 1)).astype(np.float32)
    geo = InputGeometry(vol.shape, "ZYX", (1.0, 1.0, 1.0), lsa)
    a = execute(model, plan_run(cfg, geo, RunOptions(tiling="whole")), vol)
    b = execute(model, plan_run(cfg, geo, RunOptions(tile=8)), vol)
    assert b.record["tiled"] and b.record["reoriented"] == "RAS+" and a.record["reoriented"] == "RAS+"
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-4)
    np.testing.assert_array_equal(b.labels, a.labels)


def test_video_time_counts_in_frames_not_seconds() -> None:
    """A video file's time scale is seconds per frame (1 / fps); a video model's spacing along T
    is frames per cell: a 25 fps clip keeps its 132 frames on the model's grid (it had become 5)."""
    cfg = preset("surgery").replace(spacing=(4.0, 4.0, 1.0))  # axes YXT, like davis_video
    grid = plan_run(cfg, InputGeometry(shape=(132, 72, 128, 3), axes="TYXC", scale=(0.04, 1.0, 1.0)), RunOptions()).grid
    assert grid.grid_shape == (132, 18, 32)
    two = preset("surgery").replace(spacing=(4.0, 4.0, 2.0))  # every other frame
    grid = plan_run(two, InputGeometry(shape=(132, 72, 128, 3), axes="TYXC", scale=(0.04, 1.0, 1.0)), RunOptions()).grid
    assert grid.grid_shape == (66, 18, 32)
