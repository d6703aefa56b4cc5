"""run_segment / ``octreenca segment``: folders, globs, whole vs tiled, NIfTI geometry kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ITK_DATA, need_file

from napari_octreenca import OctreeNCA, preset, save_model, segment
from napari_octreenca.io.readers import read_image
from napari_octreenca.nca.errors import InputError
from napari_octreenca.run.pipeline import default_output_name, expand_inputs, run_segment


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_model(name: str, seed: int = 0, **changes) -> OctreeNCA:
    torch.manual_seed(seed)
    model = OctreeNCA(preset(name, **changes))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def path_model(tmp_path_factory) -> tuple[OctreeNCA, Path]:
    model = random_model("pathology", steps=(3, 3, 5), factors=((2, 2),) * 2)
    return model, save_model(model, tmp_path_factory.mktemp("m") / "path.safetensors")


def test_cli_folder_and_glob(tmp_path: Path, path_model, shared_data: Path) -> None:
    model, mpath = path_model
    src = tmp_path / "in"
    src.mkdir()
    pics = sorted((shared_data / "kvasir-seg-mini" / "images").glob("*.jpg"))[:2]
    assert len(pics) == 2
    from PIL import Image

    for p in pics:  # real pictures, cropped to keep the test fast
        Image.open(p).crop((100, 100, 356, 300)).save(src / (p.stem + ".png"))
    pics = sorted(src.glob("*.png"))
    (src / "notes.txt").write_text("not an image")  # ignored
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "napari_octreenca.cli",
        "segment",
        str(src),
        str(tmp_path / "out"),
        "--model",
        str(mpath),
        "--backend",
        "torch",
        "--runs",
        "1",
        "--quiet",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    outs = sorted((tmp_path / "out").iterdir())
    assert [o.name for o in outs] == sorted(default_output_name(p) for p in pics)
    for p, o in zip(sorted(pics), outs):
        img = np.asarray(read_image(p).data)
        np.testing.assert_array_equal(np.asarray(read_image(o).data), segment(model, img, backend="torch").labels)
    # A glob, tiled (forced by --tile), into OME-Zarr: same labels as the whole run.
    written = run_segment([str(src / "*.png")], str(tmp_path / "out2"), str(mpath), backend="torch", tile=128)
    assert len(written) == 2
    for p, o in zip(sorted(pics), sorted(written)):
        np.testing.assert_array_equal(
            np.asarray(read_image(o).data), np.asarray(read_image(tmp_path / "out" / default_output_name(p)).data)
        )


def test_memory_budget_switches_to_tiled(tmp_path: Path, path_model) -> None:
    import tifffile

    model, mpath = path_model
    img = np.random.default_rng(0).integers(0, 255, (200, 230, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", img, photometric="rgb")
    events: list[dict] = []
    [out] = run_segment(
        [str(tmp_path / "a.tif")],
        str(tmp_path / "a.nii.gz"),
        str(mpath),
        backend="torch",
        memory_budget=1,
        progress=events.append,
    )
    assert any(e.get("stage") == "output" for e in events)  # went through the tiles
    assert [e for e in events if e.get("stage") == "written"][0]["tiled"] is True
    import nibabel as nib

    got = np.asarray(nib.load(out).dataobj).T  # NIfTI (i, j) = (X, Y)
    np.testing.assert_array_equal(got, segment(model, img, backend="torch").labels)


def test_nifti_through_pipeline_keeps_affine(tmp_path: Path) -> None:
    import nibabel as nib

    src = need_file(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz", "apt-get install insighttoolkit5-examples")
    model = random_model("radiology", steps=(2, 2, 3), factors=((2, 2, 2), (2, 2, 1)))
    mpath = save_model(model, tmp_path / "rad.safetensors")
    [whole] = run_segment([str(src)], str(tmp_path / "w.nii.gz"), str(mpath), backend="torch")
    [tiled] = run_segment([str(src)], str(tmp_path / "t.nii.gz"), str(mpath), backend="torch", tile=40)
    ref = nib.load(src)
    for out in (whole, tiled):
        got = nib.load(out)
        np.testing.assert_allclose(got.affine, ref.affine)
        assert got.shape == ref.shape and got.header.get_zooms() == ref.header.get_zooms()
    np.testing.assert_array_equal(np.asarray(nib.load(whole).dataobj), np.asarray(nib.load(tiled).dataobj))
    vol = np.asarray(read_image(src).data)
    np.testing.assert_array_equal(np.asarray(nib.load(whole).dataobj).T, segment(model, vol, backend="torch").labels)


def test_input_errors(tmp_path: Path, path_model) -> None:
    _, mpath = path_model
    with pytest.raises(InputError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.svs")])
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(InputError, match="output folder"):
        run_segment([str(tmp_path / "a.png"), str(tmp_path / "b.png")], str(tmp_path / "x.tif"), str(mpath))
