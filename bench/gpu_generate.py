"""Generation on a GPU at a realistic size: tokens/s of our backend against two baselines.

A ~125M-parameter Llama (768 hidden, 12 layers, 32k vocabulary, random weights, bf16) built in
code with a 32k-word tokenizer, so the per-step sampler works on a real vocabulary size.

- `ours`: `TransformersBackend.generate` (rows batched across prompts and samples, per-row seeds
  via Gumbel-max in a logits processor, per-token log-probs recorded);
- `per-prompt`: one `model.generate(do_sample=True, num_return_sequences=k)` per prompt (TRL's
  former BestOfNSampler);
- `hf-batched`: plain batched `model.generate(do_sample=True)` over the same rows: no per-row seeds,
  no log-probs; the gap to `ours` is the cost of what we add.

    python bench/gpu_generate.py [--prompts 128 --k 8 --new-tokens 128 --batch-size 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bond_data.backends.base import PromptJob, Sampling
from bond_data.backends.hf import TransformersBackend

VOCAB = 32000


def build(folder: Path) -> None:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, int]:
    sync()
    t = time.perf_counter()
    tokens = fn()
    sync()
    return time.perf_counter() - t, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp()) / "m"
    build(folder)
    backend = TransformersBackend.from_pretrained(str(folder), batch_size=args.batch_size, device=args.device)
    model, tok = backend.model, backend.tokenizer
    prompts = [" ".join(f"w{(37 * p + 11 * i) % (VOCAB - 3) + 3}" for i in range(16 + p % 16)) for p in range(args.prompts)]
    sampling = Sampling(max_new_tokens=args.new_tokens)
    jobs = [PromptJob(str(j), p, None, list(range(args.k)), [1000 * j + s for s in range(args.k)]) for j, p in enumerate(prompts)]
    gen_kw = dict(do_sample=True, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, top_k=None,
                  pad_token_id=tok.pad_token_id)

    def ours() -> int:
        return sum(len(c.token_ids) for outs in backend.generate(jobs, sampling) for c in outs)

    def per_prompt() -> int:
        n = 0
        for p in prompts:
            enc = tok(p, return_tensors="pt").to(args.device)
            out = model.generate(**enc, num_return_sequences=args.k, **gen_kw)
            n += (out.shape[1] - enc["input_ids"].shape[1]) * args.k
        return n

    def hf_batched() -> int:
        rows = sorted((p for p in prompts for _ in range(args.k)), key=len)
        n = 0
        for s in range(0, len(rows), args.batch_size):
            enc = tok(rows[s : s + args.batch_size], return_tensors="pt", padding=True).to(args.device)
            out = model.generate(**enc, **gen_kw)
            n += (out.shape[1] - enc["input_ids"].shape[1]) * enc["input_ids"].shape[0]
        return n

    ours()  # warm-up (also compiles kernels)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{name}, {params / 1e6:.0f}M params {model.dtype}, {args.prompts} prompts x k={args.k}, "
          f"{args.new_tokens} new tokens, batch {args.batch_size}")
    results = {}
    for name, fn in [("ours", ours), ("hf-batched", hf_batched), ("per-prompt", per_prompt)]:
        secs, tokens = timed(fn)
        results[name] = tokens / secs
        print(f"{name:>11}: {tokens} tokens in {secs:.2f} s = {tokens / secs:,.0f} tokens/s")
    print(f"sampler overhead: ours runs at {results['ours'] / results['hf-batched']:.2f}x of plain batched sampling")
    print(f"speedup: {results['ours'] / results['per-prompt']:.1f}x (per-prompt baseline / ours, tokens/s)")


if __name__ == "__main__":
    main()
