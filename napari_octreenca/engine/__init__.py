"""The Qt-free OctreeNCA engine: config, model, octree, inference, training, model files."""

from .config import PRESETS, ModelConfig, Normalization, preset
from .errors import BackendUnavailable, Cancelled, ConfigError, InputError, ModelFileError, OctreeNCAError
from .inference import Segmentation, StepInfo, labels_from_logits, run_octree, segment
from .modelfile import import_original, load_model, read_config, save_model
from .octree import OctreeNCA
from .registry import new_model, open_model, resolve_model_path

__all__ = [
    "PRESETS", "ModelConfig", "Normalization", "preset", "OctreeNCA", "segment", "run_octree",
    "Segmentation", "StepInfo", "labels_from_logits", "save_model", "load_model", "read_config",
    "import_original", "open_model", "new_model", "resolve_model_path", "OctreeNCAError",
    "ConfigError", "InputError", "ModelFileError", "Cancelled", "BackendUnavailable",
]
