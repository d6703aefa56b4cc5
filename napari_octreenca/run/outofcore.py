"""Out-of-core storage for tiled runs: chunked zarr arrays plus per-tile completion markers.

A tiled run keeps every level state that does not fit in memory in a zarr array whose chunks
are the run's tiles, so each tile is written as whole chunks (zarr's local store renames a
temporary file into place: a chunk is either complete or absent). After a tile's chunks are
written, an empty marker file ``progress/<name>`` records it as done; a rerun skips tiles that
have a marker, so an interrupted run resumes where it stopped. ``meta.json`` holds a
fingerprint of everything that determines the result; a store made by a different run is
refused (or cleared, when asked) rather than silently mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..nca.errors import InputError

if TYPE_CHECKING:
    import zarr


def _zarr():
    """zarr, imported on first use: whole-image runs (and the GPU check) work without it."""
    try:
        import zarr
    except ImportError:
        raise InputError("tiled and out-of-core runs need zarr; pip install 'zarr>=3'") from None
    return zarr


#: zarr cannot hold bfloat16: such tensors are stored as their raw 16 bits.
_BITS = {torch.bfloat16: np.int16}


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """Tensor -> numpy (bfloat16 as its int16 bit pattern)."""
    t = t.detach().cpu().contiguous()
    if t.dtype in _BITS:
        return t.view(torch.int16).numpy()
    return t.numpy()


def numpy_to_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`tensor_to_numpy`."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype in _BITS:
        return t.view(dtype)
    return t.to(dtype)


def storage_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a tensor of ``dtype`` is stored as."""
    if dtype in _BITS:
        return np.dtype(_BITS[dtype])
    return np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)


def fingerprint(parts: dict[str, Any]) -> str:
    """Stable hash of the JSON-able ``parts`` (what determines a run's result)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights (names, shapes and float32 bytes)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class WorkStore:
    """A zarr group on disk (or in memory) with completion markers for a resumable run."""

    def __init__(self, root: str | Path | None, key: str, *, restart: bool = False):
        self.root = Path(root) if root is not None else None
        self._done: set[str] = set()
        zarr = _zarr()
        if self.root is None:
            self.group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
            self.group.attrs["fingerprint"] = key
            return
        meta = self.root / "meta.json"
        if self.root.exists() and meta.exists():
            old = json.loads(meta.read_text()).get("fingerprint")
            if old != key:
                if not restart:
                    raise InputError(
                        f"the work folder {self.root} belongs to a different run (other model, input, "
                        "seed or settings); delete it or pass restart=True to start over"
                    )
                remove_work_folder(self.root)
        elif self.root.exists() and any(self.root.iterdir()) and not (self.root / "zarr.json").exists():
            raise InputError(f"{self.root} exists and is not an octreenca work folder; choose another path")
        elif self.root.exists():
            # Markers without a fingerprint (a removal killed halfway) vouch for nothing: drop them.
            shutil.rmtree(self.root / "progress", ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "progress").mkdir(exist_ok=True)
        self.group = zarr.open_group(zarr.storage.LocalStore(str(self.root)), mode="a")
        if not meta.exists():
            _atomic_text(meta, json.dumps({"fingerprint": key}))

    # -- arrays ---------------------------------------------------------------------------
    def array(
        self, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any, fill_value: Any = 0
    ) -> zarr.Array:
        """Open the array ``name``, creating it (empty) when missing."""
        if name in self.group:
            arr = self.group[name]
            assert isinstance(arr, _zarr().Array)
            if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != np.dtype(dtype):
                raise InputError(f"work array {name} has shape {arr.shape}/{arr.dtype}, expected {shape}/{dtype}")
            return arr
        chunks = tuple(max(1, min(c, s)) for c, s in zip(chunks, shape))
        return self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value)

    # -- progress markers -------------------------------------------------------------------
    def is_done(self, name: str) -> bool:
        if self.root is None:
            return name in self._done
        return (self.root / "progress" / name).exists()

    def mark_done(self, name: str) -> None:
        """Record ``name`` as complete (call after its chunks are written)."""
        if self.root is None:
            self._done.add(name)
            return
        (self.root / "progress" / name).touch()

    def done_count(self, prefix: str = "") -> int:
        if self.root is None:
            return sum(1 for n in self._done if n.startswith(prefix))
        return sum(1 for p in (self.root / "progress").iterdir() if p.name.startswith(prefix))

    def remove(self) -> None:
        """Delete the work folder (after a finished run)."""
        if self.root is not None and self.root.exists():
            remove_work_folder(self.root)


def remove_work_folder(root: str | Path) -> None:
    """Delete a work folder, completion markers first, then the fingerprint, then the data.

    Killed at any point, what is left never claims a tile whose chunks are gone: markers go
    before the chunks they vouch for, and a folder without ``meta.json`` is trusted for nothing.
    """
    root = Path(root)
    shutil.rmtree(root / "progress", ignore_errors=True)
    try:
        (root / "meta.json").unlink()
    except FileNotFoundError:
        pass
    shutil.rmtree(root, ignore_errors=True)


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
