#!/usr/bin/env bash
# Every GPU figure of the README in one run on a lent GPU machine, those never measured first. Each
# part has its own time limit, so a slow one cannot starve the others:
#   1. the training step (bench/train_step.py; since the last GPU run the step no longer waits for the
#      GPU inside, collates 5-8x faster and, compiled, fuses the head's backward softmax): after and
#      compile (against the last run's figures), varlen + compile, and all of varlen + compile + one
#      micro-batch + the head's backward in bf16 (the best guess); then varlen alone, with one
#      micro-batch, with the bf16 backward (the MFU figures, never measured); a profile of the best guess;
#   2. decoding (bench/gpu_generate.py): since the last GPU run the backend no longer casts every fp32
#      weight to bf16 at every step (inference_mode had turned autocast's cache off) and the generate
#      stage holds the body's linear layers in bf16; ours/fp32-weights is the old weights under the
#      new no_grad; with a profile of ours and plain generate (where ours's 0.68-0.77x went);
#   3. the GPU tests: torch's varlen kernel against the row-by-row reference, static-compiled
#      decoding against dynamic, the training step's waits for the GPU (-s prints the waits found
#      inside transformers), the LM head against float64 at a 151,936 vocabulary, the bf16 body's
#      tokens and log A against fp32 weights on CUDA (pytest -m gpu);
#   4. rho at initialisation with generator and trainer on varlen (bench/gpu_precision.py --generator-attn
#      varlen --trainer-attn varlen);
#   5. the LM head alone (bench/head.py: before, now, fused logsumexp and softmax, bf16 backward; then
#      the backward over vocabulary slices against the one over token chunks, both fused with the
#      bf16 backward), the best
#      variants with 2,048-token head chunks (logprob_chunk; wider matmuls);
#   then what earlier runs measured (bench/gpu/): before / after issue 12 and the head in IEEE fp32,
#   rho under each policy, activation checkpointing, FSDP2 (one process, NCCL), Liger, flex_attention
#   with compile.
# A 590 s call ends around part 4 (the first three parts, at most 570 s by their limits, are what matter
# most); a second call `bash bench/gpu_all.sh 4` takes the decoding figures and the tests; what
# neither reaches was measured before.
# Everything printed also lands in $OUT/gpu.txt (the tool's output folder; /tmp
# elsewhere). bench/gpu/ keeps the logs of past runs.
#
# The lent machines have torch, transformers 5.17, pyarrow, pytest, but not duckdb / pydantic (the
# tests' conftest imports them) and an older transformers than pyproject's floor (5.24: `decoding:
# static` under bf16 autocast needs it). Once, here: `bash scripts/gpu_wheels.sh` (41 MB into .whl/,
# git-ignored). Then run (carry [".whl"], timeout_s 590):
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site bash bench/gpu_all.sh
# Each part prints its number; `bash bench/gpu_all.sh N` starts at part N (a second call picks up where
# the first one's time ran out).
set -uo pipefail
out=${OUT:-/tmp}
first=${1:-1} n=0
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
py=$(command -v python3)
part() { n=$((n + 1)); [ "$n" -ge "$first" ] || return 0
         local limit=$1; shift; echo "== part $n: $* (limit ${limit} s)"; local t=$SECONDS
         timeout -k 5 "$limit" "$@"; echo "== rc $? after $((SECONDS - t)) s"; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
  part 270 $py bench/train_step.py --device cuda --variants after,compile,varlen-compile,varlen-compile-1mb-bf16bwd
  part 200 $py bench/train_step.py --device cuda --variants varlen,varlen-compile-1mb,varlen-compile-bf16bwd
  part 100 $py bench/train_step.py --device cuda --variants varlen-compile-1mb-bf16bwd --profile 25
  part 200 $py bench/gpu_generate.py --shape qwen2-0.5b --prompts 32 --k 8 --new-tokens 128 --batch-size 256 --profile 25
  part 100 $py -m pytest -q -s -p no:cacheprovider -m gpu tests/bond_data/test_attention.py \
    tests/bond_data/backends/test_hf_decoding.py tests/trainer/test_step_sync.py tests/bond_data/test_logprobs.py \
    tests/bond_data/backends/test_hf_weights.py
  part 70 $py bench/gpu_precision.py --shapes tiny,qwen2-0.5b --prompts 32 --k 4 --new-tokens 128 \
    --generator-attn varlen --trainer-attn varlen --cases bf16-autocast:tf32:packed,fp32:strict:packed
  part 45 $py bench/head.py --device cuda --before .whl/old_logprobs.py
  part 45 $py bench/head.py --device cuda --before .whl/token_chunked_logprobs.py --before-options
  part 100 $py bench/train_step.py --device cuda --chunk 2048 --variants varlen-compile-1mb-bf16bwd,varlen-compile-bf16bwd
  part 140 $py bench/train_step.py --device cuda --variants before,strict-head
  part 70 $py bench/gpu_precision.py --shapes tiny,qwen2-0.5b --prompts 32 --k 4 --new-tokens 128 \
    --cases bf16-autocast:tf32:packed,bf16-autocast:tf32:padded,fp32:strict:packed
  part 150 $py bench/train_step.py --device cuda --variants checkpointing,fsdp,liger
  part 120 $py bench/train_step.py --device cuda --attn flex_attention --variants compile
} 2>&1 | grep --line-buffered -v "Loading weights\|Writing model shards" | tee "$out/gpu.txt"
