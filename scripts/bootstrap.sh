#!/usr/bin/env bash
# Set up .venv on a fresh machine: Python venv, a portable llama-cpp-python wheel, fleetlm and its deps.
#
# llama-cpp-python is only on PyPI as source. A default build targets the build machine's own CPU
# (AVX-512, AMX...) and crashes elsewhere, so it is built once with portable x86-64 flags into a wheel
# cache outside the repo, keyed by version and flags; later installs on this machine reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LLAMA_VERSION=0.3.36
LLAMA_FLAGS=${FLEETLM_LLAMA_CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"}
flags_key=$(printf '%s' "$LLAMA_FLAGS" | sha256sum | cut -c1-12)
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/fleetlm/wheels/llama-cpp-python-$LLAMA_VERSION-$flags_key"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "fleetlm needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version))" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip

if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_VERSION with portable CPU flags (once per machine, ~5-12 min)..."
  mkdir -p "$WHEELS"
  CMAKE_ARGS="$LLAMA_FLAGS" .venv/bin/python -m pip wheel --quiet --no-deps --no-cache-dir \
    -w "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"
fi

echo "installing fleetlm and its dependencies into .venv..."
.venv/bin/python -m pip install --quiet --find-links "$WHEELS" -e ".[dev]"
touch .venv/.installed
