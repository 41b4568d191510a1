"""Where torch runs: one default for every component (generation, scoring, training, evaluation)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: `bond --help` should not pay for it
    import torch


def resolve_device(name: str | None) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1", ...) or, when None, cuda if a GPU is visible, else cpu."""
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def free_memory() -> None:
    """Collect what was just dropped and hand cached GPU memory back to the device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
