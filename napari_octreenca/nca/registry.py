"""Resolve a model by bundled name, file path or preset (untrained, for training)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..resources import bundled_models
from .config import PRESETS
from .errors import ModelFileError
from .modelfile import load_model
from .octree import OctreeNCA


def resolve_model_path(name_or_path: str | Path) -> Path:
    """Path of a bundled model name or an existing file; a clear error otherwise."""
    p = Path(name_or_path)
    if p.exists():
        return p
    models = bundled_models()
    if str(name_or_path) in models:
        return models[str(name_or_path)]
    hint = f"bundled models: {', '.join(models) or 'none installed'}"
    raise ModelFileError(f"model {str(name_or_path)!r} is neither a file nor a bundled model ({hint})")


def open_model(name_or_path: str | Path, device: str | torch.device = "cpu") -> OctreeNCA:
    """Load a bundled model by name, or a model file by path."""
    return load_model(resolve_model_path(name_or_path), device)


def new_model(preset_name: str, /, seed: int = 0, **changes: object) -> OctreeNCA:
    """A freshly initialised (untrained) model from a preset; ``seed`` fixes its weights without
    touching the global torch random state."""
    from .config import preset

    if preset_name not in PRESETS:
        raise ModelFileError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    # Seed a private generator: the caller's global torch RNG state stays as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return OctreeNCA(preset(preset_name, **changes))
