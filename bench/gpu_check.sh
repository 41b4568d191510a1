#!/usr/bin/env bash
# The GPU figures of the decoding paths in one short run (issue 12, part 6): bench/gpu_generate.py
# on two shapes, then the GPU test that static-compiled samples what dynamic samples. Each
# benchmark's first line names the device. About 5-8 minutes on an H100 / H200 (an estimate: not
# run yet; most of it compilation and the 0.5B model). From the repository root:
#
#     bash bench/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
set -euo pipefail
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
"$PY" bench/gpu_generate.py --shape llama-134m --prompts 128 --k 8 --new-tokens 128 --batch-size 256
"$PY" bench/gpu_generate.py --shape qwen2-0.5b --prompts 64 --k 8 --new-tokens 128 --batch-size 256
# last and not fatal: the test's conftest needs the store's dependencies (duckdb, pyarrow) and pytest
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/bond_data/backends/test_hf_decoding.py \
  || echo "the gpu test failed or could not run (see above)"
