"""The NCA step in PyTorch: the reference every other implementation is tested against.

``nca_delta`` is the one definition of the update (perception, fc0, ReLU, fc1); training calls
``step_differentiable`` on whole patches; the torch backend calls ``nca_delta`` on slabs; the
fused CPU and CUDA implementations equal it within float rounding (tests/test_cpu_fused.py,
tests/test_kernel_host.py, kernels/README.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .weights import BackboneNCA


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
