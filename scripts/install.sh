#!/usr/bin/env bash
# Install wasi-tool and its dev tools into the current Python environment (use a venv if you like).
#
# torch/torchvision: timm needs torchvision, and the two must be a matching pair. The pair is
# chosen by `uname -m`: on aarch64 (Raspberry Pi 4 and 5) torch 2.9.1 + torchvision 0.24.1, the
# newest CPU build that runs on a Pi 4's ARMv8.0 (PyPI's aarch64 torch 2.10.* dies at import
# there, and from 2.11 on the aarch64 wheels are CUDA/NVPL builds of ~3 GB that die at the first
# matmul; docs/raspberry-pi.md); elsewhere torch 2.14.1 + torchvision 0.29.1.
# TORCH_SPEC overrides the pair (on aarch64 pyproject.toml admits torch 2.4.1-2.9.x without
# 2.6.0 only, so the editable install below would replace a pair outside that range).
# TORCH_INDEX: a PyTorch wheel index, e.g. https://download.pytorch.org/whl/cpu for a CPU-only
# build on x86 (PyPI's x86 wheel is a CUDA build: about 6 GB in a venv).
# pip's own progress is shown: the torch download is several hundred MB to several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
case "$(uname -m)" in
  aarch64) DEFAULT_TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" ;;
  *) DEFAULT_TORCH_SPEC="torch==2.14.1 torchvision==0.29.1" ;;
esac
TORCH_SPEC=${TORCH_SPEC:-$DEFAULT_TORCH_SPEC}
TORCH_INDEX=${TORCH_INDEX:-}

if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "== installing $TORCH_SPEC${TORCH_INDEX:+ from $TORCH_INDEX} (a large download)"
  # shellcheck disable=SC2086
  "$PY" -m pip install --progress-bar on ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} $TORCH_SPEC
else
  echo "== torch and torchvision already import: kept"
fi
echo "== installing wasi-tool (editable) with its dev tools"
"$PY" -m pip install --progress-bar on -e ".[dev]"
"$PY" -c "import torch, torchvision, timm; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__)"
