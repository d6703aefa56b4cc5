"""The slab-wise torch backend equals the layer-wise reference, slab borders included."""

from __future__ import annotations

import pytest
import torch

from napari_octreenca.backends import torch_backend
from napari_octreenca.backends.base import LevelRun
from napari_octreenca.backends.torch_backend import LayerwiseTorchBackend, TorchBackend
from napari_octreenca.nca.weights import BackboneNCA


@pytest.mark.parametrize(
    "shape", [(1, 1), (9, 1), (2, 6), (11, 7), (1, 3, 2), (7, 4, 5), (5, 1, 3)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("slab_cells", [1, 8, 1 << 17])
@pytest.mark.parametrize("fire_rate", [0.5, 1.0])
def test_slabs_equal_layerwise(monkeypatch, shape, slab_cells, fire_rate) -> None:
    monkeypatch.setattr(torch_backend, "SLAB_CELLS", slab_cells)  # 1 and 8: one or few rows per slab
    dims = len(shape)
    torch.manual_seed(len(shape) + shape[0])
    nca = BackboneNCA(10, 16, 2, dims)
    with torch.no_grad():
        for p in nca.parameters():
            p.copy_(torch.randn_like(p) / max(1.0, p[0].numel() ** 0.5))
    image, state = torch.randn((2, 2) + shape), torch.randn((2, 8) + shape)
    run = LevelRun(level=1, steps=3, seed=5, fire_rate=fire_rate, origin=tuple(range(2, 2 + dims)))
    ref = LayerwiseTorchBackend().run_level(nca, image, state.clone(), run)
    out = TorchBackend().run_level(nca, image, state.clone(), run)
    assert (out - ref).abs().max().item() < 1e-5
