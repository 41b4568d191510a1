"""Where torch runs: one default for every component (generation, scoring, training, evaluation)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: `bond --help` should not pay for it
    import torch


def resolve_device(name: str | None) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1", ...) or, when None, cuda if a GPU is visible, else cpu."""
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


# dense bf16 tensor-core peak per GPU, FLOP/s (no sparsity), by a substring of the device's name
PEAK_BF16 = {"H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H200 NVL": 835e12,
             "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "L40": 181e12, "L4": 121e12, "A6000": 155e12}


def peak_bf16_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak (FLOP/s) if it is a GPU this table knows (longest name that
    matches wins: GH200 over H200), else None."""
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    found = [key for key in PEAK_BF16 if key in name]
    return PEAK_BF16[max(found, key=len)] if found else None


def free_memory() -> None:
    """Collect what was just dropped and hand cached GPU memory back to the device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
