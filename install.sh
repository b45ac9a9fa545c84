#!/usr/bin/env bash
# Install vitacore (editable) with its test extras into the current Python environment.
#
# An installed torch is always kept (a GPU user's CUDA build stays). Without one, a GPU machine
# gets pip's default torch and a CPU-only machine gets the CPU build of VITACORE_TORCH_VERSION;
# set VITACORE_TORCH_INDEX to a CPU wheel index if your pip would otherwise pick a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python}"
TORCH_VERSION="${VITACORE_TORCH_VERSION:-2.13.0}"

if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "install.sh: keeping installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet torch
else
    "$PYTHON" -m pip install --quiet "torch==${TORCH_VERSION}" ${VITACORE_TORCH_INDEX:+--index-url "$VITACORE_TORCH_INDEX"}
fi
# torch now satisfies vitacore's range, so this step never replaces it.
"$PYTHON" -m pip install --quiet -e ".[dev]"

# The deepspeed launcher needs numactl on CPU machines; install it where we may (root with apt).
if ! command -v numactl >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get install -y -qq numactl >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq numactl >/dev/null 2>&1; } \
            || echo "install.sh: could not install numactl (only the deepspeed launcher on CPU needs it)"
    else
        echo "install.sh: numactl not found; the deepspeed launcher needs it on CPU (apt-get install numactl)"
    fi
fi
echo "install.sh: vitacore installed"
