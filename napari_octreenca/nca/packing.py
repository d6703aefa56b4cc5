"""Weight packing for the fused step implementations (CUDA kernel, host harness, numba CPU path).

- :func:`pack_weights`: one level's parameters as the flat float32 array the fused code reads
  (layout ``nca_layout`` in ``kernels/nca_common.cuh``: conv_w, conv_b, fc0_w, fc0_b, fc1_w).
- :func:`check_fusable`: whether a level fits the fused code (3x3 / 3x3x3 depthwise conv).
"""

from __future__ import annotations

import torch

from .weights import BackboneNCA


def layout_size(spatial_dims: int, channels: int, input_channels: int, hidden: int) -> int:
    """Number of floats in the packed weights of one level."""
    taps = 3**spatial_dims
    return channels * taps + channels + hidden * 2 * channels + hidden + (channels - input_channels) * hidden


def pack_weights(nca: BackboneNCA, device: torch.device | str = "cpu") -> torch.Tensor:
    """The level's weights as one contiguous float32 vector in the fused kernels' layout."""
    c, h = nca.channels, nca.fc0.out_channels
    parts = [
        nca.conv.weight.reshape(c, -1),
        nca.conv_bias.reshape(c),
        nca.fc0.weight.reshape(h, 2 * c),
        nca.fc0_bias.reshape(h),
        nca.fc1.weight.reshape(c - nca.input_channels, h),
    ]
    flat = torch.cat([p.detach().to(device=device, dtype=torch.float32).reshape(-1) for p in parts])
    assert flat.numel() == layout_size(nca.spatial_dims, c, nca.input_channels, h)
    return flat.contiguous()


def check_fusable(nca: BackboneNCA) -> tuple[bool, str]:
    """Whether the fused kernels can run this level (they assume a 3-wide depthwise conv)."""
    if nca.kernel_size != 3:
        return False, f"kernel_size {nca.kernel_size} (fused kernels need 3)"
    if nca.spatial_dims not in (2, 3):
        return False, f"spatial_dims {nca.spatial_dims}"
    if nca.fc0.bias is None or nca.conv.bias is None or nca.fc1.bias is not None:
        return False, "unexpected bias layout"
    return True, ""
