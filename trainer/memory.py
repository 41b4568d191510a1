"""How much memory one device needs to train a policy with BOND: the accounting behind the README's
table, so a user can pick the number of GPUs (and whether to shard, checkpoint or keep the anchor
in bf16) before renting them.

    python -m trainer.memory                      # the README table: Qwen2-0.5B / 7B, Llama-70B shapes
    python -m trainer.memory --world 8 --tokens 16384 ...

Per device, in bytes, for a decoder-only transformer trained as trainer/train.py does (fp32 master
weights, AdamW, bf16 autocast on CUDA):

- parameters: 4 bytes each, divided by the world size under FSDP (replicated under DDP);
- anchor: the EMA copy (eta > 0), 4 or 2 bytes each, sharded like the parameters;
- gradients: 4 bytes each, sharded like the parameters;
- optimizer: AdamW's two moments, 8 bytes per parameter, sharded like the parameters;
- gathered: under FSDP, the full fp32 weights of the units being used: the root (embeddings, LM
  head, final norm) for the whole step plus two decoder layers (one running, one prefetched);
- activations: what the backward keeps per token of the micro-batch. A layer keeps its fp32
  residual input twice (the two RMSNorms; autocast leaves the residual stream fp32), in the compute
  dtype the inputs of the q/k/v, o, gate/up
  and down projections, q and k around the rotary embedding, q, k, v and the output of attention
  (a fused kernel: no [T, T] matrix), and gate, up and silu(gate) of the MLP. With activation
  checkpointing only each layer's input stays, plus one layer's activations while it is recomputed;
- logits: the LM head's chunk [chunk, vocab] in fp32, three live copies at the backward's peak
  (logits, their softmax, the gradient), plus the final hidden states of the micro-batch.

Not counted: the CUDA context and allocator fragmentation (a few GB on a real card), and the
temporary buffers of kernels. `check_against_model` (tests/trainer/test_memory.py) checks the
first four against the tensors of a real model and optimizer, and the activations against the
bytes autograd actually saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 1024 ** 3


@dataclass(frozen=True)
class ModelShape:
    params: int  # every parameter, tied ones once
    layer_params: int  # one decoder layer's
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_dim: int  # key / value width: kv heads x head dim


def model_shape(config) -> ModelShape:
    """The shape of a transformers causal-LM config; parameters counted on a meta-device model
    (exact, tied embeddings once, no memory used)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    layer = sum(p.numel() for p in model.get_decoder().layers[0].parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return ModelShape(params, layer, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                      config.vocab_size, kv_heads * head_dim)


def layer_activation_bytes(shape: ModelShape, tokens: int, compute_bytes: int, residual_bytes: int = 4) -> int:
    """Bytes one decoder layer saves for the backward, for `tokens` tokens (see the module docstring)."""
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    residual = 2 * h * residual_bytes  # inputs of the two RMSNorms
    attention = (h + (h + kv) + (2 * h + 2 * kv) + h) * compute_bytes  # qkv input; q, k at rope; q, k, v, out; o input
    mlp = (h + 3 * i + i) * compute_bytes  # gate/up input; gate, up, silu(gate); down input
    return tokens * (residual + attention + mlp)


def memory_per_device(shape: ModelShape, world: int = 1, fsdp: bool = False, anchor_bytes: int = 4,
                      tokens: int = 8192, activation_checkpointing: bool = False, logprob_chunk: int = 1024,
                      compute_bytes: int = 2) -> dict[str, int]:
    """Bytes per device of each part (anchor_bytes 0: no EMA anchor; compute_bytes 2: bf16 autocast,
    4: fp32 as on the CPU); "total" sums them."""
    shards = world if fsdp else 1
    n = shape.params
    parts = {"parameters": n * 4 // shards, "anchor": n * anchor_bytes // shards, "gradients": n * 4 // shards,
             "optimizer": 2 * n * 4 // shards}
    root = n - shape.layers * shape.layer_params
    parts["gathered"] = (root + 2 * shape.layer_params) * 4 if fsdp else 0
    one_layer = layer_activation_bytes(shape, tokens, compute_bytes)
    if activation_checkpointing:
        parts["activations"] = shape.layers * tokens * shape.hidden * 4 + one_layer
    else:
        parts["activations"] = shape.layers * one_layer
    parts["logits"] = 3 * min(logprob_chunk, tokens) * shape.vocab * 4 + tokens * shape.hidden * 4
    parts["total"] = sum(parts.values())
    return parts


SHAPES = {  # public configs' shapes (no weights needed): what the README table is computed for
    "Qwen2-0.5B": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2-7B": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "Llama-3-70B": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def config_of(name: str):
    from transformers import AutoConfig

    spec = dict(SHAPES[name])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def table(worlds: list[int], tokens: int, checkpointing: bool, anchor_bytes: int) -> str:
    """The README's markdown table: GiB per GPU, FSDP over `world` GPUs (world 1: no sharding)."""
    lines = ["| model | params | GPUs | parameters | anchor | gradients | optimizer | gathered | activations | logits | **total** |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in SHAPES:
        shape = model_shape(config_of(name))
        for world in worlds:
            m = memory_per_device(shape, world, fsdp=world > 1, anchor_bytes=anchor_bytes, tokens=tokens,
                                  activation_checkpointing=checkpointing)
            cells = " | ".join(f"{m[k] / GIB:.1f}" for k in m if k != "total")
            lines.append(f"| {name} | {shape.params / 1e9:.2f}B | {world} | {cells} | **{m['total'] / GIB:.1f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from bond_data.config import FlagParser  # a misused flag: one error: line

    ap = FlagParser(prog="python -m trainer.memory", description="GiB per GPU to train with BOND (see the module docstring)")
    ap.add_argument("--world", type=int, nargs="+", default=[1, 8, 16, 64], help="GPUs (FSDP when more than 1)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch per GPU")
    ap.add_argument("--no-checkpointing", action="store_true", help="without activation checkpointing")
    ap.add_argument("--anchor-bytes", type=int, default=2, choices=[0, 2, 4], help="EMA anchor: 0 none, 2 bf16, 4 fp32")
    args = ap.parse_args(argv)
    print(table(args.world, args.tokens, not args.no_checkpointing, args.anchor_bytes))


if __name__ == "__main__":
    main()
