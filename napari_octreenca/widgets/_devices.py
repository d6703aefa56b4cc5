"""Qt-free helper for the widgets: the real compute devices (memory and tiling: ``run.planner``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..run.planner import fmt_bytes, host_free_bytes


@dataclass(frozen=True)
class Device:
    """A device a run can use: ``id`` goes to the engine, ``label`` to the user."""

    id: str
    label: str
    free_bytes: int | None


def list_devices() -> list[Device]:
    """Every CUDA device (name, free memory) and the CPU, the fastest first."""
    out: list[Device] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            name = torch.cuda.get_device_name(i)
            try:
                free, total = torch.cuda.mem_get_info(i)
                label = f"cuda:{i} {name} ({fmt_bytes(free)} free of {fmt_bytes(total)})"
            except RuntimeError:  # e.g. a device busy in exclusive mode
                free, label = None, f"cuda:{i} {name}"
            out.append(Device(f"cuda:{i}", label, free))
    free = host_free_bytes()
    cores = os.cpu_count() or 1
    label = f"cpu ({cores} cores" + (f", {fmt_bytes(free)} free)" if free is not None else ")")
    out.append(Device("cpu", label, free))
    return out


__all__ = ["Device", "list_devices"]
