#!/usr/bin/env bash
# Every GPU figure of the README in one run on a lent GPU machine. Each part has its own time limit,
# so a slow one cannot starve the others; the most wanted figures come first:
#   1. the training step (bench/train_step.py): before / after issue 12, the head in IEEE fp32;
#   2. rho at initialisation on the GPU (bench/gpu_precision.py): generator log A vs trainer log pi;
#   3. decoding paths vs plain batched generate and the bandwidth limit (bench/gpu_generate.py);
#   4. the step with activation checkpointing, FSDP2 over NCCL (one process), torch.compile.
# About 8 minutes. Everything printed also lands in $OUT/gpu.txt (the tool's output folder; /tmp
# elsewhere). bench/gpu/ keeps the logs of past runs.
#
# The lent machines have torch and transformers but not the store's duckdb / pydantic / prefect,
# which nothing here imports. Their transformers (5.17) is older than pyproject's floor (5.24:
# `decoding: static` under bf16 autocast needs it): carry its wheel. Once, here:
#     echo /.whl/ >> .git/info/exclude
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl transformers==5.24.0
# then run (carry [".whl"], timeout_s 560):
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
  part 150 $py bench/train_step.py --device cuda --variants before,after,strict-head
  part 80 $py bench/gpu_precision.py --shapes tiny,qwen2-0.5b --prompts 32 --k 4 --new-tokens 128 \
    --cases bf16-autocast:tf32:packed,bf16-autocast:tf32:padded,fp32:strict:packed
  part 150 $py bench/gpu_generate.py --shape qwen2-0.5b --prompts 32 --k 8 --new-tokens 128 --batch-size 256
  part 120 $py bench/train_step.py --device cuda --variants checkpointing,fsdp,compile
} 2>&1 | grep --line-buffered -v "Loading weights\|Writing model shards" | tee "$out/gpu.txt"
