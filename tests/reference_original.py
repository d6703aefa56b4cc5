"""A faithful transcription of the published OctreeNCA forward pass, used as the ground truth
for checkpoint import. It follows the original code's structure on purpose: ``BasicNCA2DFast``
style backbones (``conv`` with reflect padding, ``fc0``/``fc1`` 1x1 convs, ``cat`` per step,
Bernoulli fire mask), images resized with ``F.interpolate(size=...)`` (nearest) and the state
up-sampled with ``nn.Upsample(size=..., mode="nearest")``; level 0 is the finest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OriginalBackbone(nn.Module):
    def __init__(self, channel_n: int, hidden_size: int, input_channels: int, dims: int):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.input_channels = input_channels
        self.fc0 = conv(channel_n * 2, hidden_size, kernel_size=1)
        self.fc1 = conv(hidden_size, channel_n - input_channels, kernel_size=1, bias=False)
        self.conv = conv(
            channel_n, channel_n, kernel_size=3, stride=1, padding=1, padding_mode="reflect", groups=channel_n
        )

    def update(self, state: torch.Tensor, fire_rate: float) -> torch.Tensor:
        delta_state = self.conv(state)
        delta_state = torch.cat([state, delta_state], dim=1)
        delta_state = self.fc0(delta_state)
        delta_state = F.relu(delta_state)
        delta_state = self.fc1(delta_state)
        stochastic = delta_state.new_empty((delta_state.size(0), 1) + tuple(delta_state.shape[2:]))
        stochastic.bernoulli_(p=fire_rate)
        return state[:, self.input_channels :] + delta_state * stochastic

    def forward(self, state: torch.Tensor, steps: int, fire_rate: float) -> torch.Tensor:
        const_inputs = state[:, 0 : self.input_channels]
        for _ in range(steps):
            new_state = self.update(state, fire_rate)
            state = torch.cat([const_inputs, new_state], dim=1)
        return state


class OriginalOctreeNCA(nn.Module):
    def __init__(
        self, channel_n: int, hidden_size: int, input_channels: int, output_channels: int, dims: int, levels: int
    ):
        super().__init__()
        self.channel_n = channel_n
        self.input_channels = input_channels
        self.output_channels = output_channels
        self.backbone_ncas = nn.ModuleList(
            OriginalBackbone(channel_n, hidden_size, input_channels, dims) for _ in range(levels)
        )

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, octree_res: list[tuple[int, ...]], steps: list[int], fire_rate: float = 1.0
    ) -> torch.Tensor:
        """x: (B, C_in, *spatial) at octree_res[0]; returns the finest logits."""
        state = torch.zeros((x.shape[0], self.channel_n) + tuple(octree_res[-1]))
        state[:, : self.input_channels] = F.interpolate(x, size=octree_res[-1])
        for level in range(len(octree_res) - 1, -1, -1):
            if level < len(octree_res) - 1:
                state = nn.Upsample(size=octree_res[level], mode="nearest")(state)
                state[:, : self.input_channels] = F.interpolate(x, size=octree_res[level])
            state = self.backbone_ncas[level](state, steps[level], fire_rate)
        return state[:, self.input_channels : self.input_channels + self.output_channels]
