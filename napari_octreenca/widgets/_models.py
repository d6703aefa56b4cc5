"""The list of models the widgets offer: bundled models, files the user opened, models trained here.

One process-wide :class:`ModelCatalog` is shared by all widgets, so a model trained in the
training widget appears in the segment and inspector widgets at once (``changed`` signal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psygnal import Signal

from ..nca.modelfile import load_model, read_config
from ..nca.octree import OctreeNCA
from ..resources import bundled_models


class ModelCatalog:
    """Model names -> files; ``changed`` fires when a model is added."""

    changed = Signal()

    def __init__(self) -> None:
        self._extra: dict[str, Path] = {}

    def models(self) -> dict[str, Path]:
        """Bundled models (by name) then the files added in this session."""
        out = dict(bundled_models())
        out.update(self._extra)
        return out

    def names(self) -> list[str]:
        return list(self.models())

    def add(self, path: str | Path, name: str | None = None) -> str:
        """Add a model file (validated by reading its header); returns the name it is listed under."""
        path = Path(path).resolve()
        read_config(path)  # raises ModelFileError with a clear message on a bad file
        base = name or path.name.removesuffix(".safetensors")
        name, k = base, 2
        while name in self.models() and self.models()[name] != path:
            name, k = f"{base} ({k})", k + 1
        self._extra[name] = path
        self.changed.emit()
        return name

    def path(self, name: str) -> Path:
        models = self.models()
        if name in models:
            return models[name]
        p = Path(name)
        if p.exists():
            return p
        from ..nca.errors import ModelFileError

        raise ModelFileError(f"model {name!r} is not in the list and is not a file; open a .safetensors model file")

    def load(self, name: str, device: str = "cpu") -> OctreeNCA:
        return load_model(self.path(name), device)


def follow_catalog(widget: Any, callback: Any) -> None:
    """Call ``callback`` when the catalog changes, for as long as the Qt ``widget`` lives."""
    CATALOG.changed.connect(callback)

    def _drop(*_: Any) -> None:
        try:
            CATALOG.changed.disconnect(callback)
        except (ValueError, RuntimeError):
            pass

    widget.native.destroyed.connect(_drop)


#: The catalog every widget uses.
CATALOG = ModelCatalog()

__all__ = ["ModelCatalog", "CATALOG", "follow_catalog"]
