#!/usr/bin/env bash
# Every GPU figure of the README in one run on a lent GPU machine. Each part has its own time limit,
# so a slow one cannot starve the others; the most wanted figures come first:
#   1. the training step (bench/train_step.py): before / after issue 12, the head in IEEE fp32;
#   2. rho at initialisation on the GPU (bench/gpu_precision.py): generator log A vs trainer log pi;
#   3. decoding paths vs plain batched generate and the bandwidth limit (bench/gpu_generate.py);
#   4. the GPU test of the decoding paths (pytest -m gpu: static-compiled samples what dynamic does);
#   5. the step with activation checkpointing, FSDP2 over NCCL (one process), torch.compile, Liger's
#      kernels (liger-kernel, carried in .whl/ like the rest), and flex_attention with compile.
# About 9-10 minutes (a 600 s call: run it alone; the last part, the most expendable, may be cut).
# Everything printed also lands in $OUT/gpu.txt (the tool's output folder; /tmp
# elsewhere). bench/gpu/ keeps the logs of past runs.
#
# The lent machines have torch, transformers 5.17, pyarrow, pytest, but not duckdb / pydantic (the
# tests' conftest imports them) and an older transformers than pyproject's floor (5.24: `decoding:
# static` under bf16 autocast needs it). Once, here: `bash scripts/gpu_wheels.sh` (41 MB into .whl/,
# git-ignored). Then run (carry [".whl"], timeout_s 590):
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site bash bench/gpu_all.sh
set -uo pipefail
out=${OUT:-/tmp}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
py=$(command -v python3)
part() { local limit=$1; shift; echo "== $* (limit ${limit} s)"; local t=$SECONDS
         timeout -k 5 "$limit" "$@"; echo "== rc $? after $((SECONDS - t)) s"; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
  part 140 $py bench/train_step.py --device cuda --variants before,after,strict-head
  part 70 $py bench/gpu_precision.py --shapes tiny,qwen2-0.5b --prompts 32 --k 4 --new-tokens 128 \
    --cases bf16-autocast:tf32:packed,bf16-autocast:tf32:padded,fp32:strict:packed
  part 140 $py bench/gpu_generate.py --shape qwen2-0.5b --prompts 32 --k 8 --new-tokens 128 --batch-size 256
  part 90 $py -m pytest -q -p no:cacheprovider -m gpu tests/bond_data/backends/test_hf_decoding.py
  part 150 $py bench/train_step.py --device cuda --variants checkpointing,fsdp,compile,liger
  part 120 $py bench/train_step.py --device cuda --attn flex_attention --variants compile
} 2>&1 | grep --line-buffered -v "Loading weights\|Writing model shards" | tee "$out/gpu.txt"
