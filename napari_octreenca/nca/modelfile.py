"""Safe model files: safetensors weights with the JSON config in the header; never pickle.

A model file is one ``.safetensors`` file. Its ``__metadata__`` holds ``format`` ("octreenca"),
``format_version`` and ``config`` (the JSON of :class:`ModelConfig`, including provenance and the
model card facts). ``octreenca info MODEL --json`` prints that JSON.

Checkpoints of the published OctreeNCA code (``.pth`` state dicts) are imported with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..fileutil import atomic_write
from .config import FORMAT_VERSION, ORIGINAL_NORMALIZATIONS, ModelConfig, Normalization, preset
from .device import check_device
from .errors import ConfigError, ModelFileError
from .octree import OctreeNCA

FORMAT_NAME = "octreenca"
SUPPORTED_VERSIONS = {1}


def save_model(model: OctreeNCA, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """Save ``model`` to ``path`` (a ``.safetensors`` file), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ModelFileError(f"refusing to save: weight {name} contains NaN or inf (training diverged?)")
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(model.config.to_dict()),
    }
    if extra:
        meta["extra"] = json.dumps(extra)
    atomic_write(path, lambda tmp: _save_tensors(save_file, tensors, tmp, meta))
    return path


def _save_tensors(save_file: Any, tensors: dict[str, torch.Tensor], tmp: Path, meta: dict[str, str]) -> None:
    """``save_file`` with its own error type (SafetensorError, e.g. on a full disk) as an OSError."""
    try:
        save_file(tensors, str(tmp), metadata=meta)
    except OSError:
        raise
    except Exception as exc:  # safetensors' Rust errors carry the OS error only as text
        text = str(exc)
        code = errno.ENOSPC if "No space left" in text else (errno.EACCES if "ermission denied" in text else errno.EIO)
        raise OSError(code, os.strerror(code) if code != errno.EIO else text.splitlines()[0]) from None


def read_header(path: str | os.PathLike[str]) -> dict[str, str]:
    """The safetensors metadata of a model file, validated for format and version."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder; give the model's .safetensors file")
    if path.suffix in (".pth", ".pt", ".ckpt"):
        raise ModelFileError(
            f"{path} is a PyTorch checkpoint; import it first with `octreenca import {path} OUT.safetensors`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ModelFileError(
            f"{path} is not a readable safetensors model file (corrupt or truncated?): {exc}"
        ) from None
    if meta.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} is a safetensors file but not an OctreeNCA model (no format={FORMAT_NAME!r})")
    try:
        version = int(meta.get("format_version", "-1"))
    except ValueError:
        version = -1
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(
            f"{path} has model format version {meta.get('format_version')!r}; this napari-octreenca "
            f"reads versions {sorted(SUPPORTED_VERSIONS)}: upgrade napari-octreenca or re-export the model"
        )
    return meta


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The model config stored in a model file (no weights loaded)."""
    meta = read_header(path)
    try:
        return ModelConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: the model config in the header is missing or not JSON ({exc})") from None
    except ConfigError as exc:
        raise ModelFileError(f"{path}: invalid model config: {exc}") from None


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> OctreeNCA:
    """Load a model file; every tensor is checked against the config (names, shapes, finite)."""
    from safetensors.torch import load_file

    config = read_config(path)
    device = check_device(device)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:
        raise ModelFileError(f"{path}: the weights cannot be read (corrupt or truncated file?): {exc}") from None
    model = OctreeNCA(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelFileError(
            f"{path}: weights do not match the config (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ModelFileError(
                f"{path}: weight {name} has shape {tuple(t.shape)}, the config needs {tuple(expected[name].shape)}"
            )
        if not t.dtype.is_floating_point or not bool(torch.isfinite(t).all()):
            raise ModelFileError(f"{path}: weight {name} is not finite floating point data")
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.to(device).eval()


def read_extra(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The optional ``extra`` JSON of a model file (e.g. the model card's metrics)."""
    meta = read_header(path)
    return json.loads(meta["extra"]) if "extra" in meta else {}


def original_normalization(name: str | Normalization) -> Normalization:
    """A normalisation of the published code by name (see ``ORIGINAL_NORMALIZATIONS``), or as given."""
    if isinstance(name, Normalization):
        return name
    try:
        return ORIGINAL_NORMALIZATIONS[name]
    except KeyError:
        raise ModelFileError(
            f"unknown normalisation {name!r}; choose one of {', '.join(ORIGINAL_NORMALIZATIONS)}"
        ) from None


def with_run_settings(
    model: OctreeNCA, normalization: str | Normalization | None = None, fire_rate: float | None = None
) -> OctreeNCA:
    """``model`` with its config's input normalisation and/or fire rate replaced (for one run)."""
    changes: dict[str, Any] = {}
    if normalization is not None:
        changes["normalization"] = original_normalization(normalization)
    if fire_rate is not None:
        changes["fire_rate"] = float(fire_rate)
    if changes:
        try:
            model.config = model.config.replace(**changes)
        except ConfigError as exc:
            raise ModelFileError(f"cannot run the model with {changes}: {exc}") from None
    return model


def import_original(
    path: str | os.PathLike[str],
    base: str | ModelConfig = "pathology",
    **changes: Any,
) -> OctreeNCA:
    """Convert a checkpoint of the published OctreeNCA code into an OctreeNCA model.

    The checkpoint's keys are ``backbone_ncas.{level}.conv.weight`` etc. (level 0 = finest). The
    architecture (channels, hidden size, input channels, dimensionality, levels) is read from the
    tensor shapes; factors, steps, fire rate and normalisation come from ``base`` (a preset or a
    config) and ``changes``; ``normalization`` may be a name of ``ORIGINAL_NORMALIZATIONS``
    (e.g. ``"imagenet"`` for the original 2D RGB datasets). Image resizing is set to ``nearest``
    as in the original code, and 3D models see volumes in the original's nibabel ``(i, j, k)``
    order (``axes="XYZ"``; pass ``axes=`` to change it).
    """
    path = Path(path)
    if "normalization" in changes:
        changes["normalization"] = original_normalization(changes["normalization"])
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"{path}: not a loadable weights-only PyTorch checkpoint: {exc}") from None
    sd = obj
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ModelFileError(f"{path}: expected a state_dict, got {type(sd).__name__}")
    prefix = "backbone_ncas."
    # Tolerate wrappers such as "octree_nca.backbone_ncas.0..." or "module.backbone_ncas.0...".
    sd = {k[k.index(prefix) :]: v for k, v in sd.items() if prefix in k}
    levels = sorted({int(k.split(".")[1]) for k in sd})
    if not levels or levels != list(range(len(levels))):
        raise ModelFileError(f"{path}: no backbone_ncas.<level> weights found (levels {levels})")
    try:
        conv_w = sd[f"{prefix}0.conv.weight"]
        fc0_w = sd[f"{prefix}0.fc0.weight"]
        fc1_w = sd[f"{prefix}0.fc1.weight"]
    except KeyError as exc:
        raise ModelFileError(f"{path}: missing {exc.args[0]}") from None
    channels, hidden = int(conv_w.shape[0]), int(fc0_w.shape[0])
    spatial_dims = conv_w.dim() - 2
    input_channels = channels - int(fc1_w.shape[0])
    kernel = int(conv_w.shape[-1])
    cfg = preset(base) if isinstance(base, str) else base
    n_levels = len(levels)
    factors = cfg.factors
    steps = cfg.steps
    if len(steps) != n_levels:
        factors = (factors[0] if factors else (2,) * spatial_dims,) * (n_levels - 1)
        steps = tuple(([10] * (n_levels - 1)) + [20])
    params: dict[str, Any] = dict(
        spatial_dims=spatial_dims,
        input_channels=input_channels,
        channels=channels,
        hidden=hidden,
        kernel_size=kernel,
        factors=factors,
        steps=steps,
        resize="nearest",
        provenance={"imported_from": path.name, "source": "published OctreeNCA code"},
    )
    # The published code runs 3D volumes in nibabel's (i, j, k) array order, which this package's
    # readers call (X, Y, Z); 2D images in (row, column) = (Y, X) order.
    params["axes"] = "YX" if spatial_dims == 2 else "XYZ"
    if spatial_dims != cfg.spatial_dims:
        if len(factors[0]) != spatial_dims:
            params["factors"] = tuple((2,) * spatial_dims for _ in range(n_levels - 1))
    params.update(changes)
    out = int(params.get("output_channels", cfg.output_channels))
    if "class_names" not in params and out != len(cfg.class_names):
        params["class_names"] = tuple(f"class{i}" for i in range(1, out + 1))
    try:
        config = cfg.replace(**params)
    except ConfigError as exc:
        raise ModelFileError(f"{path}: cannot build a config for this checkpoint: {exc}") from None
    model = OctreeNCA(config)
    new_sd = {}
    for name, t in model.state_dict().items():
        src = name.replace("levels.", prefix, 1)
        if src not in sd:
            raise ModelFileError(f"{path}: missing {src}")
        if tuple(sd[src].shape) != tuple(t.shape):
            raise ModelFileError(f"{path}: {src} has shape {tuple(sd[src].shape)}, expected {tuple(t.shape)}")
        new_sd[name] = sd[src].float()
    model.load_state_dict(new_sd)
    return model.eval()
