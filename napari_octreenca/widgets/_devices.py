"""Qt-free helpers for the widgets: the real compute devices, memory estimates, tiling choice."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..nca.config import ModelConfig

#: Share of the free memory a whole-image run may plan to use (the rest is headroom).
HEADROOM = 0.6


@dataclass(frozen=True)
class Device:
    """A device a run can use: ``id`` goes to the engine, ``label`` to the user."""

    id: str
    label: str
    free_bytes: int | None


def _fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def host_free_bytes() -> int | None:
    """Available host memory (``MemAvailable``), or None where it cannot be read."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def list_devices() -> list[Device]:
    """Every CUDA device (name, free memory) and the CPU, the fastest first."""
    out: list[Device] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            name = torch.cuda.get_device_name(i)
            try:
                free, total = torch.cuda.mem_get_info(i)
                label = f"cuda:{i} {name} ({_fmt(free)} free of {_fmt(total)})"
            except RuntimeError:  # e.g. a device busy in exclusive mode
                free, label = None, f"cuda:{i} {name}"
            out.append(Device(f"cuda:{i}", label, free))
    free = host_free_bytes()
    cores = os.cpu_count() or 1
    label = f"cpu ({cores} cores" + (f", {_fmt(free)} free)" if free is not None else ")")
    out.append(Device("cpu", label, free))
    return out


def free_bytes(device: str) -> int | None:
    """Free memory of ``device`` now (``cpu`` or ``cuda:N``)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        return int(torch.cuda.mem_get_info(idx)[0])
    return host_free_bytes()


def estimate_run_bytes(config: ModelConfig, spatial_shape: tuple[int, ...], dtype: str = "float32", runs: int = 1) -> int:
    """Peak memory of a whole-image run: two state buffers and the image pyramid at the finest
    level, the slab scratch, and the outputs (logits, plus per-run logits for an ensemble)."""
    cells = math.prod(spatial_shape)
    b = 2 if dtype in ("bfloat16", "bf16") else 4
    pyramid = 1.0 + sum(1.0 / math.prod(math.prod(f) for f in config.factors[: i + 1]) for i in range(len(config.factors)))
    state = 2 * config.update_channels * cells * b
    image = config.input_channels * cells * b * pyramid + config.input_channels * cells * 4  # + float32 input
    scratch = 64 * 1024**2
    outputs = config.output_channels * cells * 4 * (runs + 2)
    return int(state + image + scratch + outputs)


@dataclass(frozen=True)
class TilingChoice:
    """Whether a run is tiled, with which tile edge, and why (shown before the run)."""

    tiled: bool
    tile: int | None
    estimate: int
    free: int | None
    text: str


def choose_tiling(
    config: ModelConfig,
    spatial_shape: tuple[int, ...],
    device: str,
    *,
    dtype: str = "float32",
    runs: int = 1,
    mode: str = "auto",
    free: int | None = None,
) -> TilingChoice:
    """Pick whole-image or tiled from the memory estimate (``mode``: auto, whole, tiled)."""
    est = estimate_run_bytes(config, spatial_shape, dtype, runs)
    free = free_bytes(device) if free is None else free
    nd = len(spatial_shape)
    if mode == "whole" or (mode == "auto" and (free is None or est <= HEADROOM * free)):
        room = f" of {_fmt(free)} free" if free is not None else ""
        return TilingChoice(False, None, est, free, f"whole image: about {_fmt(est)}{room} on {device}")
    # Tiled: the tile's memory scales with its cells; shrink from the default until it fits.
    from ..run.tiling import default_tile

    tile = default_tile(nd)
    budget = HEADROOM * free if free is not None else est
    while tile > 32 and estimate_run_bytes(config, (tile,) * nd, dtype, runs) * 2 > budget:
        tile //= 2
    tile = min(tile, max(spatial_shape))
    per_tile = estimate_run_bytes(config, tuple(min(tile, n) for n in spatial_shape), dtype, runs) * 2
    n_tiles = math.prod(math.ceil(n / tile) for n in spatial_shape)
    room = f" ({_fmt(free)} free)" if free is not None else ""
    why = "chosen" if mode == "tiled" else f"whole image would need {_fmt(est)}{room}"
    return TilingChoice(True, tile, est, free,
                        f"tiled: {n_tiles} tiles of {tile} cells, about {_fmt(per_tile)} each on {device} ({why})")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device out-of-memory error (torch raises a few kinds)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
    )


__all__ = ["Device", "list_devices", "free_bytes", "estimate_run_bytes", "choose_tiling", "TilingChoice",
           "is_out_of_memory", "host_free_bytes"]
