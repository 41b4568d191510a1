"""LoRA training through `peft`: adapters on a frozen, shared base; an EMA of the adapters; a merged
next anchor.

    bond train --store DIR --round R --lora r=16,alpha=32,targets=q_proj,v_proj [--eta 0.02]

- Only the adapters (`lora_A`, `lora_B` of the target modules) train; the base weights stay frozen
  and are shared by the policy and the EMA anchor, which holds adapter tensors only.
- The EMA averages the adapters, A and B each: theta_a <- (1 - eta) theta_a + eta theta over the
  adapter tensors. The anchor's weight delta is then s * B_ema @ A_ema (s = alpha / r), which is not
  the EMA of the policy's deltas s * B @ A (a product is not linear); both start at the base.
- The registered next anchor is a *merged* full model (W + s * B @ A in every target module, saved
  like any checkpoint), so generation, scoring and the next round load it unchanged and round t + 1
  puts fresh adapters on it.
- Resumable checkpoints (`train/.../step-N`) hold the adapters only (`adapter_model.safetensors`,
  peft's format) beside the tokenizer and the trainer state; the base comes from the round's anchor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and peft load lazily: trainer.config imports parse_lora, `bond --help` imports that
    import torch

ADAPTER_FILE = "adapter_model.safetensors"
_KEYS = {"r", "alpha", "targets", "dropout"}


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0


def parse_lora(text: str) -> LoraSpec:
    """`r=16,alpha=32,targets=q_proj,v_proj[,dropout=0.05]`: a bare word after `targets=` is one more
    target module. Raises ValueError (one line) on anything else."""
    values: dict[str, list[str]] = {}
    key = None
    for part in (p.strip() for p in text.split(",")):
        if "=" in part:
            key, _, value = part.partition("=")
            key = key.strip()
            if key not in _KEYS:
                raise ValueError(f"unknown LoRA key {key!r} (use {', '.join(sorted(_KEYS))})")
            if key in values:
                raise ValueError(f"LoRA key {key!r} given twice")
            values[key] = [value.strip()]
        elif key == "targets" and part:
            values[key].append(part)
        else:
            raise ValueError(f"cannot read {part!r} in {text!r}: expected key=value")
    if "r" not in values or "targets" not in values:
        raise ValueError(f"{text!r}: r= and targets= are required, e.g. r=16,alpha=32,targets=q_proj,v_proj")
    r = _number(values["r"], int, "r")
    alpha = _number(values.get("alpha", [str(r)]), float, "alpha")
    dropout = _number(values.get("dropout", ["0"]), float, "dropout")
    targets = tuple(values["targets"])
    if r < 1 or alpha <= 0 or not 0 <= dropout < 1 or not all(t.replace("_", "").replace(".", "").isalnum() for t in targets):
        raise ValueError(f"{text!r}: need r >= 1, alpha > 0, 0 <= dropout < 1 and module names as targets")
    return LoraSpec(r=r, alpha=alpha, targets=targets, dropout=dropout)


def _number(value: list[str], kind: type, name: str):
    try:
        (v,) = value
        return kind(v)
    except ValueError:
        raise ValueError(f"LoRA {name}={','.join(value)} is not a{'n integer' if kind is int else ' number'}") from None


def add_adapters(model, spec: LoraSpec, seed: int):
    """The model wrapped in fresh LoRA adapters (peft), base frozen. The adapters' random init
    (A; B starts at 0, so the wrapped model equals the base) is seeded, so two runs agree."""
    import torch
    from peft import LoraConfig, get_peft_model

    missing = [t for t in spec.targets if not any(n.split(".")[-1] == t for n, _ in model.named_modules())]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no module of this {type(model).__name__}")
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                        lora_dropout=spec.dropout, bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def load_lora_policy(anchor_dir: str, resume: Path | None, spec: LoraSpec, seed: int, device: torch.device,
                     attn_implementation: str | None = None):
    """(policy with adapters, tokenizer): the base from the round's anchor (with that attention
    kernel), the adapters fresh or from the resumable checkpoint `resume`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from trainer.checkpoints import load_policy

    base, tokenizer = load_policy(anchor_dir, device, attn_implementation)
    policy = add_adapters(base, spec, seed)
    if resume is not None:
        if not (Path(resume) / ADAPTER_FILE).is_file():
            raise ValueError(f"{resume}: a full-model checkpoint; resume it without --lora (or delete it)")
        result = set_peft_model_state_dict(policy, load_file(str(Path(resume) / ADAPTER_FILE), device=str(device)))
        if result.unexpected_keys:
            raise ValueError(f"{resume}: adapters of another LoRA setting ({result.unexpected_keys[0]} ...)")
    policy.train()
    return policy, tokenizer


def is_lora(model) -> bool:
    """A peft-wrapped model (checked by module, so a full-model run never imports peft)."""
    return type(model).__module__.startswith("peft.")


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The trainable tensors (the adapters), live: what the EMA anchor averages."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def merged_model(policy, adapters: dict[str, torch.Tensor] | None):
    """The plain transformers model W + s * B @ A with `adapters` (the EMA) or the policy's own
    adapters (None) merged in: what is saved as the next anchor. Consumes the policy."""
    import torch

    if adapters is not None:
        live = adapter_state(policy)
        with torch.no_grad():
            for name, value in adapters.items():
                live[name].copy_(value)
    return policy.merge_and_unload()
