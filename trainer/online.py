"""Online J-BOND: Jeffreys BOND with fresh samples and an EMA anchor (Sessa et al. 2024,
arXiv 2407.14622, Algorithm 2), as an alternative to the offline trainer in trainer/train.py.

Every step, for each of `prompts_per_step` prompts x: one policy sample y ~ pi(.|x) and two anchor
samples y'_1, y'_2 ~ pi_anchor(.|x), all scored by the reward model r. Then

    forward   = -mean log pi(y'_best)             y'_best the better anchor sample (ties: y'_1):
                                                   a Best-of-2 sample of the anchor, so this is the
                                                   NLL whose gradient is that of KL(BoN_2(anchor) || pi)
    R(y)      = r_B(y) - (log pi(y) - log anchor(y))     r_B(y) = -log 16 if r(y) < min(r(y'_1), r(y'_2)),
                                                   else 0 ("below both" is strict: a tie with the
                                                   worse anchor sample is not penalised)
    backward  = -mean((R - mean R).detach() * log pi(y))    REINFORCE on KL(pi || BoN), batch-mean baseline
    anchor_kl = -mean((-lr - mean(-lr)).detach() * log pi(y)),  lr = log pi(y) - log anchor(y):
                                                   the REINFORCE gradient of KL(pi || anchor), kept as
                                                   its own surrogate (same as folding -gamma/beta lr into R)
    loss      = (1 - beta) forward + beta backward + gamma anchor_kl

and after each optimizer step theta_anchor <- (1 - eta) theta_anchor + eta theta (trainer.anchor).
Paper defaults: beta = 0.5, eta = 0.02, gamma = 0. Logged "backward_reward" is mean R (the negated
backward-KL estimate, up to a constant) and "log_ratio" is mean lr (the KL(pi || anchor)
estimate); "backward" and "anchor_kl" are surrogate values (zero mean by the baseline), only their
gradients matter.

How this differs from the paper, point by point:
  1. Policy gradient: plain REINFORCE with a batch-mean baseline over the step's prompts (the paper
     plugs r_J-BOND into its standard policy-gradient RLHF machinery). With one policy sample per
     prompt the baseline is shared across prompts; as it includes the sample itself, it scales the
     expected gradient by (1 - 1/B) and adds no bias in direction.
  2. Ties: "below both" is strict (r(y) < min): a tie with the worse anchor sample is not
     penalised; a tie between the two anchor samples picks y'_1. Ties have probability zero with a
     continuous reward model; with discrete rewards (the tiny task) they are common and this matters.
  3. Sequence level: log-probs are sums over the completion's tokens (EOS included when sampled);
     completions cut at max_new_tokens are scored and trained on as they are.
  4. The KL to the anchor uses exact per-sequence log-probs of both models on the policy sample
     (one sample per prompt), not a per-token KL; gamma's term has its own baseline.
  5. Optimiser: AdamW at a constant lr (no warm-up or schedule), global grad-norm clipping, one
     optimizer step per batch of prompts; prompts are shuffled per pass (seeded) and cycled.
  6. Sampling: temperature 1, no top-p/k, through bond_data.backends.hf (seeded Gumbel-max), with a
     distinct seed per (seed, step, slot, prompt, role, sample); dropout off (eval mode) throughout,
     so sampled sequences and their trained log-probs come from the same distribution.
  7. One process, no DDP or resume: the offline trainer has those; this mode is for small runs.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from bond_data.backends.base import Completion, PromptJob, Sampling
from bond_data.backends.hf import TransformersBackend, prompt_token_ids
from bond_data.device import resolve_device
from bond_data.schema import seed63
from bond_data.score import check_finite, load_reward_model, score_pairs
from trainer import checkpoints
from trainer.anchor import ema_state, ema_update
from trainer.config import OnlineConfig
from trainer.logprobs import completion_logprobs
from trainer.losses import best_of_two, jbond_loss
from trainer.metrics import MetricsLog


# ---- sampling and scoring --------------------------------------------------------------------
def _sample(backend, prompts: list[str], batch: list[int], step: int, role: str, n: int,
            cfg: OnlineConfig) -> list[list[Completion]]:
    jobs = [PromptJob(str(i), prompts[i], None, list(range(n)),
                      [seed63("online", cfg.seed, step, j, i, role, s) for s in range(n)]) for j, i in enumerate(batch)]
    return backend.generate(jobs, Sampling(max_new_tokens=cfg.max_new_tokens))


def _rewards(rm, prompts: list[str], completions: list[Completion], cfg: OnlineConfig) -> torch.Tensor:
    out = score_pairs(rm.score_batch, [(p, c.text) for p, c in zip(prompts, completions)], cfg.gen_batch_size)
    check_finite(out, lambda i: f"reward model {rm.rm_id} returned {out[i]} for prompt {prompts[i]!r}, "
                 f"completion {completions[i].text!r}")
    return torch.tensor(out, dtype=torch.float32)


def _logprobs(model, prompt_ids: list[list[int]], completions: list[Completion], device) -> torch.Tensor:
    """[B] log model(completion | prompt), summed over the completion's tokens."""
    rows = [{"prompt": p, "completion": c.token_ids} for p, c in zip(prompt_ids, completions)]
    return completion_logprobs(model, rows, device).cpu()


# ---- the loop --------------------------------------------------------------------------------
def _prompt_order(n_prompts: int, cfg: OnlineConfig) -> list[int]:
    """Prompt indices for all steps: seeded shuffles of all prompts, one pass after another."""
    need = cfg.steps * cfg.prompts_per_step
    passes = [np.random.default_rng(cfg.seed + e).permutation(n_prompts) for e in range(-(-need // n_prompts))]
    return np.concatenate(passes)[:need].tolist()


def _step(run: dict, prompts: list[str], batch: list[int], step: int, cfg: OnlineConfig) -> dict:
    """Sample, score, one optimizer step and the EMA update; returns the step's metrics."""
    policy, anchor, device = run["policy"], run["anchor"], run["device"]
    pol = [c[0] for c in _sample(run["policy_gen"], prompts, batch, step, "policy", 1, cfg)]
    anc = _sample(run["anchor_gen"], prompts, batch, step, "anchor", 2, cfg)
    texts = [prompts[i] for i in batch]
    r_pol = _rewards(run["rm"], texts, pol, cfg)
    r_a1, r_a2 = (_rewards(run["rm"], texts, [a[s] for a in anc], cfg) for s in (0, 1))
    first = best_of_two(r_a1, r_a2).tolist()
    best = [a[0] if f else a[1] for a, f in zip(anc, first)]
    ids = [run["prompt_ids"][i] for i in batch]
    with torch.no_grad():
        logp_anchor = _logprobs(anchor, ids, pol, device)
    logp = _logprobs(policy, ids + ids, pol + best, device)  # one forward pass for both terms
    terms = jbond_loss(logp[len(batch):], logp[: len(batch)], logp_anchor, r_pol, r_a1, r_a2, cfg.beta, cfg.gamma)
    terms["loss"].backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm))
    run["opt"].step()
    run["opt"].zero_grad(set_to_none=True)
    ema_update(run["anchor_state"], policy.state_dict(), cfg.eta)
    metrics = {k: float(v.detach()) for k, v in terms.items()}
    return {**metrics, "reward": float(r_pol.mean()), "reward_anchor": float((r_a1 + r_a2).mean() / 2),
            "reward_best_of_2": float(torch.maximum(r_a1, r_a2).mean()), "grad_norm": grad_norm,
            "tokens": sum(len(c.token_ids) for c in pol + best), "samples": 3 * len(batch)}


def _setup(policy_dir: str, reward_spec: str, prompts: list[str], cfg: OnlineConfig) -> dict:
    device = resolve_device(cfg.device)
    policy, tokenizer = checkpoints.load_policy(policy_dir, device)
    policy.eval()  # no dropout: samples and their log-probs share one distribution
    anchor = copy.deepcopy(policy).requires_grad_(False)
    saved_generation_config = copy.deepcopy(policy.generation_config)  # the backends replace it
    return {"device": device, "policy": policy, "anchor": anchor, "tokenizer": tokenizer,
            "anchor_state": ema_state(anchor), "generation_config": saved_generation_config,
            "policy_gen": TransformersBackend(policy, copy.deepcopy(tokenizer), device, cfg.gen_batch_size),
            "anchor_gen": TransformersBackend(anchor, copy.deepcopy(tokenizer), device, cfg.gen_batch_size),
            "rm": load_reward_model(reward_spec, device=cfg.device),
            "prompt_ids": [prompt_token_ids(tokenizer, p, None) for p in prompts],
            "opt": torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)}


def train_online(policy_dir: str, prompts: list[str], reward_spec: str, out_dir: Path, cfg: OnlineConfig,
                 metrics_path: Path | None = None) -> dict:
    """Start policy and anchor from policy_dir; run cfg.steps J-BOND steps; save the final policy
    into out_dir and the EMA anchor into out_dir/'anchor' (trainer.checkpoints.save_checkpoint).

    Returns the final step's loss terms, the mean reward of policy samples over the last
    min(5, steps) steps ("reward_last"), the number of samples generated and the two folders."""
    if not prompts:
        raise ValueError("train_online needs at least one prompt")
    run = _setup(policy_dir, reward_spec, prompts, cfg)
    order = _prompt_order(len(prompts), cfg)
    log = MetricsLog(Path(metrics_path), 0, total=cfg.steps, start=0) if metrics_path else None
    history = []
    try:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            batch = order[step * cfg.prompts_per_step : (step + 1) * cfg.prompts_per_step]
            history.append(_step(run, prompts, batch, step, cfg))
            if log is not None:
                log.write(step + 1, history[-1], time.perf_counter() - t0, cfg.lr)
    finally:
        if log is not None:
            log.close()
    return _save(run, Path(out_dir), cfg, history)


def _save(run: dict, out_dir: Path, cfg: OnlineConfig, history: list[dict]) -> dict:
    meta = {"mode": "online-jbond", "steps": cfg.steps, "config": cfg.model_dump()}
    for model in (run["policy"], run["anchor"]):  # the checkpoint keeps its own sampling defaults
        model.generation_config = copy.deepcopy(run["generation_config"])
    # the policy first: save_checkpoint replaces the whole folder, anchor/ included
    policy_hash = checkpoints.save_checkpoint(out_dir, run["policy"], run["tokenizer"], meta=meta)
    anchor_hash = checkpoints.save_checkpoint(out_dir / "anchor", run["anchor"], run["tokenizer"],
                                              meta={**meta, "role": "ema-anchor"})
    last = history[-min(5, len(history)):]
    final = {k: history[-1][k] for k in ("loss", "forward", "backward", "anchor_kl", "backward_reward",
                                         "log_ratio", "below_both")}
    return {**final, "reward_last": sum(m["reward"] for m in last) / len(last), "steps": len(history),
            "samples_generated": sum(m["samples"] for m in history), "policy_dir": str(out_dir),
            "policy_hash": policy_hash, "anchor_dir": str(out_dir / "anchor"), "anchor_hash": anchor_hash}
