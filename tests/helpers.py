"""Small helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from napari_octreenca import OctreeNCA, preset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("OCTREENCA_SHARED_DATA", REPO.parent / "shared" / "data"))

MRICRON = Path("/usr/share/mricron/templates")
ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")


def need_file(path: Path, how: str) -> Path:
    """Return ``path`` or skip the test, saying how to get the file."""
    if not path.exists():
        pytest.skip(f"{path} is absent ({how})")
    return path


def random_model(name: str = "pathology", seed: int = 0, std: float = 0.1, **changes: Any) -> OctreeNCA:
    """A preset model with random, non-zero weights (fc1 included), so every path matters."""
    gen = torch.Generator().manual_seed(seed)
    model = OctreeNCA(preset(name, **changes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()
