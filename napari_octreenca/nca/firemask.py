"""Counter-based fire mask: whether a cell updates at (seed, level, step, global coordinate).

The mask is a pure function of those integers, so the same seed gives the same result whatever
the device, batch, tile or backend. Every backend (torch, fused CPU, CUDA) implements exactly
this hash; ``kernels/nca_common.cuh`` holds the C version.

Hash: Chris Wellons' two-round 32-bit integer mixer ``[16 21f0aaad 15 735a2d97 15]``, chained
over seed, level, step and each coordinate (slowest axis first). Both multipliers are below
2**31, so the products of 32-bit values fit in signed 64-bit integers, which lets torch compute it
exactly with int64 tensors.
"""

from __future__ import annotations

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
M1 = 0x21F0AAAD
M2 = 0x735A2D97
#: A cell fires when the top 24 bits of its hash are below ``fire_rate * 2**24``.
THRESHOLD_BITS = 24


def mix32(h: int) -> int:
    """Mix one 32-bit integer (pure Python)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * M1) & MASK32
    h ^= h >> 15
    h = (h * M2) & MASK32
    h ^= h >> 15
    return h


def base_key(seed: int, level: int, step: int) -> int:
    """Hash of (seed, level, step): the starting value for the per-cell chain."""
    h = mix32(seed & MASK32)
    h = mix32(h ^ (seed >> 32 & MASK32))
    h = mix32(h ^ (level & MASK32))
    return mix32(h ^ (step & MASK32))


def threshold(fire_rate: float) -> int:
    """Integer threshold for the top 24 bits; fire_rate 1 means every cell fires."""
    return int(round(min(max(fire_rate, 0.0), 1.0) * (1 << THRESHOLD_BITS)))


def _mix_t(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * M1) & MASK32
    h = h ^ (h >> 15)
    h = (h * M2) & MASK32
    return h ^ (h >> 15)


def fire_mask_torch(
    shape: tuple[int, ...],
    origin: tuple[int, ...],
    seed: int,
    level: int,
    step: int,
    fire_rate: float,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean mask of the cells that fire, for a block of ``shape`` starting at global ``origin``."""
    h = torch.tensor(base_key(seed, level, step), dtype=torch.int64, device=device)
    for axis, (n, o) in enumerate(zip(shape, origin)):
        coords = torch.arange(o, o + n, dtype=torch.int64, device=device) & MASK32
        view = [1] * len(shape)
        view[axis] = n
        h = _mix_t(h.unsqueeze(-1) ^ coords.view(view[: axis + 1])) if axis else _mix_t(h ^ coords)
    return (h >> (32 - THRESHOLD_BITS)) < threshold(fire_rate)


def fire_mask_numpy(
    shape: tuple[int, ...], origin: tuple[int, ...], seed: int, level: int, step: int, fire_rate: float
) -> np.ndarray:
    """NumPy twin of :func:`fire_mask_torch` (uint32 arithmetic), used to cross-check backends."""
    h: np.ndarray = np.asarray(np.uint32(base_key(seed, level, step)))
    with np.errstate(over="ignore"):
        for axis, (n, o) in enumerate(zip(shape, origin)):
            coords = (np.arange(o, o + n, dtype=np.int64) & MASK32).astype(np.uint32)
            h = h[..., None] ^ coords if axis else h ^ coords
            h = h ^ (h >> np.uint32(16))
            h = h * np.uint32(M1)
            h = h ^ (h >> np.uint32(15))
            h = h * np.uint32(M2)
            h = h ^ (h >> np.uint32(15))
    return np.asarray((h >> np.uint32(32 - THRESHOLD_BITS)) < threshold(fire_rate))
