"""FSDP2 for policies that do not fit one device: `bond train --fsdp` under torchrun.

Every decoder layer is its own `fully_shard` unit and the root (embeddings, final norm, LM head,
tied or not) another, so parameters, gradients, AdamW state and the EMA anchor (a copy of the
sharded state dict, as DTensors) are all split over the processes; a layer's full weights exist
only while it runs. The gathered weights stay fp32 and the body runs under the trainer's precision
policy (bond_data/precision.py: bf16 autocast with an fp32 head on CUDA), exactly as without FSDP:
FSDP's own bf16 parameter cast would make log pi another function of the weights than the
generator's log A. The price: all-gathers move fp32 (twice the bytes).

Checkpoints are sharded (torch.distributed.checkpoint): each process writes its own shards of the
model, optimizer and anchor into `step-N/` (written under a temporary name, then renamed, with a
manifest of file hashes as every checkpoint here), and a resumed run loads them back into the
freshly sharded model. The registered next anchor is a plain transformers folder, gathered on rank 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from bond_data.files import file_sha256
from trainer.checkpoints import MANIFEST


def shard(model: torch.nn.Module, layers: torch.nn.ModuleList, device: torch.device) -> torch.nn.Module:
    """fully_shard each decoder layer, then the root `model` (in place; returns it)."""
    mp = MixedPrecisionPolicy()  # fp32 weights and gradients: the precision policy's autocast does the rest
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def anchor_copy(policy: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The EMA anchor: a detached copy of the policy's state dict in `dtype` (sharded like it under
    FSDP); tied weights are copied once and held under both names."""
    copies, out = {}, {}
    for k, v in policy.state_dict().items():
        ptr = (v.to_local() if isinstance(v, DTensor) else v).data_ptr()
        if ptr not in copies:
            copies[ptr] = v.detach().to(dtype=dtype if v.is_floating_point() else v.dtype).clone()
        out[k] = copies[ptr]
    return out


def save_sharded(folder: Path, policy, opt, ema, extra: dict, rank: int) -> None:
    """Every process writes its shards to `folder` (collective); rank 0 adds the manifest last."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    state = {"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, opt),
             "ema": ema or {}, "extra": extra}
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if rank == 0:
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"files": files, "sharded": True, "step": extra["step"]}, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    dist.barrier()


def is_sharded(folder: Path) -> bool:
    return json.loads((Path(folder) / MANIFEST).read_text()).get("sharded", False)


def load_sharded(folder: Path, policy, opt, ema, extra: dict) -> dict:
    """Load a `save_sharded` checkpoint into the sharded policy, optimizer and anchor (collective);
    returns the `extra` dict it was saved with (scheduler state, step, RNG)."""
    state = {"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, opt),
             "ema": ema or {}, "extra": extra}
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(policy, state["model"])
    set_optimizer_state_dict(policy, opt, state["optim"])
    return state["extra"]


def full_state(policy, ema: dict | None) -> dict[str, torch.Tensor]:
    """The policy's (or, given, the anchor's) full state dict on CPU (collective: every rank calls it;
    all receive it, only rank 0 uses it)."""
    if ema is None:
        return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in ema.items()}
    return {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in full.items()}
