"""Compute backends behind one interface: ``get_backend("auto" | "torch" | ...)``.

The optional backends (fused CPU, fused CUDA) are imported on first use and registered in
``BACKENDS`` under their ``name``; ``auto`` picks the first available one in ``AUTO_ORDER`` that
supports the device and dtype.
"""

from __future__ import annotations

import importlib
import logging

import torch

from ..nca.errors import BackendUnavailable
from .base import Backend, LevelRun, StepCallback
from .torch_backend import LayerwiseTorchBackend, TorchBackend

log = logging.getLogger(__name__)

BACKENDS: dict[str, type[Backend]] = {"torch": TorchBackend, "torch-layerwise": LayerwiseTorchBackend}
#: Fastest first; names not registered are skipped.
AUTO_ORDER: list[str] = ["cuda", "cpu-fused", "torch"]
_warned: set[str] = set()


def _register_optional() -> None:
    """Import the optional backends; each registers itself only if its module imports."""
    for modname in ("cpu_fused", "cuda.backend"):
        try:
            module = importlib.import_module(f"{__name__}.{modname}")
        except ImportError as e:
            # A missing optional dependency (numba, cuda-bindings) only hides that backend; a
            # broken import inside this package is a bug and must surface.
            if (e.name or "").startswith(__package__ or "napari_octreenca"):
                raise
            log.debug("backend module %s not importable: %s", modname, e)
            continue
        BACKENDS.setdefault(module.BACKEND.name, module.BACKEND)


def get_backend(name: str = "auto", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Backend:
    """Return a backend instance by name; ``auto`` picks the fastest available for device/dtype."""
    _register_optional()
    device = torch.device(device)
    if name != "auto":
        if name not in BACKENDS:
            raise BackendUnavailable(f"unknown backend {name!r}; choose one of {['auto', *BACKENDS]}")
        cls = BACKENDS[name]
        ok, why = cls.availability()
        if not ok:
            raise BackendUnavailable(f"backend {name!r} is not available: {why}")
        backend = cls()
        if not backend.supports(device, dtype):
            raise BackendUnavailable(f"backend {name!r} does not run {dtype} on {device}")
        return backend
    for candidate in AUTO_ORDER:
        found = BACKENDS.get(candidate)
        if found is None:
            continue
        cls = found
        ok, why = cls.availability()
        if not ok:
            if candidate not in _warned and why:
                log.info("backend %s unavailable (%s); falling back", candidate, why)
                _warned.add(candidate)
            continue
        backend = cls()
        if backend.supports(device, dtype):
            return backend
    return TorchBackend()


__all__ = ["Backend", "BACKENDS", "LevelRun", "StepCallback", "get_backend", "TorchBackend"]
