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
.venv/bin/python -c "import tokenwise_harness, torch, transformers, safetensors; print('setup ok: torch', torch.__version__, 'transformers', transformers.__version__)"
