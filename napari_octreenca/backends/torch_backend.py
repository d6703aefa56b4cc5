"""PyTorch backend: the reference step (``nca.step``) run slab by slab for inference.

Slabs of the first spatial axis keep the 2C- and 64-channel intermediates alive for one slab at a
time (two state buffers plus a slab of scratch).
"""

from __future__ import annotations

import torch

from ..nca.firemask import fire_mask_torch
from ..nca.step import nca_delta, pad_reflect, reflect_index, step_differentiable
from ..nca.weights import BackboneNCA
from .base import Backend, LevelRun, StepCallback

#: Cells per slab in inference; bounds the scratch memory to about 64 MB in float32.
SLAB_CELLS = 1 << 17


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
        weights = cast_weights(nca, dtype, state.device)
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


def cast_weights(nca: BackboneNCA, dtype: torch.dtype, device: torch.device) -> BackboneNCA:
    """The level's weights in the state's dtype/device (a copy only when they differ)."""
    p = nca.conv.weight
    if p.dtype == dtype and p.device == device:
        return nca
    import copy

    return copy.deepcopy(nca).to(device=device, dtype=dtype)


class LayerwiseTorchBackend(Backend):
    """The whole level through the reference step at once (all intermediates alive), as the
    published OctreeNCA code runs inference: the yardstick of the benchmarks, never picked by
    ``auto``."""

    name = "torch-layerwise"

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
        weights = cast_weights(nca, state.dtype, state.device)
        image = image.to(state.dtype)
        origin = run.origin or (0,) * (state.dim() - 2)
        for step in range(run.steps):
            mask = None
            if run.fire_rate < 1:
                mask = fire_mask_torch(
                    tuple(state.shape[2:]), origin, run.seed, run.level, step, run.fire_rate, state.device
                )[None, None].to(state.dtype)
            state = step_differentiable(weights, image, state, mask)
            if callback is not None:
                callback(step, state)
        return state
