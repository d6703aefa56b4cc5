"""The backbone NCA of one octree level: its parameters (one implementation for 2D and 3D).

Parameter names follow the published OctreeNCA code (``conv``, ``fc0``, ``fc1``) so that its
checkpoints map one to one. The step itself lives in the backends (``backends/torch_backend.py``
for the differentiable and the layer-wise path).
"""

from __future__ import annotations

import torch
from torch import nn


class BackboneNCA(nn.Module):
    """Weights of one level: depthwise perception conv, fc0 (2C->hidden), fc1 (hidden->C-in)."""

    def __init__(self, channels: int, hidden: int, input_channels: int, spatial_dims: int, kernel_size: int = 3):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.input_channels = input_channels
        self.kernel_size = kernel_size
        # Padding is applied by the step (reflect, with a size-1 axis fallback), not by the conv.
        self.conv = conv(channels, channels, kernel_size, padding=0, groups=channels, bias=True)
        self.fc0 = conv(2 * channels, hidden, 1, bias=True)
        self.fc1 = conv(hidden, channels - input_channels, 1, bias=False)
        with torch.no_grad():
            self.fc1.weight.zero_()

    @property
    def conv_bias(self) -> torch.Tensor:
        """The perception conv's bias (always present)."""
        return _bias(self.conv)

    @property
    def fc0_bias(self) -> torch.Tensor:
        """fc0's bias (always present)."""
        return _bias(self.fc0)

    @property
    def radius(self) -> int:
        return self.kernel_size // 2


def _bias(layer: nn.Module) -> torch.Tensor:
    bias = getattr(layer, "bias", None)
    if not isinstance(bias, torch.Tensor):
        raise ValueError(f"{type(layer).__name__} has no bias; the NCA's perception conv and fc0 need one")
    return bias
