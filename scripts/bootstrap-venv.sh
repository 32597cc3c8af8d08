#!/usr/bin/env bash
# Creates .venv with the IaC toolkit, the runtime (editable) and the dev tools.
# CPU-only torch for this machine type: torch==2.13.* (GPU hosts install the CUDA build themselves).
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
echo "==> installing Python packages into $VENV (first run takes a few minutes)"
"$VENV/bin/pip" install -q "torch==2.13.*"
"$VENV/bin/pip" install -q "torch==2.13.*" -e ./runtime -e ".[dev]"
