"""Loading the engine's compiled kernels before the first real run.

The first segmentation of a process loads numba's cached machine code for the fused kernels and
runs torch's first-use setup. That work holds Python's global lock for stretches of 70-200 ms,
which freezes a GUI thread waiting on it: in the napari plugin it was the longest stall of a first
run. :func:`warm_up` does it once, ahead of time, on an image of a few pixels; the docks call it
from a worker thread when they open.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from ..nca.config import preset
from ..nca.octree import OctreeNCA
from .inference import segment

_lock = threading.Lock()
_done: dict[str, float] = {}


def warm_up(device: str = "cpu") -> float:
    """Run a tiny segmentation on ``device`` with the default backend, once per process.

    Returns the seconds it took (0.0 when an earlier call already did it). Thread-safe: a second
    caller waits for the first. Uses a random-weight model of the pathology preset with one step
    a level; the kernels it loads are the ones every model uses (2D and 3D share them).
    """
    with _lock:
        if device in _done:
            return 0.0
        t0 = time.perf_counter()
        cfg = preset("pathology", steps=(1, 1), factors=((2, 2),))
        gen = torch.Generator().manual_seed(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = OctreeNCA(cfg).eval()
        image = (torch.rand((8, 8, cfg.input_channels), generator=gen).numpy() * 255).astype(np.uint8)
        # Two runs: the ensemble's median and spread (the docks' default) take their own paths.
        segment(model, image, axes="YXC", device=device, runs=2)
        _done[device] = time.perf_counter() - t0
        return _done[device]


def warm_up_training(device: str = "cpu") -> float:
    """One training iteration on an image of a few pixels, once per process: loads the training
    step's kernels (the fused CPU backward: a first training run's GUI stall was 150 ms without).

    Returns the seconds it took (0.0 after the first call); thread-safe like :func:`warm_up`.
    """
    from .training import TrainConfig, TrainPair, train

    key = f"train:{device}"
    with _lock:
        if key in _done:
            return 0.0
        t0 = time.perf_counter()
        cfg = preset("pathology", steps=(1, 1), factors=((2, 2),)).replace(output_channels=1, class_names=("a",))
        image = np.zeros((8, 8, cfg.input_channels), np.uint8)
        labels = np.zeros((8, 8), np.uint8)
        labels[2:6, 2:6] = 1
        with torch.random.fork_rng(devices=[]):  # train() seeds torch's global generator
            train(cfg, [TrainPair(image, labels, "YXC")], TrainConfig(iterations=1, batch_size=1), device=device)
        _done[key] = time.perf_counter() - t0
        return _done[key]


def warmed_up(device: str = "cpu", training: bool = False) -> bool:
    """Whether :func:`warm_up` (or :func:`warm_up_training`) has run for ``device`` in this process."""
    return (f"train:{device}" if training else device) in _done


__all__ = ["warm_up", "warm_up_training", "warmed_up"]
