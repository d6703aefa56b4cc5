"""Interrupted tiled runs resume: only the remaining tiles are computed, the output is identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_octreenca import OctreeNCA, preset, save_model, segment
from napari_octreenca.io.readers import read_image
from napari_octreenca.run.pipeline import find_work_folders, run_segment
from napari_octreenca.run.tiling import segment_tiled


class Stop(Exception):
    pass


def random_model(seed: int = 0) -> OctreeNCA:
    torch.manual_seed(seed)
    model = OctreeNCA(preset("pathology", steps=(3, 3, 3, 5), factors=((2, 2),) * 3))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_interrupted_run_resumes_remaining_tiles(tmp_path: Path) -> None:
    model = random_model()
    img = np.random.default_rng(0).integers(0, 255, (150, 170, 3), dtype=np.uint8)
    whole = segment(model, img, backend="torch")
    events: list[dict] = []

    def stop_after_12(ev: dict) -> None:
        events.append(ev)
        if sum(e["computed"] for e in events) == 12:
            raise Stop  # as if the process died right after the 12th tile

    with pytest.raises(Stop):
        segment_tiled(model, img, tile=40, backend="torch", store=tmp_path / "w", callback=stop_after_12)
    again: list[dict] = []
    res = segment_tiled(model, img, tile=40, backend="torch", store=tmp_path / "w", callback=again.append)
    total = len(again)
    assert sum(e["computed"] for e in again) == total - 12  # only the remaining tiles
    assert res.record["tiles_skipped"] == 12
    np.testing.assert_array_equal(res.logits[...], whole.logits)
    np.testing.assert_array_equal(res.labels[...], whole.labels)


SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from napari_octreenca.run.pipeline import run_segment
run_segment([sys.argv[1]], sys.argv[2], sys.argv[3], backend="torch", tile=64,
            progress=lambda ev: print(ev.get("stage"), ev.get("computed"), flush=True))
"""


def test_killed_process_resumes_with_identical_output(tmp_path: Path) -> None:
    """SIGKILL a real ``run_segment`` midway; the rerun finishes the rest, output == uninterrupted."""
    import tifffile

    model = random_model(1)
    mpath = save_model(model, tmp_path / "m.safetensors")
    img = np.random.default_rng(1).integers(0, 255, (420, 500, 3), dtype=np.uint8)
    src = tmp_path / "slide.tif"
    tifffile.imwrite(src, img, photometric="rgb", tile=(128, 128))
    out = tmp_path / "out" / "slide_labels.zarr"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(src), str(out), str(mpath)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    seen = 0
    for line in proc.stdout:  # kill once a handful of output tiles are written
        if line.startswith("output True"):
            seen += 1
            if seen == 5:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    [work] = find_work_folders(out)  # one work folder, named after this run's settings
    done_before = len(list((work / "progress").iterdir()))
    assert done_before >= 5
    # An interrupted OME-Zarr output is not listed as a labels image yet.
    assert "segmentation" not in read_labels_listing(out)

    events: list[dict] = []
    run_segment([str(src)], str(out), str(mpath), backend="torch", tile=64, progress=events.append)
    tiles = [e for e in events if "computed" in e]
    assert sum(e["computed"] for e in tiles) == len(tiles) - done_before
    assert not work.exists() and not find_work_folders(out)  # removed once complete
    resumed = np.asarray(read_image(out).data)

    fresh = tmp_path / "fresh_labels.zarr"
    run_segment([str(src)], str(fresh), str(mpath), backend="torch", tile=64)
    np.testing.assert_array_equal(resumed, np.asarray(read_image(fresh).data))
    whole = segment(model, img, backend="torch")
    np.testing.assert_array_equal(resumed, whole.labels)
    assert read_labels_listing(out) == ["segmentation"]


def read_labels_listing(root: Path) -> list[str]:
    import zarr

    try:
        return list(zarr.open_group(str(root / "labels"), mode="r").attrs["ome"].get("labels", []))
    except Exception:
        return []
