"""The memory accounting (trainer/memory.py) against the tensors of a real tiny model: parameters,
EMA anchor, gradients and AdamW state exactly; one decoder layer's activations against the bytes
autograd saves for its backward; FSDP shards divide by the world size."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config

from trainer.fsdp import anchor_copy
from trainer.memory import SHAPES, config_of, layer_activation_bytes, memory_per_device, model_shape, table


def tiny_config(tie=True):
    return LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=tie, attn_implementation="sdpa")


def nbytes(tensors) -> int:
    """Bytes of distinct storages (a tied weight counts once)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def test_memory_parts_equal_the_tensors_of_a_trained_tiny_model():
    for tie in (True, False):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config(tie))
        shape = model_shape(model.config)
        assert shape.params == nbytes(model.parameters()) // 4
        ids = torch.randint(0, 97, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt = torch.optim.AdamW(model.parameters())
        opt.step()
        moments = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
        for anchor_bytes, dtype in ((4, torch.float32), (2, torch.bfloat16)):
            parts = memory_per_device(shape, anchor_bytes=anchor_bytes, tokens=32, compute_bytes=4)
            assert parts["anchor"] == nbytes(anchor_copy(model, dtype).values())
        assert parts["parameters"] == nbytes(model.parameters())
        assert parts["gradients"] == nbytes(p.grad for p in model.parameters())
        assert parts["optimizer"] == nbytes(moments)


def test_fsdp_divides_the_sharded_parts_by_the_world_size():
    shape = model_shape(tiny_config())
    one = memory_per_device(shape, world=1, tokens=64)
    eight = memory_per_device(shape, world=8, fsdp=True, tokens=64)
    for k in ("parameters", "anchor", "gradients", "optimizer"):
        assert abs(eight[k] - one[k] / 8) <= 1
    assert eight["activations"] == one["activations"]
    assert one["gathered"] == 0 < eight["gathered"]
    assert eight["total"] == sum(v for k, v in eight.items() if k != "total")


def test_layer_activations_match_what_autograd_saves():
    """fp32 on the CPU (compute_bytes 4): saved tensors of one layer's forward, parameters and the
    rotary table (shared by all layers) left out, within 10% of the formula."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    shape, layer, tokens = model_shape(model.config), model.model.layers[0], 128
    hidden = torch.randn(1, tokens, shape.hidden, requires_grad=True)
    rotary = model.model.rotary_emb(hidden, torch.arange(tokens)[None])
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *rotary]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=torch.arange(tokens)[None])
    want = layer_activation_bytes(shape, tokens, compute_bytes=4)
    assert abs(sum(saved.values()) - want) <= 0.1 * want


def test_checkpointing_keeps_one_hidden_state_per_layer_and_the_readme_shapes_are_right():
    shape = model_shape(config_of("Qwen2-0.5B"))
    assert round(shape.params / 1e6) == 494  # Qwen2-0.5B's published count
    assert round(model_shape(config_of("Qwen2-7B")).params / 1e9, 1) == 7.6
    assert round(model_shape(config_of("Llama-3-70B")).params / 1e9, 1) == 70.6
    full = memory_per_device(shape, tokens=4096)
    ckpt = memory_per_device(shape, tokens=4096, activation_checkpointing=True)
    assert ckpt["activations"] == shape.layers * 4096 * shape.hidden * 4 + layer_activation_bytes(shape, 4096, 2)
    assert ckpt["activations"] < full["activations"] / 5
    assert isinstance(config_of("Qwen2-0.5B"), Qwen2Config)
    assert len(table([1, 8], 4096, True, 2).splitlines()) == 2 + 2 * len(SHAPES)  # header, rule, a row per (model, world)
