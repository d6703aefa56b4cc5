"""The interface every compute backend implements.

The engine keeps, per level, the compact image ``(B, in, *spatial)`` (normalised, never changed)
and the updatable state ``(B, C - in, *spatial)`` = ``[logits | hidden]``. A backend advances the
state by ``steps`` NCA steps of one level. ``origin`` is the global coordinate of the first cell
(the fire mask hashes global coordinates, so tiles and whole images agree).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..nca.firemask import MASK32, base_key, threshold
from ..nca.weights import BackboneNCA

#: Called after every step as ``callback(step_index, state)``; may raise ``Cancelled``.
StepCallback = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class LevelRun:
    """What a backend needs to know about the level it runs."""

    level: int
    steps: int
    seed: int
    fire_rate: float
    #: Global coordinate of the block's first cell; () = all zeros. Backends pad every block
    #: border with reflect: exact at image borders, and inside a tile's halo the error never
    #: reaches the tile's core (a halo of steps x radius cells), so tiles need nothing more.
    origin: tuple[int, ...] = ()


class Backend(ABC):
    """A way to run NCA steps (torch layer-wise, fused CPU, fused CUDA)."""

    name: str = "base"

    @classmethod
    @abstractmethod
    def availability(cls) -> tuple[bool, str]:
        """(available, reason if not)."""

    @abstractmethod
    def run_level(
        self,
        nca: BackboneNCA,
        image: torch.Tensor,
        state: torch.Tensor,
        run: LevelRun,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Advance ``state`` by ``run.steps`` steps; returns the new state (may reuse buffers)."""

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this backend runs tensors of ``dtype`` on ``device``."""
        return True


def fire_params(run: LevelRun, step: int) -> tuple[int, int]:
    """(key, threshold) for one step: the cell fires when ``mix(key, coords) >> 8 < threshold``."""
    return base_key(run.seed, run.level, step) & MASK32, threshold(run.fire_rate)
