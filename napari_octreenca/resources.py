"""Where bundled files live: inside the installed wheel, or at the repository root in a checkout.

The wheel maps the top-level ``kernels/``, ``models/`` and ``napari.yaml`` into the package
(see ``pyproject.toml``); a source checkout reads them from the repository root.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def resource_path(name: str) -> Path:
    """Path of a bundled resource (``kernels``, ``models``, ``napari.yaml``)."""
    for base in (PACKAGE_DIR, PACKAGE_DIR.parent):
        p = base / name
        if p.exists():
            return p
    raise FileNotFoundError(f"bundled resource {name!r} not found next to {PACKAGE_DIR}; reinstall napari-octreenca")


def models_dir() -> Path:
    """Folder of the bundled model files."""
    return resource_path("models")


def bundled_models() -> dict[str, Path]:
    """Bundled model names -> model files."""
    try:
        folder = models_dir()
    except FileNotFoundError:
        return {}
    if not folder.exists():
        return {}
    return {p.name[: -len(".safetensors")]: p for p in sorted(folder.glob("*.safetensors"))}
