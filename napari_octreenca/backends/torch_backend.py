"""PyTorch backend: the reference NCA step (differentiable) and a slab-wise inference loop.

``nca_delta`` is the one definition of the NCA update in PyTorch; training calls it on whole
patches, inference calls it on slabs of the first spatial axis so that the 2C- and 64-channel
intermediates exist only for one slab at a time (two state buffers plus a slab of scratch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.firemask import fire_mask_torch
from ..engine.nca import BackboneNCA
from .base import Backend, LevelRun, StepCallback

#: Cells per slab in inference; bounds the scratch memory to about 64 MB in float32.
SLAB_CELLS = 1 << 17


def reflect_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect out-of-range indices into [0, n) (no edge repeat); a size-1 axis maps to 0."""
    if n == 1:
        return torch.zeros_like(idx)
    idx = torch.where(idx < 0, -idx, idx)
    return torch.where(idx >= n, 2 * n - 2 - idx, idx)


def pad_reflect(x: torch.Tensor, r: int, axes: range | None = None) -> torch.Tensor:
    """Reflect-pad the spatial axes of ``(B, C, *spatial)`` by ``r`` cells."""
    axes = axes if axes is not None else range(2, x.dim())
    for ax in axes:
        n = x.shape[ax]
        idx = reflect_index(torch.arange(-r, n + r, device=x.device), n)
        x = x.index_select(ax, idx)
    return x


def nca_delta(nca: BackboneNCA, padded: torch.Tensor) -> torch.Tensor:
    """Update ``dx`` (C - in channels) of the interior cells of a reflect-padded full state.

    ``padded`` is ``cat[image, state]`` padded by the kernel radius on every spatial axis.
    """
    conv = F.conv2d if nca.spatial_dims == 2 else F.conv3d
    r = nca.radius
    perception = conv(padded, nca.conv.weight, nca.conv.bias, groups=nca.channels)
    centre = padded[(slice(None), slice(None)) + (slice(r, -r),) * nca.spatial_dims]
    h = conv(torch.cat([centre, perception], dim=1), nca.fc0.weight, nca.fc0.bias)
    return conv(F.relu(h), nca.fc1.weight)


def step_differentiable(
    nca: BackboneNCA, image: torch.Tensor, state: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """One NCA step for training: returns the new state (no in-place ops, autograd-safe).

    ``mask`` is a ``(B or 1, 1, *spatial)`` float mask of the cells that fire, or None (all fire).
    """
    dx = nca_delta(nca, pad_reflect(torch.cat([image, state], dim=1), nca.radius))
    return state + (dx if mask is None else dx * mask)


class TorchBackend(Backend):
    """Layer-wise PyTorch path; runs on any device and dtype torch supports."""

    name = "torch"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return True, ""

    @torch.no_grad()
    def run_level(
        self,
        nca: BackboneNCA,
        image: torch.Tensor,
        state: torch.Tensor,
        run: LevelRun,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        dtype = state.dtype
        weights = _cast_module(nca, dtype, state.device)
        image = image.to(dtype)
        spatial = tuple(state.shape[2:])
        origin = run.origin or (0,) * len(spatial)
        r = nca.radius
        n0 = spatial[0]
        per_row = max(1, state.shape[0] * int(torch.tensor(spatial[1:]).prod().item()))
        rows = max(1, min(n0, SLAB_CELLS // per_row))
        other_axes = range(3, state.dim())
        out = torch.empty_like(state)
        for step in range(run.steps):
            for a in range(0, n0, rows):
                b = min(n0, a + rows)
                idx = reflect_index(torch.arange(a - r, b + r, device=state.device), n0)
                block = torch.cat([image.index_select(2, idx), state.index_select(2, idx)], dim=1)
                dx = nca_delta(weights, pad_reflect(block, r, other_axes))
                if run.fire_rate < 1.0:
                    mask = fire_mask_torch(
                        (b - a,) + spatial[1:], (origin[0] + a,) + tuple(origin[1:]),
                        run.seed, run.level, step, run.fire_rate, state.device,
                    )
                    dx.mul_(mask.to(dtype))
                torch.add(state[:, :, a:b], dx, out=out[:, :, a:b])
            state, out = out, state
            if callback is not None:
                callback(step, state)
        return state


def _cast_module(nca: BackboneNCA, dtype: torch.dtype, device: torch.device) -> BackboneNCA:
    """The level's weights in the state's dtype/device (a copy only when they differ)."""
    p = nca.conv.weight
    if p.dtype == dtype and p.device == device:
        return nca
    import copy

    return copy.deepcopy(nca).to(device=device, dtype=dtype)
