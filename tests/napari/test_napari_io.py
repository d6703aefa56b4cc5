"""npe2 readers/writers of the plugin, without Qt: real files in, napari layer data out, and
labels written and read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

npe2 = pytest.importorskip("npe2")
pytest.importorskip("napari_octreenca.io.readers")

from napari_octreenca.napari_io import get_reader, read_layers  # noqa: E402

PLUGIN = "napari-octreenca"


@pytest.fixture(autouse=True, scope="module")
def _discovered():
    """npe2 finds the plugin through its ``napari.manifest`` entry point (napari does this at start)."""
    npe2.PluginManager.instance().discover()


def test_manifest_validates_with_imports():
    """What ``npe2 validate --imports napari-octreenca`` checks: every command imports."""
    from npe2 import PluginManifest

    from napari_octreenca.resources import PACKAGE_DIR

    pm = PluginManifest.from_file(PACKAGE_DIR / "napari.yaml")
    pm.validate_imports()
    assert pm.name == PLUGIN
    assert {w.display_name for w in pm.contributions.widgets} == {"Segment", "NCA inspector", "Train"}
    assert {s.key for s in pm.contributions.sample_data} == {"brain_mri", "he_skin", "whole_slide", "video"}
    assert [m.command for m in pm.contributions.menus["napari/layers/segment"]] == [
        "napari-octreenca.segment_widget",
        "napari-octreenca.inspector_widget",
        "napari-octreenca.training_widget",
    ]
    top = PACKAGE_DIR.parent / "napari.yaml"
    if top.exists():  # a checkout: the top-level manifest is the same file
        assert top.resolve() == (PACKAGE_DIR / "napari.yaml").resolve()


def test_get_reader_claims_only_its_formats(tmp_path: Path):
    assert get_reader(str(tmp_path / "a.nii.gz")) is not None
    assert get_reader(str(tmp_path / "slide.svs")) is not None
    assert get_reader(str(tmp_path / "x.ome.zarr")) is not None
    assert get_reader(str(tmp_path / "clip.mp4")) is not None
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.csv")]) is None


def test_nifti_drag_and_drop(itk_brain):
    ((data, kwargs, kind),) = npe2.read([str(itk_brain[0])], stack=False, plugin_name=PLUGIN)
    assert kind == "image" and data.shape == (62, 128, 128)  # file (i, j, k) -> (Z, Y, X)
    assert tuple(kwargs["scale"]) == (3.0, 2.0, 2.0)
    meta = kwargs["metadata"]["octreenca"]
    assert meta["axes"] == "ZYX" and meta["source"] == str(itk_brain[0])
    import nibabel as nib

    np.testing.assert_allclose(meta["affine"], nib.load(str(itk_brain[0])).affine)
    assert kwargs["axis_labels"] == ("z", "y", "x")  # named sliders, not "-3"
    assert kwargs["units"] == ("millimeter",) * 3


def test_whole_slide_svs():
    from napari_octreenca.data_sources import whole_slide_path

    try:
        path = whole_slide_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    data, kwargs, kind = read_layers(str(path))[0]
    shape = data[0].shape if isinstance(data, list) else data.shape
    assert kind == "image" and kwargs["rgb"] and shape[-1] == 3
    assert kwargs["metadata"]["octreenca"]["axes"] == "YXC"
    assert kwargs["scale"][0] == pytest.approx(0.499)  # microns per pixel from the Aperio header
    assert kwargs["units"] == ("micrometer", "micrometer")


def test_ome_zarr_multiscale(tmp_path: Path):
    from napari_octreenca.io.ome_zarr import write_ome_zarr_image

    rng = np.random.default_rng(0)
    img = (rng.random((600, 520, 3)) * 255).astype(np.uint8)
    path = write_ome_zarr_image(tmp_path / "slide.ome.zarr", img, "YXC", scale=(0.25, 0.25), chunk=128)
    data, kwargs, kind = read_layers(str(path))[0]
    assert kwargs["multiscale"] and kwargs["rgb"] and isinstance(data, list) and len(data) > 1
    np.testing.assert_array_equal(np.asarray(data[0]), img)
    assert tuple(kwargs["scale"]) == (0.25, 0.25)


def test_video(tmp_path: Path):
    pytest.importorskip("av")
    from napari_octreenca.data_sources import synthetic_video
    from napari_octreenca.io.video import write_video

    clip, _ = synthetic_video(frames=6, size=(32, 48))
    path = write_video(tmp_path / "clip.avi", clip, fps=10)
    data, kwargs, kind = read_layers(str(path))[0]
    assert data.shape == (6, 32, 48, 3) and kwargs["rgb"]
    assert kwargs["metadata"]["octreenca"]["axes"] == "TYXC"
    assert kwargs["scale"][0] == pytest.approx(0.1)
    assert kwargs["axis_labels"] == ("t", "y", "x") and kwargs["units"] == ("second", "pixel", "pixel")


def _labels_layer(labels, source=None, names=("brain",)):
    meta = {"octreenca": {"class_names": list(names), "source_metadata": {"octreenca": {"source": source}}}}
    return (labels, {"name": "labels", "metadata": meta}, "labels")


def test_write_nifti_keeps_the_source_affine(tmp_path: Path, itk_brain):
    import nibabel as nib

    src = nib.load(str(itk_brain[0]))
    ((image, _, _),) = npe2.read([str(itk_brain[0])], stack=False, plugin_name=PLUGIN)
    labels = (np.asarray(image) > 60).astype(np.uint8)  # (Z, Y, X) like the layer
    out = tmp_path / "seg.nii.gz"
    written = npe2.write(str(out), [_labels_layer(labels, str(itk_brain[0]))], plugin_name=PLUGIN)
    assert Path(written[0]) == out
    got = nib.load(str(out))
    np.testing.assert_allclose(got.affine, src.affine)
    assert got.shape == src.shape
    # Read back through the plugin: the same (Z, Y, X) labels.
    ((back, _, _),) = npe2.read([str(out)], stack=False, plugin_name=PLUGIN)
    np.testing.assert_array_equal(np.asarray(back), labels)


def test_write_tiff_round_trip(tmp_path: Path):
    import tifffile

    labels = np.zeros((40, 50), np.uint8)
    labels[5:20, 10:30] = 1
    labels[25:35, 5:15] = 2
    out = tmp_path / "seg.tif"
    npe2.write(str(out), [_labels_layer(labels, names=("a", "b"))], plugin_name=PLUGIN)
    np.testing.assert_array_equal(tifffile.imread(out), labels)


def test_write_ome_zarr_round_trip(tmp_path: Path):
    labels = np.zeros((64, 80), np.uint8)
    labels[10:40, 20:70] = 1
    out = tmp_path / "seg.zarr"
    npe2.write(str(out), [_labels_layer(labels)], plugin_name=PLUGIN)
    data, kwargs, kind = read_layers(str(out))[0]
    assert kind == "labels"
    first = data[0] if isinstance(data, list) else data
    np.testing.assert_array_equal(np.asarray(first), labels)


def test_reader_patterns_come_from_the_format_table():
    """napari.yaml's filename_patterns are the table in io/formats.py (regenerate the block with
    ``python -m napari_octreenca.io.formats``), and the reader claims exactly those."""
    import yaml

    from napari_octreenca.io import readers
    from napari_octreenca.io.formats import napari_patterns, suffixes
    from napari_octreenca.napari_io import SUFFIXES
    from napari_octreenca.resources import PACKAGE_DIR

    manifest = yaml.safe_load((PACKAGE_DIR / "napari.yaml").read_text())
    (reader,) = manifest["contributions"]["readers"]
    assert reader["filename_patterns"] == napari_patterns()
    assert ["*" + s for s in SUFFIXES] == napari_patterns()
    assert readers.TIFF_SUFFIXES == suffixes("tiff") and readers.VIDEO_SUFFIXES == suffixes("video")
    for pattern in napari_patterns():
        assert get_reader("/data/x" + pattern[1:]) is not None, pattern
        assert readers.file_kind("/data/x" + pattern[1:]) in ("nifti", "tiff", "ome-zarr", "video")
