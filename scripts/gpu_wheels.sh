#!/usr/bin/env bash
# Wheels a lent GPU machine lacks, for bench/gpu_all.sh (it has torch, transformers 5.17, pyarrow,
# pyyaml, rich, pytest; no network): transformers at pyproject's floor, and what the GPU tests'
# conftest imports (duckdb, pydantic). Downloads them (CPython 3.12, x86-64) into .whl/, which git
# ignores via .git/info/exclude, with the LM head as it was before issue 12's backward (bench/head.py
# --before); the device tool carries it (carry [".whl"]). From the repository root:
#     bash scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
pip=${PIP:-.venv/bin/pip}
ver() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  "transformers==$(ver transformers)" "duckdb==$(ver duckdb)" "pydantic==$(ver pydantic)" \
  "pydantic_core==$(ver pydantic_core)" "annotated_types==$(ver annotated_types)" \
  "typing_inspection==$(ver typing_inspection)" "typing_extensions==$(ver typing_extensions)" \
  "liger-kernel==0.8.5"  # bench/train_step.py's liger variants only (Triton kernels; not a dependency)
git show 631d2d3:bond_data/logprobs.py > .whl/old_logprobs.py  # bench/head.py --before, where git is not at hand
git show 0a2cb8f:bond_data/logprobs.py > .whl/token_chunked_logprobs.py  # the head before its vocabulary-sliced backward
du -sh .whl && ls .whl
