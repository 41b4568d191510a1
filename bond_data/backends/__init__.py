"""Generation backends behind one contract (`base.py`): transformers (`hf.py`) and vLLM (`vllm.py`)."""

from __future__ import annotations

import threading

from bond_data.backends.base import Backend

_LOADED: dict[tuple, Backend] = {}
_LOCK = threading.Lock()


def load_backend(name: str, model_dir: str, model_hash: str, batch_size: int, device: str | None) -> Backend:
    """One loaded model per (backend, checkpoint, device) and process, shared by the worker's threads."""
    key = (name, model_dir, model_hash, batch_size, device)
    with _LOCK:
        if key not in _LOADED:
            if name == "transformers":
                from bond_data.backends.hf import TransformersBackend

                _LOADED[key] = TransformersBackend.from_pretrained(model_dir, batch_size=batch_size, device=device)
            elif name == "vllm":
                from bond_data.backends.vllm import VLLMBackend

                _LOADED[key] = VLLMBackend(model_dir)
            else:
                raise ValueError(f"unknown generation backend {name!r}: use 'transformers' or 'vllm'")
        return _LOADED[key]
