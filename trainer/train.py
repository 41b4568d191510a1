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
   `bon_weight_pool` (never 0, so log w is finite; unbiased weights are 0 below rank N). Datasets
   built before `bon_weight_pool` existed use `bon_weight` for both terms;
3. log A is the dataset's `target_logprob`: the anchor's log-prob, or with `bond build --target
   sampler` the log-prob under the tempered sampler that drew the pool (older datasets:
   `anchor_logprob`);
4. log pi is computed under the precision policy the pool's log A was (bond_data/precision.py:
   fp32, or bf16 autocast with an fp32 LM head), so that rho = pi/A is 1 at initialisation.

    bond train --store DIR --round R [--beta 0.5 --eta 0 ...]          # one process
    torchrun --nproc_per_node=2 -m trainer.train --store DIR --round R  # DDP (gloo on CPU, nccl on GPU)
    bond train ... --lora r=16,alpha=32,targets=q_proj,v_proj          # adapters only (trainer/lora.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from bond_data import precision as precision_policy
from bond_data.backends.hf import prompt_token_ids
from bond_data.config import add_config_flags
from bond_data.device import resolve_device
from bond_data.store import Store, StoreError
from trainer import checkpoints, lora
from trainer.anchor import ema_update
from trainer.config import TrainConfig
from trainer.logprobs import collate
from trainer.losses import jeffreys_loss, sequence_logprobs
from trainer.metrics import MetricsLog


def train(store_root: str, cfg: TrainConfig) -> dict:
    """Train on the round's dataset and register the next anchor; rank 0 holds the store's writer lease."""
    store = Store(store_root)
    rank, world = _init_distributed()
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
    pool = precision_policy.pool_precision(store.sampling_settings(cfg.round))
    precision = precision_policy.check_training(cfg.precision, pool, device, cfg.round)  # before anything is written
    run_dir = store.root / "train" / f"round={cfg.round}" / dataset["dataset_id"]
    resume = checkpoints.latest_checkpoint(run_dir)
    anchor = store.anchor(cfg.round)
    policy, tokenizer = _load_trainable(anchor["anchor_path"], resume, cfg, device)
    precision_policy.fp32_head(policy)
    ema = {k: v.detach().clone() for k, v in _anchor_state(policy).items()} if cfg.eta > 0 else None
    model = torch.nn.parallel.DistributedDataParallel(policy) if world > 1 else policy

    rows = _load_rows(store.root / dataset["path"], tokenizer)
    plan = _batch_plan(rows, cfg.micro_batch_size, cfg.grad_accum, cfg.epochs, cfg.seed, world)  # [step][rank][micro]
    trainable = [p for p in policy.parameters() if p.requires_grad]  # all, or the LoRA adapters
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    step = _restore(resume, opt, sched, ema) if resume else 0

    log = MetricsLog(run_dir / "metrics.jsonl", rank, total=len(plan), start=step, label=f"train round {cfg.round}")
    metrics: dict = {}
    global_rows = cfg.micro_batch_size * cfg.grad_accum * world
    while step < len(plan):
        t0 = time.perf_counter()
        batch = [[rows[i] for i in micro] for micro in plan[step][rank]]
        metrics = train_step(model, batch, cfg.beta, cfg.gamma, global_rows, world, device, precision)  # fwd + bwd
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema_update(ema, _anchor_state(policy), cfg.eta)
        step += 1
        log.write(step, metrics, time.perf_counter() - t0, sched.get_last_lr()[0])
        if step % cfg.checkpoint_every == 0 or step == len(plan):
            _checkpoint(run_dir / f"step-{step}", policy, tokenizer, opt, sched, ema, step, rank, world)
    log.close()

    result = _refresh_anchor(store, cfg, dataset, anchor, policy, tokenizer, ema, rank, world, precision)
    return {**result, "steps": len(plan), "precision": precision, "pool_precision": pool, "last_step": metrics}  # last_step: {} when resumed at the end


# ---- setup -----------------------------------------------------------------------------------
def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _load_trainable(anchor_dir: str, resume: Path | None, cfg: TrainConfig, device: torch.device):
    """(policy, tokenizer): the whole model from the last checkpoint or the anchor, or with --lora
    the anchor as a frozen base with adapters (trainer/lora.py)."""
    if cfg.lora is not None:
        return lora.load_lora_policy(anchor_dir, resume, lora.parse_lora(cfg.lora), cfg.seed, device)
    if resume is not None and (resume / lora.ADAPTER_FILE).is_file():
        raise ValueError(f"{resume}: a LoRA checkpoint; resume it with the same --lora (or delete it)")
    return checkpoints.load_policy(resume or anchor_dir, device)


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


# ---- one optimizer step ----------------------------------------------------------------------
def train_step(model, micro_batches: list[list[dict]], beta: float, gamma: float, global_rows: int, world: int,
               device: torch.device, precision: str = "auto") -> dict:
    """Forward + backward over this rank's micro-batches of rows (prompt ids, completion ids, weight,
    weight_pool, log A); losses scaled so that the summed (and DDP-averaged) gradient is that of the mean over
    the `global_rows` rows of the global batch. `precision`: bond_data/precision.py (auto: by device)."""
    precision = precision_policy.resolve(precision, device)
    totals = {"loss": 0.0, "forward": 0.0, "backward": 0.0, "anchor_kl": 0.0, "log_ratio": 0.0, "tokens": 0}
    for i, batch in enumerate(micro_batches):
        input_ids, attention, labels, mask = collate(batch, device)
        weight = torch.tensor([r["weight"] for r in batch], device=device, dtype=torch.float32)  # forward term
        weight_pool = torch.tensor([r["weight_pool"] for r in batch], device=device, dtype=torch.float32)  # backward
        logp_anchor = torch.tensor([r["logp_anchor"] for r in batch], device=device, dtype=torch.float32)
        sync = contextlib.nullcontext() if i == len(micro_batches) - 1 or world == 1 else model.no_sync()
        with sync:
            with precision_policy.autocast(precision, device):
                logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]  # [B, T-1, V]
            logp_policy = sequence_logprobs(logits, labels, mask)  # [B]
            terms = jeffreys_loss(logp_policy, logp_anchor, weight, beta, gamma, weight_pool)
            scale = len(batch) / global_rows * world
            (terms["loss"] * scale).backward()
        for k in ("loss", "forward", "backward", "anchor_kl"):
            totals[k] += float(terms[k].detach()) * scale
        totals["log_ratio"] += float((logp_policy - logp_anchor).detach().sum()) / global_rows * world
        totals["tokens"] += int(mask.sum())
    return totals


# ---- logging, checkpoints, the anchor refresh -------------------------------------------------
def _checkpoint(folder: Path, policy, tokenizer, opt, sched, ema, step: int, rank: int, world: int) -> None:
    if rank == 0:
        state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "ema": ema,
                 "rng": torch.get_rng_state()}
        checkpoints.save_checkpoint(folder, policy, tokenizer, state=state, meta={"step": step})
    if world > 1:
        dist.barrier()


def _restore(folder: Path, opt, sched, ema) -> int:
    state = torch.load(folder / "trainer_state.pt", weights_only=True)  # tensors and plain data only: no code runs
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if ema is not None and state["ema"] is not None:
        for k, v in state["ema"].items():
            ema[k].copy_(v)
    torch.set_rng_state(state["rng"])
    return state["step"]


def _refresh_anchor(store: Store, cfg: TrainConfig, dataset: dict, anchor: dict, policy, tokenizer, ema,
                    rank: int, world: int, precision: str) -> dict:
    """Write A_{t+1} (EMA or hard refresh) atomically, then register it: that starts round t + 1."""
    folder = store.root / "anchors" / f"round={cfg.round + 1}"
    if rank == 0:
        if lora.is_lora(policy):  # the next anchor is a plain model: W + s * B @ A merged in
            policy = lora.merged_model(policy, ema)
        elif ema is not None:
            policy.load_state_dict(ema)
        meta = {"parent_round": cfg.round, "parent_hash": anchor["anchor_hash"], "dataset_id": dataset["dataset_id"],
                "precision": precision}
        digest = checkpoints.save_checkpoint(folder, policy, tokenizer, meta=meta)
        store.register_anchor(cfg.round + 1, str(folder), digest, parent_round=cfg.round,
                              config={**cfg.model_dump(), **meta})
    if world > 1:
        dist.barrier()
    return {"round": cfg.round, "next_anchor": store.anchor(cfg.round + 1), "skipped": False}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="BOND trainer (see the module docstring)")
    ap.add_argument("--store", required=True)
    ap.add_argument("--config")
    add_config_flags(ap, TrainConfig)
    args = vars(ap.parse_args(argv))
    cfg = TrainConfig.load(args.pop("config"), **{k: v for k, v in args.items() if k != "store"})
    print(json.dumps(train(args["store"], cfg), default=str))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
