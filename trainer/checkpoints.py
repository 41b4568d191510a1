"""Checkpoints: `save_pretrained` (safetensors) into a temporary folder, a manifest with the sha256
of every file, then one rename. A folder without a valid manifest is not a checkpoint.

Training state (optimizer, scheduler, step, EMA anchor weights, RNG) sits beside the model in
`trainer_state.pt`, so an interrupted run resumes from its last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bond_data import attention
from bond_data.device import resolve_device
from bond_data.files import atomic_path, file_sha256, folder_sha256

MANIFEST = "manifest.json"


def save_checkpoint(folder: Path, model, tokenizer, state: dict | None = None, meta: dict | None = None) -> str:
    """Write model + tokenizer (+ training state) atomically; return the checkpoint's content hash."""
    folder = Path(folder)
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if state is not None:
            torch.save(state, tmp / "trainer_state.pt")
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"files": files, **(meta or {})}, indent=1, sort_keys=True))
    return model_hash(folder)


def model_hash(folder: Path) -> str:
    """Hash of the model and tokenizer files only (not the training state): the anchor's identity."""
    return folder_sha256(folder)


def is_complete(folder: Path) -> bool:
    """A checkpoint is complete when every file its manifest lists is there with its hash."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return False
    files = json.loads(manifest.read_text())["files"]
    return all((Path(folder) / n).is_file() and file_sha256(Path(folder) / n) == h for n, h in files.items())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete `step-N` checkpoint with the largest N, if any."""
    steps = sorted(Path(run_dir).glob("step-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    return next((p for p in steps if is_complete(p)), None)


def load_policy(folder, device: str | torch.device | None = None, attn_implementation: str | None = None):
    """(model in fp32 and train mode, tokenizer) from a transformers folder: what the trainers start from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    tokenizer = AutoTokenizer.from_pretrained(folder)
    attn = attention.transformers_name(attn_implementation, folder)  # varlen: checked and registered
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn).to(device)
    policy.train()
    return policy, tokenizer
