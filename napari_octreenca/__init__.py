"""napari-octreenca: segment very large medical images with OctreeNCA.

Layers, lowest first: ``nca`` (the automaton itself), ``backends`` (step implementations),
``io`` (file formats), ``run`` (octree loop, planner, tiling, training), then the shells
(``cli``, ``widgets``, ``napari_io``). See ``docs/architecture.md``.

The public API below is imported lazily, so importing the package (as napari does when it asks
this plugin's reader about a file) loads neither torch nor numba.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_API = {
    "PRESETS": "nca.config",
    "ModelConfig": "nca.config",
    "Normalization": "nca.config",
    "preset": "nca.config",
    "OctreeNCAError": "nca.errors",
    "ConfigError": "nca.errors",
    "InputError": "nca.errors",
    "ModelFileError": "nca.errors",
    "Cancelled": "nca.errors",
    "BackendUnavailable": "nca.errors",
    "OctreeNCAWarning": "nca.errors",
    "BatchError": "run.pipeline",
    "plan_run": "run.planner",
    "RunOptions": "run.planner",
    "InputGeometry": "run.planner",
    "execute": "run.execute",
    "OctreeNCA": "nca.octree",
    "save_model": "nca.modelfile",
    "load_model": "nca.modelfile",
    "read_config": "nca.modelfile",
    "import_original": "nca.modelfile",
    "open_model": "nca.registry",
    "new_model": "nca.registry",
    "resolve_model_path": "nca.registry",
    "segment": "run.inference",
    "run_octree": "run.inference",
    "Segmentation": "run.inference",
    "StepInfo": "run.inference",
    "labels_from_logits": "run.inference",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_octreenca' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
