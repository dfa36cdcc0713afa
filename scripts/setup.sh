#!/usr/bin/env bash
# Idempotent set-up: .venv with torch first (CPU build 2.13.0 when no CUDA), then this package, both at the tested
# version set (constraints/cpu.txt, or constraints/gpu.txt when nvidia-smi exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
if command -v nvidia-smi >/dev/null 2>&1; then PINS=constraints/gpu.txt; else PINS=constraints/cpu.txt; fi
# A constraints file keeps every later install on the torch we chose, so no dependency pulls a CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  pip install -c "$PINS" torch
fi
TORCH=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
mkdir -p "$VENV/etc"
echo "torch==$TORCH" > "$VENV/etc/constraints.txt"
stamp="$VENV/.installed-$(cat pyproject.toml "$PINS" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  pip install -c "$VENV/etc/constraints.txt" -c "$PINS" -e ".[dev]"
  rm -f "$VENV"/.installed-*; touch "$stamp"
fi
echo "setup: $VENV ready (torch $TORCH, tested set $PINS)"
