"""The wheel carries what it needs (kernels, sample data and models, napari.yaml) and imports
from a fresh virtual environment."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
    )
    (whl,) = out.glob("napari_octreenca-*.whl")
    return whl


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "napari_octreenca/napari.yaml" in names
    assert any(n.startswith("napari_octreenca/kernels/") and n.endswith((".cu", ".cuh")) for n in names)
    repo_models = sorted(p.name for p in (REPO / "models").glob("*.safetensors"))
    for m in repo_models:
        assert f"napari_octreenca/models/{m}" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "napari_octreenca:napari.yaml" in text and "octreenca = napari_octreenca.cli:main" in text
    assert not any("/shared/" in n or n.endswith((".pth", ".pkl")) for n in names)


@pytest.mark.slow
def test_wheel_imports_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    """Install the wheel (engine dependencies only) into a new venv and use it from outside the repo."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q"]
    # torch 2.13 (CPU build) first so pip never resolves a CUDA build.
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + [str(wheel)], check=True)
    code = (
        "from napari_octreenca.resources import resource_path, bundled_models;"
        "import napari_octreenca, sys;"
        "assert 'site-packages' in napari_octreenca.__file__, napari_octreenca.__file__;"
        "assert list(resource_path('kernels').glob('*.cu*'));"
        "assert (resource_path('napari.yaml')).exists();"
        "print(sorted(bundled_models()))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(py), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [str(env_dir / "bin" / "octreenca"), "info", "pathology"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0 and "15,520" in r.stdout, r.stderr
