"""Small helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from typing import Any

import torch

from napari_octreenca.engine import OctreeNCA, preset


def random_model(name: str = "pathology", seed: int = 0, std: float = 0.1, **changes: Any) -> OctreeNCA:
    """A preset model with random, non-zero weights (fc1 included), so every path matters."""
    gen = torch.Generator().manual_seed(seed)
    model = OctreeNCA(preset(name, **changes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()
