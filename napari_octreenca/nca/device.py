"""Device names -> ``torch.device``, with a one-line error when the device is not there."""

from __future__ import annotations

import torch

from .errors import BackendUnavailable


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine, or ``BackendUnavailable``.

    Without this, ``--device cuda`` on a machine without a GPU fails deep inside torch with an
    AssertionError ("Torch not compiled with CUDA enabled") instead of saying what to do.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BackendUnavailable(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device!r}: no CUDA GPU is available to PyTorch here; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise BackendUnavailable(
                f"device {device!r}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})"
            )
    elif dev.type not in ("cpu", "meta"):
        backend = getattr(torch.backends, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise BackendUnavailable(f"device {device!r} is not available here; use --device cpu")
    return dev
