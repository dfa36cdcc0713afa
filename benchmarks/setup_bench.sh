#!/usr/bin/env bash
# Idempotent set-up of .venv-bench: the venv the peer comparison (benchmarks/vs_trl.py) runs TRL in, and py-spy for
# profiling. The main .venv is never touched.
#
# Order matters: torch first (the CPU build 2.13.0, the one .venv has); then TRL under a constraints file that holds
# torch where it is (TRL's dependencies would otherwise be free to pull another torch, and a CUDA one at that); then
# this package (editable) under the same constraints, so the same venv can also run our side of the comparison.
# A second run only checks (a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
step() { echo "setup_bench: [$(( $(date +%s) - t0 ))s] $*"; }

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${VENV:-.venv-bench}
TORCH_VERSION=2.13.0
TRL_SPEC=${TRL_SPEC:-trl}

[ -x "$VENV/bin/python" ] || { step "creating $VENV"; "$PY" -m venv "$VENV"; }
pip() {
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
has() {  # has DIST PREFIX: is distribution DIST installed at a version starting with PREFIX?
  "$VENV/bin/python" - "$1" "$2" 2>/dev/null <<'PYEOF'
import importlib.metadata as m, sys
sys.exit(not m.version(sys.argv[1]).startswith(sys.argv[2]))
PYEOF
}

mkdir -p "$VENV/etc"
CONSTRAINTS="$VENV/etc/constraints.txt"
printf 'torch==%s\n' "$TORCH_VERSION" > "$CONSTRAINTS"

if ! has torch "$TORCH_VERSION"; then
  step "installing torch==$TORCH_VERSION"
  pip install "torch==$TORCH_VERSION"
fi

stamp="$VENV/.installed-$(cat pyproject.toml benchmarks/setup_bench.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  step "installing $TRL_SPEC, py-spy and rlhf_dist (editable) under $CONSTRAINTS"
  pip install -c "$CONSTRAINTS" "$TRL_SPEC" py-spy -e .
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

step "checking imports"
"$VENV/bin/python" - <<'PYEOF'
import warnings
warnings.filterwarnings("ignore")
import torch, trl, transformers, ray, rlhf_dist  # noqa: E401,F401
print(f"  torch {torch.__version__}, trl {trl.__version__}, transformers {transformers.__version__}, ray {ray.__version__}")
PYEOF
step "done: $VENV ready ($(du -sh "$VENV" | cut -f1))"
