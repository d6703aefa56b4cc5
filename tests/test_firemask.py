"""The counter-based fire mask: backend-independent, tile-independent, right rate."""

from __future__ import annotations

import numpy as np
import pytest

from napari_octreenca.nca.firemask import fire_mask_numpy, fire_mask_torch


@pytest.mark.parametrize("shape,origin", [((17, 33), (0, 0)), ((5, 7, 9), (3, 100, 2**31 + 5)), ((1, 64), (9, 0))])
def test_torch_equals_numpy(shape: tuple, origin: tuple) -> None:
    a = fire_mask_torch(shape, origin, seed=42, level=2, step=7, fire_rate=0.5).numpy()
    b = fire_mask_numpy(shape, origin, seed=42, level=2, step=7, fire_rate=0.5)
    assert a.shape == shape
    np.testing.assert_array_equal(a, b)


def test_block_is_a_slice_of_the_whole() -> None:
    whole = fire_mask_torch((40, 50, 6), (0, 0, 0), 1, 0, 3, 0.5)
    block = fire_mask_torch((7, 11, 4), (13, 29, 2), 1, 0, 3, 0.5)
    assert bool((whole[13:20, 29:40, 2:6] == block).all())


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_rate_and_independence(rate: float) -> None:
    m = fire_mask_torch((256, 256), (0, 0), 7, 1, 0, rate).float()
    assert abs(float(m.mean()) - rate) < 0.01
    other = fire_mask_torch((256, 256), (0, 0), 7, 1, 1, rate).float()
    # Different steps are (nearly) independent draws.
    assert abs(float((m * other).mean()) - rate * rate) < 0.01
    # Neighbouring cells are not correlated.
    assert abs(float((m[:, 1:] * m[:, :-1]).mean()) - rate * rate) < 0.01


def test_seed_changes_mask_and_rate_one_fires_all() -> None:
    a = fire_mask_torch((64, 64), (0, 0), 1, 0, 0, 0.5)
    b = fire_mask_torch((64, 64), (0, 0), 2, 0, 0, 0.5)
    assert float((a != b).float().mean()) > 0.3
    assert bool(fire_mask_torch((64, 64), (0, 0), 1, 0, 0, 1.0).all())
