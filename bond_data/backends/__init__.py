"""Generation backends behind one contract (`base.py`): transformers (`hf.py`) and vLLM (`vllm.py`)."""

from __future__ import annotations

import threading

from bond_data.backends.base import Backend
from bond_data.device import free_memory

_LOADED: dict[tuple, Backend] = {}
_LOCK = threading.Lock()


def load_backend(name: str, model_dir: str, model_hash: str, batch_size: int, device: str | None,
                 engine_args: dict | None = None) -> Backend:
    """One loaded model per process, shared by the worker's threads and reused across shards. Asking
    for another checkpoint (the next round's anchor) releases the previous one first, so a process
    that runs many rounds holds one generator at a time."""
    key = (name, model_dir, model_hash, batch_size, device, tuple(sorted((engine_args or {}).items())))
    with _LOCK:
        if key not in _LOADED:
            _release_locked()
            if name == "transformers":
                from bond_data.backends.hf import TransformersBackend

                _LOADED[key] = TransformersBackend.from_pretrained(model_dir, batch_size=batch_size, device=device,
                                                                   **(engine_args or {}))  # {"decoding": ...}
            elif name == "vllm":
                from bond_data.backends.vllm import VLLMBackend

                _LOADED[key] = VLLMBackend(model_dir, **(engine_args or {}))
            else:
                raise ValueError(f"unknown generation backend {name!r}: use 'transformers' or 'vllm'")
        return _LOADED[key]


def release() -> None:
    """Drop every loaded generator (before training, say) and return its memory to the device."""
    with _LOCK:
        _release_locked()


def _release_locked() -> None:
    if not _LOADED:
        return
    _LOADED.clear()
    free_memory()
