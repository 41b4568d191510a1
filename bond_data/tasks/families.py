"""Tiny, randomly initialised models of real Hugging Face families, built in code: what the tests
run whole rounds on, so that each family's special tokens and chat template meet the pipeline.

Each family brings what its released checkpoints do and the tiny built-in Llama does not:

- llama (Llama 3 style): BOS added by the tokenizer *and* written by the chat template; turns end
  with `<|eot_id|>`; the generation config stops on `<|end_of_text|>` too; a dedicated pad token.
- qwen2 (ChatML): no BOS at all; `<|im_end|>` ends a turn, `<|endoftext|>` pads and also stops.
- gemma2: BOS from the template (and the tokenizer for plain text); the tokenizer's EOS `<eos>` is
  not what ends a turn: `<end_of_turn>` is, listed only in the generation config.
- qwen3: Qwen2's tokens and template, with q/k norms and no q/k/v biases.
- gemma3: Gemma 2's tokens and template; a sliding-window layer then a global one, q/k norms.
- phi3: fused `qkv_proj` / `gate_up_proj`; BOS for plain text but not in its chat template; the pad
  token *is* the EOS token; `<|end|>` ends a turn.
- reward models: `mistral` (`[INST]` template with BOS, the tokenizer adds BOS too), a
  `MistralForSequenceClassification` with one logit.

The tokenizer is the byte-level one of tasks/common.py (every byte a token, no merges) plus the
family's special tokens, a BOS post-processor where the family adds one, and its chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


@dataclass(frozen=True)
class Family:
    model_class: str  # transformers class name, built from `config_class(**SIZE, ...)`
    config_class: str
    specials: tuple[str, ...]  # added tokens, in id order after the 256 bytes
    bos: str | None  # the tokenizer's bos_token
    eos: str  # the tokenizer's eos_token
    pad: str
    stop: tuple[str, ...]  # the generation config's eos_token_id list
    template: str
    bos_added: bool  # the tokenizer adds BOS to plain text
    extra: dict = field(default_factory=dict)  # family-specific config keys


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PHI3_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")

FAMILIES = {
    "llama": Family("LlamaForCausalLM", "LlamaConfig",
                    ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                     "<|finetune_right_pad_id|>"),
                    "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", ("<|end_of_text|>", "<|eot_id|>"),
                    LLAMA3_TEMPLATE, bos_added=True),
    "qwen2": Family("Qwen2ForCausalLM", "Qwen2Config", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                    None, "<|im_end|>", "<|endoftext|>", ("<|im_end|>", "<|endoftext|>"), CHATML_TEMPLATE,
                    bos_added=False),
    "gemma2": Family("Gemma2ForCausalLM", "Gemma2Config", ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
                     "<bos>", "<eos>", "<pad>", ("<eos>", "<end_of_turn>"), GEMMA_TEMPLATE, bos_added=True,
                     extra=dict(head_dim=16, sliding_window=32)),
    "qwen3": Family("Qwen3ForCausalLM", "Qwen3Config", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                    None, "<|im_end|>", "<|endoftext|>", ("<|im_end|>", "<|endoftext|>"), CHATML_TEMPLATE,
                    bos_added=False, extra=dict(head_dim=16)),
    "gemma3": Family("Gemma3ForCausalLM", "Gemma3TextConfig",
                     ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
                     "<bos>", "<eos>", "<pad>", ("<eos>", "<end_of_turn>"), GEMMA_TEMPLATE, bos_added=True,
                     extra=dict(head_dim=16, sliding_window=32, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention", "full_attention"])),
    "phi3": Family("Phi3ForCausalLM", "Phi3Config",
                   ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"),
                   "<s>", "<|endoftext|>", "<|endoftext|>", ("<|endoftext|>", "<|end|>"), PHI3_TEMPLATE,
                   bos_added=True, extra=dict(original_max_position_embeddings=256)),
}
REWARD_FAMILIES = {
    "mistral": Family("MistralForSequenceClassification", "MistralConfig", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
                      "<s>", "</s>", "<unk>", ("</s>",), MISTRAL_TEMPLATE, bos_added=True),
}


def build_family_tokenizer(family: Family):
    """The byte-level tokenizer with the family's special tokens, BOS rule and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(family.specials))
    if family.bos_added:
        bos = (family.bos, core.token_to_id(family.bos))
        core.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A $B",
                                                            special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad, chat_template=family.template, model_max_length=256)


def build_family_model(family: Family, tokenizer, seed: int = 0, num_labels: int | None = None):
    """A tiny random model of the family (2 layers, hidden 64), its generation config stopping on
    every end token the family's checkpoints list."""
    import torch
    import transformers
    from transformers import GenerationConfig

    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in family.stop])
    labels = {} if num_labels is None else {"num_labels": num_labels}
    config = getattr(transformers, family.config_class)(vocab_size=len(tokenizer), **SIZE, **family.extra, **ids, **labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, family.model_class)(config)
    if num_labels is None:
        model.generation_config = GenerationConfig(**ids)
    return model


def save_family_model(name: str, out_dir: Path, seed: int = 0) -> Path:
    """A tiny model of a causal-LM family (FAMILIES) or a one-logit reward model (REWARD_FAMILIES),
    with its tokenizer, saved as a Hugging Face folder."""
    family = FAMILIES.get(name) or REWARD_FAMILIES[name]
    tokenizer = build_family_tokenizer(family)
    model = build_family_model(family, tokenizer, seed, num_labels=1 if name in REWARD_FAMILIES else None)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
