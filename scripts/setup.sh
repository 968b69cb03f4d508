#!/usr/bin/env bash
# Install tpfleet (editable) with its test tools into the current Python.
# An existing torch is left alone. Without one, a machine with no GPU gets the CPU build
# (torch==2.13.0 resolves to a local CPU wheel on the project's machines); a GPU machine gets
# the default CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q torch==2.13.0
  fi
fi
"$PY" -m pip install -q -e ".[test]"
