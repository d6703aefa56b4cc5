"""Atomic file writes: a reader never sees a half-written model, label file or cubin."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any], suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a hidden temporary file beside ``path``, then rename it into place.

    ``suffix`` ends the temporary name, for writers that pick the format from it (``.nii.gz``).
    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".part" + suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
