"""The octree of resolutions: resizing between levels and the OctreeNCA module.

Resizing is defined so that every output cell depends on a fixed, local set of input cells
(needed for exact tiling): ``nearest`` down-sampling keeps every ``f``-th cell (what the published
code's ``F.interpolate`` does for divisible sizes), ``average`` takes the mean of each ``f``-block
(partial blocks at the far border average only the cells that exist); up-sampling repeats each
cell ``f`` times and crops to the finer level's exact size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .firemask import fire_mask_torch
from .step import step_differentiable
from .weights import BackboneNCA


def downsample(x: torch.Tensor, factor: tuple[int, ...], mode: str) -> torch.Tensor:
    """Down-sample the spatial axes of ``(B, C, *spatial)`` by integer ``factor`` (ceil sizes)."""
    if all(f == 1 for f in factor):
        return x
    if mode == "nearest":
        return x[(slice(None), slice(None)) + tuple(slice(None, None, f) for f in factor)].contiguous()
    pool = F.avg_pool2d if len(factor) == 2 else F.avg_pool3d
    dtype = x.dtype
    # A level smaller than its factor is one partial block: the kernel must not exceed the input.
    kernel = tuple(min(f, n) for f, n in zip(factor, x.shape[2:]))
    y = pool(x.float(), kernel_size=kernel, stride=factor, ceil_mode=True, count_include_pad=False)
    return y.to(dtype) if dtype.is_floating_point else y


def upsample(x: torch.Tensor, factor: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
    """Nearest up-sampling by integer ``factor``, cropped to the finer level's ``size``."""
    for ax, (f, n) in enumerate(zip(factor, size)):
        if f != 1:
            x = x.repeat_interleave(f, dim=2 + ax)
        if n < x.shape[2 + ax]:  # a no-op narrow would still cost its backward a full-size zero fill
            x = x.narrow(2 + ax, 0, n)
    return x.contiguous()


def image_pyramid(image: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    """The image at every level (finest first)."""
    pyramid = [image]
    for f in config.factors:
        pyramid.append(downsample(pyramid[-1], f, config.resize))
    return pyramid


@dataclass(frozen=True)
class Patch:
    """Where a training patch lies at the finest level (start and size per spatial axis)."""

    start: tuple[int, ...]
    size: tuple[int, ...]

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.size))


class OctreeNCA(nn.Module):
    """One backbone NCA per level plus the configuration that ties them into an octree."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.levels = nn.ModuleList(
            BackboneNCA(config.channels, config.hidden, config.input_channels, config.spatial_dims, config.kernel_size)
            for _ in range(config.levels)
        )

    def level_nca(self, level: int) -> BackboneNCA:
        """The backbone NCA of ``level`` (0 = finest)."""
        return cast(BackboneNCA, self.levels[level])

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward_train(
        self,
        image: torch.Tensor,
        seeds: list[int],
        patch_size: tuple[int, ...] | None = None,
        generator: torch.Generator | None = None,
        fire_rate: float | None = None,
        level_steps: LevelSteps | None = None,
    ) -> tuple[torch.Tensor, Patch]:
        """Differentiable forward pass over a batch ``(B, in, *spatial)`` of normalised images.

        With ``patch_size`` the two finest levels run only on a random patch (the published 3D
        training scheme): gradients still reach every coarser level through the crop. Returns
        the finest logits and where they lie. ``level_steps`` runs each level's steps (default
        :func:`reference_level_steps`; the fused CPU trainer passes its own, equal within rounding).
        """
        level_steps = level_steps or reference_level_steps
        cfg = self.config
        fire_rate = cfg.fire_rate if fire_rate is None else fire_rate
        spatial = tuple(image.shape[2:])
        shapes = cfg.level_shapes(spatial)
        pyramid = image_pyramid(image, cfg)
        state = image.new_zeros((image.shape[0], cfg.update_channels) + shapes[-1])
        origin: tuple[int, ...] = (0,) * len(spatial)
        use_patch = patch_size is not None and any(p < s for p, s in zip(patch_size, spatial))
        patch_level = min(1, cfg.levels - 1)
        in_patch = False
        for level in range(cfg.levels - 1, -1, -1):
            if level < cfg.levels - 1:
                f = cfg.factors[level]
                if in_patch:
                    # The up-sampled patch covers origin*f onwards; clip it to the level.
                    origin = tuple(o * fi for o, fi in zip(origin, f))
                    size = tuple(min(n * fi, s - o) for n, fi, s, o in zip(state.shape[2:], f, shapes[level], origin))
                    state = _crop(upsample_raw(state, f), (0,) * len(f), size)
                else:
                    state = upsample(state, f, shapes[level])
            if use_patch and not in_patch and level == patch_level:
                assert patch_size is not None
                origin, size = _random_patch(shapes, level, patch_size, cfg, generator)
                state = _crop(state, origin, size)
                in_patch = True
            img = _crop(pyramid[level], origin, tuple(state.shape[2:])) if in_patch else pyramid[level]
            nca = cast(BackboneNCA, self.levels[level])
            state = level_steps(nca, img, state, level, cfg.steps[level], seeds, origin, fire_rate)
        return state[:, : cfg.output_channels], Patch(origin, tuple(state.shape[2:]))


#: ``(nca, image, state, level, steps, seeds, origin, fire_rate) -> state``: a level's steps in training.
LevelSteps = Callable[
    [BackboneNCA, torch.Tensor, torch.Tensor, int, int, Sequence[int], tuple[int, ...], float], torch.Tensor
]


def reference_level_steps(
    nca: BackboneNCA,
    img: torch.Tensor,
    state: torch.Tensor,
    level: int,
    steps: int,
    seeds: Sequence[int],
    origin: tuple[int, ...],
    fire_rate: float,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """``steps`` differentiable reference steps (autograd through ``step_differentiable``).

    Sample b fires with the hashed mask of seeds[b] at global ``origin``; ``callback(step, state)``
    runs after every step.
    """
    for step in range(steps):
        mask = None
        if fire_rate < 1.0:
            masks = [
                fire_mask_torch(tuple(state.shape[2:]), origin, s, level, step, fire_rate, state.device) for s in seeds
            ]
            mask = torch.stack(masks).unsqueeze(1).to(state.dtype)
        state = step_differentiable(nca, img, state, mask)
        if callback is not None:
            callback(step, state)
    return state


def upsample_raw(x: torch.Tensor, factor: tuple[int, ...]) -> torch.Tensor:
    """Nearest up-sampling by ``factor`` without cropping."""
    for ax, f in enumerate(factor):
        if f != 1:
            x = x.repeat_interleave(f, dim=2 + ax)
    return x


def _crop(x: torch.Tensor, start: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
    for ax, (s, n) in enumerate(zip(start, size)):
        if s or n < x.shape[2 + ax]:  # as in upsample: no no-op narrows in the graph
            x = x.narrow(2 + ax, s, n)
    return x


def _random_patch(
    shapes: list[tuple[int, ...]],
    level: int,
    patch_size: tuple[int, ...],
    cfg: ModelConfig,
    generator: torch.Generator | None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A random patch at ``level`` whose up-sampling covers ``patch_size`` cells at level 0."""
    f = cfg.factors[0] if level == 1 else (1,) * cfg.spatial_dims
    size = tuple(min(s, -(-p // fi)) for p, fi, s in zip(patch_size, f, shapes[level]))
    start = tuple(
        int(torch.randint(0, s - n + 1, (1,), generator=generator).item()) for s, n in zip(shapes[level], size)
    )
    return start, size
