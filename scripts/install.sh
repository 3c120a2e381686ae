#!/usr/bin/env bash
# Install wasi-tool and its dev tools into the current Python environment (use a venv if you like).
#
# torch/torchvision: timm needs torchvision, and the two must be a matching pair. Set
# TORCH_SPEC to choose another pair (e.g. on aarch64: "torch==2.9.1 torchvision==0.24.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q $TORCH_SPEC
fi
"$PY" -m pip install -q -e ".[dev]"
"$PY" -c "import torch, torchvision, timm; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__)"
