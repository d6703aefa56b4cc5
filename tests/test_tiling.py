"""Exact tiled inference: tiled output == whole-image output (bitwise on CPU float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_octreenca import OctreeNCA, preset, segment
from napari_octreenca.run import tiling
from napari_octreenca.run.tiling import Box, segment_tiled, tile_grid


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Bitwise equality needs the same float ops: torch's multi-threaded convolutions split their
    sums by thread count and block shape (whole runs at 1 and 2 threads differ by ~1e-7 of the
    logit scale too), so these tests run single-threaded; the 2-thread case is checked to 1e-6."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_model(cfg, seed: int = 0) -> OctreeNCA:
    """A model with every weight random (the default fc1 = 0 would make every output zero)."""
    torch.manual_seed(seed)
    model = OctreeNCA(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def model2d() -> OctreeNCA:
    return random_model(preset("pathology", steps=(4, 4, 4, 6), factors=((2, 2),) * 3))


@pytest.fixture(scope="module")
def image2d() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (77, 101, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def whole2d(model2d, image2d):
    return segment(model2d, image2d, backend="torch")


def test_tile_grid_covers_shape_once() -> None:
    boxes = tile_grid((10, 7), (4, 3))
    cover = np.zeros((10, 7), int)
    for b in boxes:
        cover[b.slices()] += 1
    assert (cover == 1).all() and len(boxes) == 3 * 3
    assert Box((3, 5), (7, 6)).coarse((2, 2), (5, 3)) == Box((1, 2), (4, 3))


@pytest.mark.parametrize("tile", [32, 25, 1000])  # divides the padded grid, does not divide, one tile
@pytest.mark.parametrize("store_from", [1, 2, 4])
def test_tiled_equals_whole_2d(model2d, image2d, whole2d, tile: int, store_from: int) -> None:
    assert whole2d.logits.std() > 0.1  # a non-trivial result
    res = segment_tiled(model2d, image2d, tile=tile, backend="torch", store_from=store_from)
    np.testing.assert_array_equal(res.logits, whole2d.logits)
    np.testing.assert_array_equal(res.labels, whole2d.labels)
    assert res.axes == whole2d.axes == "YX"


def test_too_small_halo_breaks_equality(model2d, image2d, whole2d, monkeypatch) -> None:
    """The halo is what makes tiles exact: with half the halo the tiles disagree."""
    orig = Box.expand
    monkeypatch.setattr(Box, "expand", lambda self, halo, shape: orig(self, halo // 2, shape))
    res = segment_tiled(model2d, image2d, tile=25, backend="torch")
    assert np.abs(res.logits - whole2d.logits).max() > 1e-3


@pytest.mark.parametrize("tile", [8, 13])
def test_tiled_equals_whole_3d_zscore(tile: int) -> None:
    cfg = preset("radiology", steps=(3, 3, 3, 4), factors=((2, 2, 2), (2, 2, 1), (2, 2, 1)))
    model = random_model(cfg, 1)
    vol = np.random.default_rng(1).normal(100, 20, (21, 37, 30)).astype(np.float32)
    whole = segment(model, vol, backend="torch")
    res = segment_tiled(model, vol, tile=tile, backend="torch")
    np.testing.assert_array_equal(res.logits, whole.logits)
    np.testing.assert_array_equal(res.labels, whole.labels)


@pytest.mark.parametrize("tile", [(8, 8, 4), 11])
def test_tiled_equals_whole_video(tile) -> None:
    """A (T, H, W, 3) video through the surgery preset (model axes YXT), 3 classes."""
    cfg = preset("surgery", steps=(2, 2, 3), factors=((2, 2, 2), (2, 2, 2)), output_channels=3)
    model = random_model(cfg, 2)
    vid = np.random.default_rng(2).integers(0, 255, (9, 30, 41, 3), dtype=np.uint8)
    whole = segment(model, vid, axes="TYXC", backend="torch")
    res = segment_tiled(model, vid, axes="TYXC", tile=tile, backend="torch")
    assert res.logits.shape == whole.logits.shape == (3, 9, 30, 41)
    np.testing.assert_array_equal(res.logits, whole.logits)
    np.testing.assert_array_equal(res.labels, whole.labels)


def test_tiled_ensemble_bfloat16_dask_input() -> None:
    import dask.array as da

    cfg = preset("pathology", steps=(3, 3, 5), factors=((2, 2),) * 2)
    model = random_model(cfg, 3)
    img = np.random.default_rng(3).integers(0, 255, (50, 45, 3), dtype=np.uint8)
    whole = segment(model, img, backend="torch", runs=3, dtype="bfloat16")
    res = segment_tiled(
        model, da.from_array(img, chunks=(20, 20, 3)), tile=16, backend="torch", runs=3, dtype="bfloat16"
    )
    np.testing.assert_array_equal(res.logits, whole.logits)
    np.testing.assert_array_equal(res.spread, whole.spread)


def test_tiled_out_of_core_store(tmp_path, model2d, image2d, whole2d) -> None:
    res = segment_tiled(model2d, image2d, tile=32, backend="torch", store=tmp_path / "work")
    assert not isinstance(res.labels, np.ndarray)  # zarr arrays on disk
    np.testing.assert_array_equal(res.logits[...], whole2d.logits)
    assert (tmp_path / "work" / "state" / "s0" / "L3").is_dir()
    again = segment_tiled(model2d, image2d, tile=32, backend="torch", store=tmp_path / "work")
    assert again.record["tiles_computed"] == 0 and again.record["tiles_skipped"] == res.record["tiles_computed"]
    with pytest.raises(Exception, match="different run"):
        segment_tiled(model2d, image2d, tile=32, backend="torch", store=tmp_path / "work", seed=5)


def test_cancel_stops_tiled_run(model2d, image2d) -> None:
    from napari_octreenca.nca.errors import Cancelled

    seen = []
    with pytest.raises(Cancelled):
        segment_tiled(model2d, image2d, tile=25, backend="torch", callback=seen.append, cancel=lambda: len(seen) >= 3)
    assert len(seen) == 3 and {"stage", "level", "tile", "tiles"} <= set(seen[0])


def test_two_threads_and_auto_backend_within_1e6(model2d, image2d) -> None:
    """With 2 threads and whatever backend ``auto`` picks (fused CPU when present), tiles agree
    with the whole run to 1e-6 of the logit scale."""
    torch.set_num_threads(2)
    try:
        res = segment_tiled(model2d, image2d, tile=40, backend="auto")
        whole = segment(model2d, image2d, backend="auto")
    finally:
        torch.set_num_threads(1)
    scale = np.abs(whole.logits).max()
    assert np.abs(res.logits - whole.logits).max() <= 1e-6 * max(1.0, scale)
    assert tiling.DEFAULT_TILE[2] >= 256


def test_input_pyramid_used_where_shapes_fit(tmp_path) -> None:
    """A file pyramid made by striding (what ``nearest`` resizing does) gives the whole result
    exactly; a different pyramid changes it (so it is really read)."""
    from napari_octreenca.io.ome_zarr import write_ome_zarr_image
    from napari_octreenca.io.readers import read_image

    cfg = preset("pathology", steps=(3, 3, 3, 4), factors=((2, 2),) * 3, resize="nearest")
    model = random_model(cfg, 4)
    img = np.random.default_rng(4).integers(0, 255, (130, 150, 3), dtype=np.uint8)
    path = write_ome_zarr_image(tmp_path / "p.zarr", img, "YXC", levels=4, chunk=64)
    im = read_image(path)
    assert [lv.shape[:2] for lv in im.levels] == [(130, 150), (65, 75), (33, 38), (17, 19)]
    whole = segment(model, img, backend="torch")
    res = segment_tiled(model, im.data, tile=48, backend="torch", store_from=2, pyramid=im.levels)
    assert res.record["pyramid_levels"] == [1, 2, 3]
    np.testing.assert_array_equal(res.logits, whole.logits)
    brighter = [im.levels[0]] + [
        np.minimum(np.asarray(lv).astype(np.int16) + 40, 255).astype(np.uint8) for lv in im.levels[1:]
    ]
    other = segment_tiled(model, im.data, tile=48, backend="torch", store_from=2, pyramid=brighter)
    assert np.abs(other.logits - whole.logits).max() > 1e-3


@pytest.mark.parametrize("tile", [25, 40])
def test_cpu_fused_tiled_equals_whole_bitwise(model2d, image2d, tile: int) -> None:
    """The fused CPU kernel gives every cell the same float ops whatever tile (row length, row
    chunk, y-run) it sits in: tiled == whole, bitwise, with its own threads."""
    pytest.importorskip("numba")
    whole = segment(model2d, image2d, backend="cpu-fused")
    res = segment_tiled(model2d, image2d, tile=tile, backend="cpu-fused")
    np.testing.assert_array_equal(res.logits, whole.logits)


def test_cpu_fused_tiled_equals_whole_bitwise_3d() -> None:
    pytest.importorskip("numba")
    cfg = preset("radiology", steps=(3, 3, 3, 4), factors=((2, 2, 2), (2, 2, 1), (2, 2, 1)))
    model = random_model(cfg, 1)
    vol = np.random.default_rng(1).normal(100, 20, (21, 37, 30)).astype(np.float32)
    whole = segment(model, vol, backend="cpu-fused")
    res = segment_tiled(model, vol, tile=13, backend="cpu-fused")
    np.testing.assert_array_equal(res.logits, whole.logits)
