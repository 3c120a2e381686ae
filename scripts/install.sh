#!/usr/bin/env bash
# Install wasi-tool and its dev tools into the current Python environment (use a venv if you like).
#
# torch/torchvision: timm needs torchvision, and the two must be a matching pair. Set
# TORCH_SPEC to choose another pair (e.g. on aarch64: "torch==2.9.1 torchvision==0.24.1").
# TORCH_INDEX: a PyTorch wheel index, e.g. https://download.pytorch.org/whl/cpu for a CPU-only
# build on x86 (PyPI's x86 wheel is a CUDA build: about 6 GB in a venv; aarch64 wheels on PyPI
# are CPU-only already).
# pip's own progress is shown: the torch download is several hundred MB to several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
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
