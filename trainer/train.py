"""The BOND trainer: distil the Best-of-N distribution of a round's anchor into the policy.

    minimise  (1 - beta) KL(pi_BoN || pi) + beta KL(pi || pi_BoN) + gamma KL(pi || A)      (paper eq. 10)

over the round's distillation dataset: every pool sample y_i ~ A with its Best-of-N weights and
log A(y_i). Then refresh the anchor: the EMA of the policy (eta > 0) or the policy itself
(eta = 0), registered as the next round's generator.

How this differs from the paper:
1. the forward term uses all k pool samples, weighted by `bon_weight` (by default the unbiased
   weights: exactly Best-of-N of A in expectation), instead of one sampled Best-of-N completion;
2. the backward term is estimated offline on the anchor's pool with importance weights pi/A
   (trainer/losses.py) instead of on fresh policy samples, and against the *pool* weights
   `bon_weight_pool` (never 0, so log w is finite; unbiased weights are 0 below rank N),
   optionally (`self_normalize`, off by default) with rho / mean(rho) over each micro-batch
   (trainer/losses.py). Datasets
   built before `bon_weight_pool` existed use `bon_weight` for both terms;
3. log A is the dataset's `target_logprob`: the anchor's log-prob, or with `bond build --target
   sampler` the log-prob under the tempered sampler that drew the pool (older datasets:
   `anchor_logprob`);
4. log pi is computed under the precision policy the pool's log A was (bond_data/precision.py:
   fp32, or bf16 autocast with an fp32 LM head), so that rho = pi/A is 1 at initialisation.

The step (trainer/step.py) packs each micro-batch's rows into shared rows and takes log-probs
through a chunked LM head at completion positions only (bond_data/packing.py, bond_data/logprobs.py):
the same numbers as padded rows and full logits, without the [tokens, vocab] tensors.

    bond train --store DIR --round R [--beta 0.5 --eta 0 ...]          # one process
    torchrun --nproc_per_node=2 -m trainer.train --store DIR --round R  # DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=8 -m trainer.train --store DIR --round R --fsdp true  # FSDP2 (trainer/fsdp.py)
    bond train ... --lora r=16,alpha=32,targets=q_proj,v_proj          # adapters only (trainer/lora.py)
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bond_data import attention
from bond_data import precision as precision_policy
from bond_data.backends.hf import prompt_token_ids
from bond_data.config import FlagParser, add_config_flags
from bond_data.device import peak_bf16_flops, resolve_device
from bond_data.errors import error_line
from bond_data.store import Store, StoreError
from trainer import checkpoints, fsdp, lora
from trainer.anchor import ema_update
from trainer.config import MEMORY_HINT, TrainConfig
from bond_data.logprobs import SequenceLogprobs
from trainer.step import train_step
from trainer.metrics import MetricsLog, mfu


def train(store_root: str, cfg: TrainConfig) -> dict:
    """Train on the round's dataset and register the next anchor; rank 0 holds the store's writer lease."""
    rank, world = _init_distributed(cfg.fsdp)
    if cfg.fsdp and cfg.lora is not None:
        raise ValueError("field 'fsdp': not with --lora (LoRA adapters are small: DDP replicates them)")
    if cfg.fsdp and not dist.is_initialized():
        raise ValueError("field 'fsdp': needs torch.distributed; run under torchrun "
                         "(python -m torch.distributed.run --nproc_per_node=N -m trainer.train ...; N = 1 works)")
    store = Store(store_root)
    if not store.exists():  # a misspelt --store must not create one (the writer lease would)
        raise StoreError(f"no BOND store at {store.root}: create one with `bond init --store DIR --anchor MODEL`")
    lease = store.writing(f"bond train --round {cfg.round}") if rank == 0 else contextlib.nullcontext()
    with lease:
        return _train(store, cfg, rank, world)


def _train(store: Store, cfg: TrainConfig, rank: int, world: int) -> dict:
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    done = store.anchor(cfg.round + 1)
    if done is not None:  # this round was trained and its successor registered: nothing to do
        return {"round": cfg.round, "next_anchor": done, "skipped": True}

    dataset = _dataset_record(store, cfg)
    settings = store.sampling_settings(cfg.round)  # how the pool was drawn: its precision policy and attention
    pool = precision_policy.pool_precision(settings)
    precision = precision_policy.check_training(cfg.precision, pool, device, cfg.round)  # before anything is written
    run_dir = store.root / "train" / f"round={cfg.round}" / dataset["dataset_id"]
    resume = checkpoints.latest_checkpoint(run_dir)
    sharded_resume = resume is not None and fsdp.is_sharded(resume)
    if resume is not None and sharded_resume != cfg.fsdp:
        raise ValueError(f"field 'fsdp': {resume} was written {'with' if sharded_resume else 'without'} --fsdp; "
                         "resume with the same setting")
    anchor = store.anchor(cfg.round)
    policy, tokenizer = _load_trainable(anchor["anchor_path"], None if sharded_resume else resume, cfg, device)
    if rank == 0:
        attention.check_pool(settings, policy, precision, cfg.round)
    precision_policy.fp32_head(policy)  # the chunked head computes in fp32 anyway; this covers head.forward
    # the model FLOPs of a token, forward and backward (6 N, tied weights once; not for LoRA, whose frozen base
    # has no weight gradients), against the GPU's bf16 peak: `mfu` in the metrics (bf16-autocast on a known GPU)
    flops = None if lora.is_lora(policy) else 6 * sum(p.numel() for p in policy.parameters())
    peak = peak_bf16_flops(device) if precision == "bf16-autocast" else None
    model = _wrap(policy, cfg, device, world)  # SequenceLogprobs, under FSDP2 / DDP when distributed
    ema = _anchor_copy(policy, getattr(torch, cfg.anchor_dtype)) if cfg.eta > 0 else None

    rows = _load_rows(store.root / dataset["path"], tokenizer)
    plan = _batch_plan(rows, cfg.micro_batch_size, cfg.grad_accum, cfg.epochs, cfg.seed, world)  # [step][rank][micro]
    trainable = [p for p in policy.parameters() if p.requires_grad]  # all, or the LoRA adapters
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    step = _restore(resume, policy, opt, sched, ema, sharded_resume) if resume else 0

    label = f"train round {cfg.round}"
    with MetricsLog(run_dir / "metrics.jsonl", rank, total=len(plan), start=step, label=label, flops_per_token=flops,
                    peak_flops=peak) as log:
        metrics: dict = {}
        fed = {"tokens": 0, "positions": 0}  # this run's steps: the padding share it prints
        first, later = None, [0, 0.0]  # tokens and seconds of its first step (warm-up, compilation) and the others
        global_rows = cfg.micro_batch_size * cfg.grad_accum * world
        while step < len(plan):
            t0 = time.perf_counter()
            batch = [[rows[i] for i in micro] for micro in plan[step][rank]]
            metrics = train_step(model, batch, cfg.beta, cfg.gamma, global_rows, world, device, precision,
                                 packing=cfg.packing, pack_length=cfg.pack_length,
                                 self_normalize=cfg.self_normalize)  # forward + backward
            norm = _clip_gradients(trainable, cfg.max_grad_norm)
            fed = {k: fed[k] + metrics[k] for k in fed}
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema_update(ema, _anchor_state(policy), cfg.eta)
            metrics["grad_norm"] = float(norm)  # read once the optimizer's kernels are queued
            step += 1
            seconds = time.perf_counter() - t0
            if first is None:
                first = (metrics["tokens"], seconds)
            else:
                later = [later[0] + metrics["tokens"], later[1] + seconds]
            log.write(step, metrics, seconds, sched.get_last_lr()[0])
            if step % cfg.checkpoint_every == 0 or step == len(plan):
                _checkpoint(run_dir / f"step-{step}", policy, tokenizer, opt, sched, ema, step, rank, world, cfg.fsdp)

    final = _final_model(policy, ema, cfg, anchor["anchor_path"], rank)  # rank 0: a plain model to register
    result = _refresh_anchor(store, cfg, dataset, anchor, final, tokenizer, rank, world, precision)
    padding = 1 - fed["tokens"] / fed["positions"] if fed["positions"] else None  # None when resumed at the end
    tokens, seconds = later if later[1] > 0 else (first or (0, 0.0))  # this process's, after the first step
    speed = tokens / seconds if seconds > 0 else None
    return {**result, "steps": len(plan), "precision": precision, "pool_precision": pool, "padding": padding,
            "tokens_per_s": speed, "mfu": mfu(flops, peak, speed),
            "last_step": metrics}  # last_step: {} when resumed at the end


def _wrap(policy, cfg: TrainConfig, device: torch.device, world: int) -> torch.nn.Module:
    """The policy as a SequenceLogprobs module (chunked LM head), with activation checkpointing and
    torch.compile per decoder layer (and the head's logsumexp) if asked, sharded (FSDP2) or replicated (DDP) over processes."""
    if cfg.activation_checkpointing:  # transformers >= 5.24 renamed gradient_checkpointing_enable
        enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    layers = policy.get_decoder().layers
    if cfg.compile:
        for layer in layers:
            layer.compile(dynamic=True)
    model = SequenceLogprobs(policy, cfg.logprob_chunk, fused_lse=cfg.compile,  # the head's logsumexp compiled too
                             bf16_backward=cfg.head_backward == "bf16")
    if cfg.fsdp:
        return fsdp.shard(model, layers, device)
    return torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model


# ---- setup -----------------------------------------------------------------------------------
def _init_distributed(fsdp: bool) -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; FSDP needs a process group even for one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if (world > 1 or (fsdp and "MASTER_ADDR" in os.environ)) and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _load_trainable(anchor_dir: str, resume: Path | None, cfg: TrainConfig, device: torch.device):
    """(policy, tokenizer): the whole model from the last checkpoint or the anchor, or with --lora
    the anchor as a frozen base with adapters (trainer/lora.py)."""
    if cfg.lora is not None:
        return lora.load_lora_policy(anchor_dir, resume, lora.parse_lora(cfg.lora), cfg.seed, device,
                                     cfg.attn_implementation)
    if resume is not None and (resume / lora.ADAPTER_FILE).is_file():
        raise ValueError(f"{resume}: a LoRA checkpoint; resume it with the same --lora (or delete it)")
    return checkpoints.load_policy(resume or anchor_dir, device, cfg.attn_implementation)


def _anchor_copy(policy, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The EMA anchor's own copy of `_anchor_state` in `dtype` (sharded like the policy under FSDP)."""
    if lora.is_lora(policy):
        return {k: v.detach().to(dtype).clone() for k, v in lora.adapter_state(policy).items()}
    return fsdp.anchor_copy(policy, dtype)


def _anchor_state(policy) -> dict[str, torch.Tensor]:
    """What the EMA anchor averages: the whole state, or only the adapters under LoRA."""
    return lora.adapter_state(policy) if lora.is_lora(policy) else policy.state_dict()


def _dataset_record(store: Store, cfg: TrainConfig) -> dict:
    rows = store.query(
        "SELECT dataset_id, path, n, rm_id FROM datasets WHERE round = $round "
        "AND ($id IS NULL OR dataset_id = $id) ORDER BY registered_at DESC LIMIT 1",
        {"round": cfg.round, "id": cfg.dataset_id},
    ).to_pylist()
    if not rows:
        raise StoreError(f"round {cfg.round} has no dataset{' ' + cfg.dataset_id if cfg.dataset_id else ''}: run `bond build`")
    return rows[0]


def _load_rows(path: Path, tokenizer) -> list[dict]:
    """Each row: prompt ids + completion ids (as generated), the forward and backward weights, log A.
    Older datasets lack `bon_weight_pool` and `target_logprob`: `bon_weight` and `anchor_logprob`."""
    names = set(pq.read_schema(path).names)
    weight_pool = "bon_weight_pool" if "bon_weight_pool" in names else "bon_weight"
    logp_anchor = "target_logprob" if "target_logprob" in names else "anchor_logprob"
    columns = sorted({"prompt", "messages", "token_ids", "bon_weight", weight_pool, logp_anchor})
    rows = []
    for r in pq.read_table(path, columns=columns).to_pylist():
        messages = r["messages"]  # [{role, content}]; datasets built before it became a list hold JSON text
        messages = json.loads(messages) if isinstance(messages, str) else messages or None
        prompt = prompt_token_ids(tokenizer, r["prompt"], messages)
        rows.append({"prompt": prompt, "completion": r["token_ids"], "weight": r["bon_weight"],
                     "weight_pool": r[weight_pool], "logp_anchor": r[logp_anchor]})
    return rows


def _batch_plan(rows: list[dict], micro_batch_size: int, grad_accum: int, epochs: int, seed: int,
                world: int) -> list[list[list[list[int]]]]:
    """plan[step][rank] = that rank's micro-batches. A global batch is shuffled per epoch, sorted by
    length within itself (less padding) and dealt out identically whatever the world size, so a
    run on 2 processes sees the same global batches as one process with twice the accumulation."""
    per_step = micro_batch_size * grad_accum * world
    lengths = np.array([len(r["prompt"]) + len(r["completion"]) for r in rows])
    plan = []
    for epoch in range(epochs):
        order = np.random.default_rng(seed + epoch).permutation(len(rows))
        for start in range(0, len(order) - per_step + 1, per_step):  # drop the ragged tail
            batch = sorted(order[start : start + per_step].tolist(), key=lambda i: lengths[i])
            micro = [batch[m : m + micro_batch_size] for m in range(0, per_step, micro_batch_size)]
            plan.append([micro[r::world] for r in range(world)])
    if not plan:
        raise ValueError(f"dataset has {len(rows)} rows, fewer than one global batch of {per_step}")
    return plan


# ---- one optimizer step (forward + backward: trainer/step.py) -------------------------------
def _clip_gradients(params: list, max_norm: float) -> torch.Tensor:
    """Global gradient-norm clip; the norm before clipping, on the device (a DTensor under FSDP: gathered)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ---- logging, checkpoints, the anchor refresh -------------------------------------------------
def _checkpoint(folder: Path, policy, tokenizer, opt, sched, ema, step: int, rank: int, world: int,
                sharded: bool) -> None:
    if sharded:  # every process writes its shards
        extra = {"step": step, "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}
        fsdp.save_sharded(folder, policy, opt, ema, extra, rank)
        return
    if rank == 0:
        state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "ema": ema,
                 "rng": torch.get_rng_state()}
        checkpoints.save_checkpoint(folder, policy, tokenizer, state=state, meta={"step": step})
    if world > 1:
        dist.barrier()


def _restore(folder: Path, policy, opt, sched, ema, sharded: bool) -> int:
    if sharded:
        extra = {"step": 0, "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}
        state = fsdp.load_sharded(folder, policy, opt, ema, extra)
    else:
        state = torch.load(folder / "trainer_state.pt", weights_only=True)  # tensors and plain data only: no code runs
        opt.load_state_dict(state["optimizer"])
        if ema is not None and state["ema"] is not None:
            for k, v in state["ema"].items():
                ema[k].copy_(v)
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["step"]


def _final_model(policy, ema, cfg: TrainConfig, anchor_path: str, rank: int):
    """The next anchor as a plain model on rank 0 (None elsewhere): the EMA (eta > 0) or the policy.
    Under FSDP the full weights are gathered into a fresh unsharded copy of the architecture."""
    if not cfg.fsdp:
        if rank != 0:
            return None
        if lora.is_lora(policy):  # the next anchor is a plain model: W + s * B @ A merged in
            return lora.merged_model(policy, ema)
        if ema is not None:
            policy.load_state_dict(ema)
        return policy
    state = fsdp.full_state(policy, ema)  # collective
    if rank != 0:
        return None
    plain, _ = checkpoints.load_policy(anchor_path, torch.device("cpu"), cfg.attn_implementation)
    plain.load_state_dict(state)
    return plain


def _refresh_anchor(store: Store, cfg: TrainConfig, dataset: dict, anchor: dict, final, tokenizer,
                    rank: int, world: int, precision: str) -> dict:
    """Write A_{t+1} (EMA or hard refresh, as `final` on rank 0) atomically, then register it: that
    starts round t + 1."""
    folder = store.root / "anchors" / f"round={cfg.round + 1}"
    if rank == 0:
        meta = {"parent_round": cfg.round, "parent_hash": anchor["anchor_hash"], "dataset_id": dataset["dataset_id"],
                "precision": precision}
        digest = checkpoints.save_checkpoint(folder, final, tokenizer, meta=meta)
        store.register_anchor(cfg.round + 1, str(folder), digest, parent_round=cfg.round,
                              config={**cfg.model_dump(), **meta})
    if world > 1:
        dist.barrier()
    return {"round": cfg.round, "next_anchor": store.anchor(cfg.round + 1), "skipped": False}


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.train` (under torchrun for DDP / FSDP): the result as JSON; a user error as one
    `error:` line per process and exit code 2, as `bond train` reports it."""
    ap = FlagParser(prog="python -m trainer.train", description="BOND trainer (see the module docstring)")
    ap.add_argument("--store", required=True)
    ap.add_argument("--config")
    add_config_flags(ap, TrainConfig)
    args = vars(ap.parse_args(argv))
    try:
        cfg = TrainConfig.load(args.pop("config"), **{k: v for k, v in args.items() if k != "store"})
        result = train(args["store"], cfg)
    except Exception as e:  # a user error or a device out of memory: one line; a bug keeps its traceback
        line = error_line(e, MEMORY_HINT)
        if line is None:
            raise
        print(line, file=sys.stderr)
        code = 2
    else:
        print(json.dumps(result, default=str))
        code = 0
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
