#!/usr/bin/env bash
# Installs k15sys (editable) with its test extra on a fresh machine.
#  - Debian packages listed in scripts/debian-packages.txt (the sandbox's bubblewrap), when apt-get
#    is available and we are root; otherwise it says what is missing and goes on.
#  - everything goes into the interpreter `python3` (or $PYTHON) names: an active virtual environment, or
#    that Python's own site-packages (it says which first; README recommends a venv).
#  - torch: an existing install is kept (GPU users keep theirs). Without one, torch is installed from
#    pip's index (K15_TORCH_SPEC / K15_TORCH_INDEX override the version / index). PyPI serves the CUDA
#    build on Linux x86_64; a CPU-only machine wants K15_TORCH_INDEX=https://download.pytorch.org/whl/cpu.
#  - then `pip install -e ".[test]"`, which builds the C++ extension k15sys._C with CMake + ninja.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; venv = sys.prefix != sys.base_prefix; print(f"[install] into {sys.executable} (prefix {sys.prefix}; " + ("a virtual environment)" if venv else "not a virtual environment: see README, Where it installs)"))'

mapfile -t debs < <(grep -v '^\s*#' scripts/debian-packages.txt | grep -v '^\s*$' || true)
missing=()
for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[install] Debian packages: ${missing[*]}"
    (apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1) || \
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends "${missing[@]}"; }
  else
    echo "[install] warning: missing Debian packages ${missing[*]} (need root + apt-get); the sandbox then reports SANDBOX_ERROR and its tests skip" >&2
  fi
fi

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec=${K15_TORCH_SPEC:-"torch>=2.4"}
  else
    spec=${K15_TORCH_SPEC:-"torch==2.13.0"}
    if [ -z "${K15_TORCH_INDEX:-}" ]; then
      echo "[install] no NVIDIA GPU: pip's default index may serve torch's CUDA build (several GB of nvidia-*" \
           "libraries); for the CPU build set K15_TORCH_INDEX=https://download.pytorch.org/whl/cpu" >&2
    fi
  fi
  echo "[install] $spec"
  if [ -n "${K15_TORCH_INDEX:-}" ]; then
    "$PY" -m pip install -q "$spec" --index-url "$K15_TORCH_INDEX"
  else
    "$PY" -m pip install -q "$spec"
  fi
fi

"$PY" -m pip install -q -e ".[test]"
"$PY" -c "import k15sys._C, torch; print('[install] ok: k15sys._C built, torch', torch.__version__)"
