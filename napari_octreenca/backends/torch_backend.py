"""PyTorch backend: the reference step (``nca.step``) run slab by slab for inference.

Slabs of the first spatial axis keep the 2C- and 64-channel intermediates alive for one slab at a
time (two state buffers plus a slab of scratch). A slab's rows are a view of the state where the
halo lies inside (reflected rows only at the ends), the other axes are padded in one pass, and the
fire mask and the update are applied in one ``addcmul``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
import torch.nn.functional as F

from ..nca.firemask import fire_mask_torch
from ..nca.octree import reference_level_steps
from ..nca.step import nca_delta, pad_reflect, reflect_index
from ..nca.weights import BackboneNCA
from .base import Backend, LevelRun, StepCallback

#: Cells per slab in inference: a slab's intermediates (about 500 bytes per cell in float32) stay
#: in the L2 cache, which measured 2x less CPU time than 1 << 17 cells.
SLAB_CELLS = 1 << 15


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
        out = torch.empty_like(state)
        starts = range(0, n0, rows)

        @torch.no_grad()  # grad mode is per thread: the pool's threads need it too
        def slab(step: int, src: torch.Tensor, dst: torch.Tensor, a: int) -> None:
            b = min(n0, a + rows)
            block = torch.cat([_slab_rows(image, a, b, r), _slab_rows(src, a, b, r)], dim=1)
            dx = nca_delta(weights, _pad_other_axes(block, r))
            if run.fire_rate < 1.0:
                mask = fire_mask_torch(
                    (b - a,) + spatial[1:],
                    (origin[0] + a,) + tuple(origin[1:]),
                    run.seed,
                    run.level,
                    step,
                    run.fire_rate,
                    state.device,
                )
                torch.addcmul(src[:, :, a:b], dx, mask.to(dtype), out=dst[:, :, a:b])
            else:
                torch.add(src[:, :, a:b], dx, out=dst[:, :, a:b])

        pool = _slab_pool(state.device, len(starts))
        try:
            for step in range(run.steps):
                if pool is None:
                    for a in starts:
                        slab(step, state, out, a)
                else:
                    # Slabs write disjoint rows: on the CPU they run side by side, one torch
                    # thread each (small ops parallelise poorly inside torch).
                    list(pool.map(partial(slab, step, state, out), starts))
                state, out = out, state
                if callback is not None:
                    callback(step, state)
        finally:
            if pool is not None:
                pool.shutdown()
        return state


def _slab_pool(device: torch.device, slabs: int) -> ThreadPoolExecutor | None:
    """Threads that run a step's slabs side by side on the CPU (None: one after the other)."""
    workers = min(torch.get_num_threads(), slabs)
    if device.type != "cpu" or workers < 2:
        return None
    return ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))


def _slab_rows(x: torch.Tensor, a: int, b: int, r: int) -> torch.Tensor:
    """Rows a - r .. b + r of the first spatial axis, reflected at its ends (a view inside)."""
    n0 = x.shape[2]
    if a - r >= 0 and b + r <= n0:
        return x.narrow(2, a - r, b - a + 2 * r)
    return x.index_select(2, reflect_index(torch.arange(a - r, b + r, device=x.device), n0))


def _pad_other_axes(block: torch.Tensor, r: int) -> torch.Tensor:
    """Reflect-pad every spatial axis but the first (already has its halo) by ``r``.

    F.pad's reflect (no edge repeat, like ``reflect_index``) is one pass; it needs axes longer
    than ``r``, so tiny axes take the index_select path.
    """
    other = block.shape[3:]
    if all(n > r for n in other):
        return F.pad(block, (r, r) * len(other) + (0, 0), mode="reflect")
    return pad_reflect(block, r, range(3, block.dim()))


def cast_weights(nca: BackboneNCA, dtype: torch.dtype, device: torch.device) -> BackboneNCA:
    """The level's weights in the state's dtype/device (a copy only when they differ)."""
    p = nca.conv.weight
    if p.dtype == dtype and p.device == device:
        return nca
    import copy

    return copy.deepcopy(nca).to(device=device, dtype=dtype)


class LayerwiseTorchBackend(TorchBackend):
    """The whole level through the reference step at once (all intermediates alive), as the
    published OctreeNCA code runs inference: the yardstick of the benchmarks, never picked by
    ``auto``."""

    name = "torch-layerwise"

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
        origin = run.origin or (0,) * (state.dim() - 2)
        return reference_level_steps(
            weights, image.to(state.dtype), state, run.level, run.steps, [run.seed], origin, run.fire_rate, callback
        )
