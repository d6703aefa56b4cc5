"""The NCA itself, lowest layer: config and presets, weights, fire mask, the step, packing, model files.

Everything above (backends, the run layer, formats, shells) imports from here; nothing here
imports from above.
"""

from .config import PRESETS, ModelConfig, Normalization, preset
from .errors import BackendUnavailable, Cancelled, ConfigError, InputError, ModelFileError, OctreeNCAError
from .modelfile import import_original, load_model, read_config, save_model
from .octree import OctreeNCA
from .registry import new_model, open_model, resolve_model_path

__all__ = [
    "PRESETS",
    "ModelConfig",
    "Normalization",
    "preset",
    "OctreeNCA",
    "save_model",
    "load_model",
    "read_config",
    "import_original",
    "open_model",
    "new_model",
    "resolve_model_path",
    "OctreeNCAError",
    "ConfigError",
    "InputError",
    "ModelFileError",
    "Cancelled",
    "BackendUnavailable",
]
