"""Classical baselines run by name from the command line and the API, like a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_octreenca.cli import main
from napari_octreenca.nca.errors import InputError
from napari_octreenca.run.baselines import otsu_brain_mask, run_baseline
from napari_octreenca.run.training import hard_dice


def test_otsu_brain_by_name_from_the_cli(tmp_path: Path, itk_brain: tuple[Path, Path]) -> None:
    """`--model otsu-brain` writes the baseline's mask on the input's grid; its Dice is the card's 0.952."""
    import nibabel as nib

    from napari_octreenca.data_sources import load_nifti_zyx
    from napari_octreenca.io.writers import read_labels_metadata

    out = tmp_path / "brain.nii.gz"
    assert main(["segment", str(itk_brain[0]), str(out), "--model", "otsu-brain", "--quiet"]) == 0
    got = nib.load(out)
    ref = nib.load(itk_brain[0])
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.affine, ref.affine)
    truth = np.asarray(nib.load(itk_brain[1]).dataobj) > 0
    assert abs(hard_dice(np.asarray(got.dataobj) == 1, truth) - 0.952) < 0.005
    assert read_labels_metadata(out)["model"] == "otsu-brain"
    img, sp = load_nifti_zyx(itk_brain[0])  # the same as the function on the RAS+ volume
    assert abs(hard_dice(run_baseline("otsu-brain", img, "ZYX", sp), otsu_brain_mask(img, sp)) - 1.0) < 1e-9


def test_baseline_errors_are_one_line() -> None:
    with pytest.raises(InputError, match="unknown baseline 'otsu-x'"):
        run_baseline("otsu-x", np.zeros((4, 4, 4)), "ZYX")
    with pytest.raises(InputError, match="needs a 3D"):
        run_baseline("otsu-brain", np.zeros((4, 4, 3)), "YXC")
    with pytest.raises(InputError, match="needs an RGB"):
        run_baseline("otsu-epidermis", np.zeros((4, 4, 4)), "ZYX")
