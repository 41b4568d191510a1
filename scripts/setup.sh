#!/usr/bin/env bash
# Create .venv and install the project with its test extras. Idempotent.
#
# torch: an existing torch is never replaced. If the interpreter that creates the venv already
# has torch (e.g. a CUDA build on a GPU machine), the venv sees it (--system-site-packages) and
# pip keeps it, since the project only asks for torch>=2.4. Otherwise we install torch==$TORCH_VERSION
# before the project, so pip does not resolve an unpinned torch to a multi-GB CUDA build; set
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) to pick a wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: using the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION"
  "${PIP[@]}" install -q "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
"${PIP[@]}" install -q -e ".[dev]"
"$VENV/bin/python" -c "import torch, transformers, prefect, duckdb; print(f'setup: torch {torch.__version__}, transformers {transformers.__version__}, prefect {prefect.__version__}, duckdb {duckdb.__version__}')"
