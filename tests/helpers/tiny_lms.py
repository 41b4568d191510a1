"""Tiny causal LMs built in code and random (prompt, completion) rows: the log-prob, attention and
trainer tests' shared inputs."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def tiny_lm(family="llama", vocab=97, tie=True, seed=0):
    torch.manual_seed(seed)
    size = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                tie_word_embeddings=tie, attn_implementation="sdpa")
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    return cls[1](cls[0](**size)).float()


def random_rows(n=9, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    return [{"prompt": torch.randint(1, vocab, (rand(1, 9),), generator=g).tolist(),
             "completion": torch.randint(1, vocab, (rand(1, 14),), generator=g).tolist()} for _ in range(n)]


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
