#!/usr/bin/env bash
# Issue 12's GPU figures in one run, for a lent GPU machine (torch and transformers are there; the
# store's dependencies are not needed: the benchmark imports only trainer/{step,logprobs,packing,
# losses,fsdp}.py). About 5 minutes on an H100 / H200; everything printed also lands in $OUT.
#
#   run: bash bench/gpu_train_step.sh        (timeout_s 540)
set -uo pipefail
out=${OUT:-/tmp}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=$(command -v python3)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  # the chunked head against the full-logits reference on the GPU under the bf16-autocast policy (a sanity check)
  $py - <<'PY'
import torch
from trainer.logprobs import completion_logprobs, full_logits_logprobs
from transformers import Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="sdpa")
m = Qwen2ForCausalLM(cfg).cuda()
from bond_data.precision import fp32_head
fp32_head(m)  # both sides: the body under bf16 autocast, the head in fp32 (bond_data/precision.py)
g = torch.Generator().manual_seed(1)
rows = [{"prompt": torch.randint(3, 151936, (int(torch.randint(8, 64, (1,), generator=g)),), generator=g).tolist(),
         "completion": torch.randint(3, 151936, (int(torch.randint(16, 512, (1,), generator=g)),), generator=g).tolist()}
        for _ in range(8)]
dev = torch.device("cuda")
ref, got = full_logits_logprobs(m, rows, dev), completion_logprobs(m, rows, dev)
print("cuda bf16: chunked vs full-logits sequence log-probs, max |diff| / max |logp| =",
      f"{float((got - ref).abs().max() / ref.abs().max()):.2e}")
PY
  $py bench/train_step.py --device cuda
  $py bench/train_step.py --device cuda --attn flex_attention --variants after
} 2>&1 | tee "$out/gpu_train_step.txt"
