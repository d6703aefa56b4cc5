"""Resampling to a model's fixed spacing and back (engine/resample.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_octreenca.nca.config import preset
from napari_octreenca.nca.errors import InputError
from napari_octreenca.nca.octree import OctreeNCA
from napari_octreenca.run.resample import (
    model_grid_shape,
    model_spacing_in_input_order,
    resample_back,
    resample_labels_back,
    resample_to_model_spacing,
    segment_at_model_spacing,
)


def test_grid_shape_follows_physical_size() -> None:
    # The ITK subject: 128 x 62 x 128 voxels at 2 x 3 x 2 mm -> 3 mm isotropic.
    assert model_grid_shape((128, 62, 128), (2, 3, 2), (3, 3, 3)) == (85, 62, 85)
    assert model_grid_shape((181, 217, 181), (1, 1, 1), (3, 3, 3)) == (60, 72, 60)
    with pytest.raises(InputError):
        model_grid_shape((10, 10), (1, 0), (1, 1))
    with pytest.raises(InputError):
        model_grid_shape((10, 10), (1, 1, 1), (1, 1))


def test_round_trip_keeps_a_smooth_shape() -> None:
    zz, yy, xx = np.mgrid[0:60, 0:50, 0:40].astype(np.float32)
    ball = ((zz - 30) ** 2 + (yy - 25) ** 2 + (xx - 20) ** 2 < 15**2).astype(np.float32)
    small = resample_to_model_spacing(ball, (1, 1, 1), (3, 2, 2))
    assert small.shape == (20, 25, 20)
    assert abs(small.mean() - ball.mean()) < 0.01  # anti-aliased down-sampling keeps the volume
    back = resample_back(small, ball.shape, order=1) > 0.5
    inter = np.logical_and(back, ball > 0).sum()
    assert 2 * inter / (back.sum() + ball.sum()) > 0.97
    labels = resample_labels_back((small > 0.5).astype(np.uint8), ball.shape)
    assert labels.dtype == np.uint8 and labels.shape == ball.shape


def test_channel_axis_is_left_alone() -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (90, 60, 3), dtype=np.uint8)
    small = resample_to_model_spacing(rgb, (1, 1), (3, 3), channel_axis=-1)
    assert small.shape == (30, 20, 3)
    assert abs(float(small[..., 0].mean()) - float(rgb[..., 0].mean())) < 2


def test_model_spacing_is_reordered_to_the_input_axes() -> None:
    cfg = preset("surgery").replace(spacing=(4.0, 4.0, 1.0))  # axes YXT
    assert model_spacing_in_input_order(cfg, "TYXC") == (1.0, 4.0, 4.0)
    cfg3 = preset("radiology").replace(axes="ZYX", spacing=(3.0, 2.0, 1.0))
    assert model_spacing_in_input_order(cfg3, "XYZ") == (1.0, 2.0, 3.0)


def test_segment_at_model_spacing_returns_the_input_grid() -> None:
    torch.manual_seed(0)
    cfg = preset("pathology").replace(spacing=(2.0, 2.0), steps=(2, 2, 2, 2, 2))
    model = OctreeNCA(cfg).eval()
    img = np.random.default_rng(1).integers(0, 255, (70, 52, 3), dtype=np.uint8)
    res = segment_at_model_spacing(model, img, (1.0, 1.0), axes="YXC")
    assert res.labels.shape == (70, 52) and res.logits.shape == (1, 70, 52)
    assert res.record["model_grid"][:2] == [35, 26]
    # Same as segmenting the down-sampled image by hand and up-sampling its logits.
    from napari_octreenca.run.inference import segment

    small = np.clip(np.rint(resample_to_model_spacing(img, (1, 1), (2, 2), channel_axis=-1)), 0, 255).astype(np.uint8)
    ref = segment(model, small, axes="YXC")
    np.testing.assert_allclose(res.logits, resample_back(ref.logits, (70, 52), channel_axis=0), atol=1e-5)
    # A model without a spacing is segmented as it is.
    plain = OctreeNCA(preset("pathology").replace(steps=(1, 1, 1, 1, 1))).eval()
    assert segment_at_model_spacing(plain, img, axes="YXC").labels.shape == (70, 52)


def test_reorient_matches_nibabel_canonical(itk_brain) -> None:
    """The ITK subject is stored LSA; reorienting its (k, j, i) array gives nibabel's RAS+ volume."""
    import nibabel as nib

    from napari_octreenca.data_sources import load_nifti_zyx
    from napari_octreenca.run.resample import reorient_ras_to_zyx, reorient_zyx_to_ras

    img = nib.load(str(itk_brain[0]))
    file_zyx = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0)
    ras, sp = reorient_zyx_to_ras(file_zyx, img.affine)
    ref, ref_sp = load_nifti_zyx(itk_brain[0])
    np.testing.assert_array_equal(ras, ref)
    assert sp == ref_sp == (2.0, 3.0, 2.0)
    np.testing.assert_array_equal(reorient_ras_to_zyx(ras, img.affine), file_zyx)
    two = np.stack([ras, ras + 1])
    np.testing.assert_array_equal(reorient_ras_to_zyx(two, img.affine, channel_axis=0)[1], file_zyx + 1)


def test_segment_with_affine_reorients_and_returns_file_order() -> None:
    torch.manual_seed(0)
    cfg = preset("radiology").replace(axes="ZYX", spacing=(2.0, 2.0, 2.0), steps=(1, 1, 1, 1, 2))
    model = OctreeNCA(cfg).eval()
    vol = np.random.default_rng(2).random((12, 10, 16)).astype(np.float32)  # file (k, j, i)
    lsa = np.array([[-2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])
    res = segment_at_model_spacing(model, vol, axes="ZYX", affine=lsa)
    assert res.labels.shape == vol.shape and res.record["reoriented"] == "RAS+"
    from napari_octreenca.run.resample import reorient_zyx_to_ras

    ras, sp = reorient_zyx_to_ras(vol, lsa)
    assert sp == (2.0, 3.0, 2.0) and ras.shape == (10, 12, 16)
    ref = segment_at_model_spacing(model, ras, sp, axes="ZYX")
    from napari_octreenca.run.resample import reorient_ras_to_zyx

    np.testing.assert_allclose(res.logits, reorient_ras_to_zyx(ref.logits, lsa, channel_axis=0), atol=1e-6)
    with pytest.raises(InputError):
        segment_at_model_spacing(model, vol, (1, 1, 1), axes="ZYX", affine=lsa)
