#!/usr/bin/env bash
# Idempotent setup: Fashion-MNIST (Debian package), a virtual environment in .venv with the CPU build
# of torch where there is no NVIDIA GPU, and fedgen itself (editable, with the test tools).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
FMNIST=/usr/share/datasets/fashion-mnist

# 1. The default dataset: real Fashion-MNIST from Debian.
if [ ! -e "$FMNIST/train-images-idx3-ubyte.gz" ] && [ ! -e "$FMNIST/train-images-idx3-ubyte" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO=sudo
  if command -v apt-get >/dev/null; then
    echo "setup: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
      || echo "setup: WARNING could not install dataset-fashion-mnist; the default job needs it (tests do not)"
  else
    echo "setup: WARNING no apt-get; put Fashion-MNIST's IDX files in a folder and set FEDGEN_DATA"
  fi
fi

# 2. The virtual environment.
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)

# 3. torch: CPU build unless an NVIDIA GPU is present (a plain `pip install torch` pulls GBs of CUDA).
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing torch==$TORCH_VERSION (CUDA build)"
    "${PIP[@]}" "torch==$TORCH_VERSION"
  else
    echo "setup: no GPU, installing torch==$TORCH_VERSION (CPU build)"
    # A local CPU wheel (pip find-links) or the PyTorch CPU index; never the CUDA wheels from PyPI.
    "${PIP[@]}" "torch==$TORCH_VERSION+cpu" 2>/dev/null \
      || "${PIP[@]}" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

# 4. fedgen and the rest, with torch pinned to what is installed; skipped when nothing changed.
stamp=.venv/.fedgen-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing fedgen and its dependencies into .venv"
  "${PIP[@]}" -c constraints.txt -e ".[dev]"
  # torch-fidelity's FID Inception network, without its torchvision requirement (CUDA wheels, DESIGN section 3)
  "${PIP[@]}" --no-deps "torch-fidelity==0.4.0"
  echo "$want" > "$stamp"
fi
