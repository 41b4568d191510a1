"""The moving anchor: theta_a <- (1 - eta) theta_a + eta theta (BOND's EMA anchor, paper sec. 5).

eta = 0 keeps the anchor fixed during the round and the round ends with a hard refresh (the next
anchor is the trained policy); eta > 0 moves it every optimizer step and the EMA becomes the next
round's generator.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update(anchor: dict[str, torch.Tensor], policy: dict[str, torch.Tensor], eta: float) -> None:
    """In place, over matching floating-point tensors (buffers that are not floats are copied); a
    tensor held under two names (tied weights) moves once."""
    moved = set()
    for name, a in anchor.items():
        if id(a) in moved:
            continue
        moved.add(id(a))
        p = policy[name]
        if a.is_floating_point():
            a.lerp_(p.to(a.dtype), eta)
        else:
            a.copy_(p)


def ema_state(model) -> dict[str, torch.Tensor]:
    """state_dict with tied weights once, so the in-place EMA moves each tensor exactly once."""
    seen, out = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor
    return out
