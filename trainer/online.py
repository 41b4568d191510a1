"""Online J-BOND: Jeffreys BOND with fresh samples and an EMA anchor (Sessa et al. 2024,
arXiv 2407.14622, Algorithm 2), as an alternative to the offline trainer in trainer/train.py; and
the baseline it is compared with, REINFORCE with a KL penalty (`algorithm: reinforce`).

Every J-BOND step, for each of `prompts_per_step` prompts x: one policy sample y ~ pi(.|x) and two
anchor samples y'_1, y'_2 ~ pi_anchor(.|x), all scored by the reward model r. Then

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

Why the anchor log-ratio sits inside R, with weight beta, and gamma is an *extra* term. The text of
the paper's Algorithm 2 could not be read from here (the reference corpora hold only its first
page), so this is settled from the definitions. With pi_BoN the Best-of-2 of the anchor A,
Theorem 1 gives log pi_BoN(y) = log A(y) + log w(y), w = 2 p_le for a continuous reward, so

    KL(pi || pi_BoN) = E_pi[log pi(y) - log A(y) - log w(y)]
    grad KL(pi || pi_BoN) = -E_pi[grad log pi(y) * (log w(y) - (log pi(y) - log A(y)))]     (score function)

The log-ratio log pi - log A is part of the backward KL itself, not a regulariser: J_beta =
(1 - beta) KL(pi_BoN || pi) + beta KL(pi || pi_BoN) puts it under beta. The reward -log 16 *
[below both] stands in for log w (J-BOND's crude estimate of log p_le from two anchor samples, up to
a constant the baseline removes). Dropping the log-ratio from R and relying on gamma would make the
backward term chase the -log 16 reward alone, with no pull towards the anchor unless gamma > 0:
gamma = 0 (the paper's default) would then be unregularised. So the code keeps beta * (r_B - lr) as
the backward reward and gamma * KL(pi || A) as an optional extra, as before; gamma = beta doubles
the anchor pull. `tests/trainer/test_losses.py` checks the gradient against a naive loop.

REINFORCE + KL (`algorithm: reinforce`), the baseline RLHF method at the same generation budget:
each prompt gets 3 policy samples (J-BOND's 1 policy + 2 anchor samples), the reward is shaped with
the KL to the fixed starting policy pi_0, and the baseline is the mean of the other two samples of
the same prompt (leave-one-out, unbiased):

    R_i = r(y_i) - kl_coef * (log pi(y_i) - log pi_0(y_i)),   A_i = R_i - mean_{j != i} R_j
    loss = -mean(A_i.detach() * log pi(y_i))     expected gradient: -grad (E_pi[r] - kl_coef KL(pi || pi_0))

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
  7. One process, no DDP. Every `checkpoint_every` steps a resumable checkpoint (policy, EMA anchor,
     optimizer, the metrics so far) goes to `run_dir/step-N`; a rerun with the same config resumes
     from the latest complete one and ends exactly where an uninterrupted run would (every sample's
     seed depends only on the step). The saved policies double as the run's training curve.
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
from bond_data.logprobs import completion_logprobs
from trainer.losses import best_of_two, jbond_loss, reinforce_kl_loss
from trainer.metrics import MetricsLog

SAMPLES_PER_PROMPT = 3  # per step: J-BOND's 1 policy + 2 anchor samples; REINFORCE's 3 policy samples


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


# ---- one step --------------------------------------------------------------------------------
def _prompt_order(n_prompts: int, cfg: OnlineConfig) -> list[int]:
    """Prompt indices for all steps: seeded shuffles of all prompts, one pass after another (a
    longer run's order starts with a shorter one's)."""
    need = cfg.steps * cfg.prompts_per_step
    passes = [np.random.default_rng(cfg.seed + e).permutation(n_prompts) for e in range(-(-need // n_prompts))]
    return np.concatenate(passes)[:need].tolist()


def _jbond_terms(run: dict, prompts: list[str], batch: list[int], step: int, cfg: OnlineConfig) -> tuple[dict, dict]:
    """Sample and score; J-BOND's loss terms (trainer.losses.jbond_loss) and the step's metrics."""
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
    return terms, {"reward": float(r_pol.mean()), "reward_anchor": float((r_a1 + r_a2).mean() / 2),
                   "reward_best_of_2": float(torch.maximum(r_a1, r_a2).mean()),
                   "tokens": sum(len(c.token_ids) for c in pol + best)}


def _reinforce_terms(run: dict, prompts: list[str], batch: list[int], step: int, cfg: OnlineConfig) -> tuple[dict, dict]:
    """Sample and score SAMPLES_PER_PROMPT policy samples per prompt; REINFORCE + KL's loss terms
    (trainer.losses.reinforce_kl_loss) against the fixed starting policy, and the step's metrics."""
    outs = _sample(run["policy_gen"], prompts, batch, step, "policy", SAMPLES_PER_PROMPT, cfg)
    flat = [c for cs in outs for c in cs]  # [B * S], prompt-major
    texts = [prompts[i] for i in batch for _ in range(SAMPLES_PER_PROMPT)]
    ids = [run["prompt_ids"][i] for i in batch for _ in range(SAMPLES_PER_PROMPT)]
    r = _rewards(run["rm"], texts, flat, cfg)
    with torch.no_grad():
        logp_ref = _logprobs(run["anchor"], ids, flat, run["device"])  # eta = 0: the anchor stays pi_0
    logp = _logprobs(run["policy"], ids, flat, run["device"])
    terms = reinforce_kl_loss(r.view(len(batch), -1), logp.view(len(batch), -1), logp_ref.view(len(batch), -1),
                              cfg.kl_coef)
    return terms, {"reward": float(r.mean()), "tokens": sum(len(c.token_ids) for c in flat)}


def _step(run: dict, prompts: list[str], batch: list[int], step: int, cfg: OnlineConfig) -> dict:
    """Sample, score, one optimizer step and the EMA update; returns the step's metrics."""
    terms_of = _reinforce_terms if cfg.algorithm == "reinforce" else _jbond_terms
    terms, metrics = terms_of(run, prompts, batch, step, cfg)
    terms["loss"].backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run["policy"].parameters(), cfg.max_grad_norm))
    run["opt"].step()
    run["opt"].zero_grad(set_to_none=True)
    if cfg.algorithm == "jbond":
        ema_update(run["anchor_state"], run["policy"].state_dict(), cfg.eta)
    return {**{k: float(v.detach()) for k, v in terms.items()}, **metrics, "grad_norm": grad_norm,
            "samples": SAMPLES_PER_PROMPT * len(batch)}


# ---- the loop --------------------------------------------------------------------------------
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
                 metrics_path: Path | None = None, run_dir: Path | None = None) -> dict:
    """Start policy and anchor from policy_dir (or resume from the latest checkpoint in run_dir);
    run cfg.steps steps of cfg.algorithm; save the final policy into out_dir and the EMA anchor into
    out_dir/'anchor' (trainer.checkpoints.save_checkpoint).

    run_dir (default `<out_dir>-steps`) holds the resumable `step-N` checkpoints, every
    cfg.checkpoint_every steps and at the last; cfg.keep_checkpoints of them stay (0: all).
    Returns the final step's loss terms, the mean reward of policy samples over the last
    min(5, steps) steps ("reward_last"), the number of samples generated and the two folders."""
    if not prompts:
        raise ValueError("train_online needs at least one prompt")
    out_dir = Path(out_dir)
    run_dir = Path(run_dir) if run_dir is not None else out_dir.with_name(out_dir.name + "-steps")
    run = _setup(policy_dir, reward_spec, prompts, cfg)
    history = _resume(run, run_dir, cfg)
    order = _prompt_order(len(prompts), cfg)
    log = MetricsLog(Path(metrics_path), 0, total=cfg.steps, start=len(history)) if metrics_path else None
    try:
        for step in range(len(history), cfg.steps):
            t0 = time.perf_counter()
            batch = order[step * cfg.prompts_per_step : (step + 1) * cfg.prompts_per_step]
            history.append(_step(run, prompts, batch, step, cfg))
            if log is not None:
                log.write(step + 1, history[-1], time.perf_counter() - t0, cfg.lr)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                _checkpoint(run, run_dir, cfg, history)
    finally:
        if log is not None:
            log.close()
    return _save(run, out_dir, cfg, history)


# ---- checkpoints -----------------------------------------------------------------------------
RESUME_KEYS = ("algorithm", "beta", "eta", "gamma", "kl_coef", "lr", "prompts_per_step", "max_new_tokens",
               "max_grad_norm", "seed")  # what must match to continue a run (steps may grow)


def _save_model(run: dict, folder: Path, model, state: dict | None, meta: dict) -> str:
    """save_checkpoint with the checkpoint's own sampling defaults (the backends replaced them)."""
    live = model.generation_config
    model.generation_config = copy.deepcopy(run["generation_config"])
    try:
        return checkpoints.save_checkpoint(folder, model, run["tokenizer"], state=state, meta=meta)
    finally:
        model.generation_config = live


def _checkpoint(run: dict, run_dir: Path, cfg: OnlineConfig, history: list[dict]) -> None:
    """run_dir/step-N: the policy (loadable as a model) + trainer_state.pt (optimizer, EMA anchor
    tensors, config, per-step metrics); then drop all but the newest cfg.keep_checkpoints."""
    step = len(history)
    state = {"opt": run["opt"].state_dict(), "anchor": {k: v.clone() for k, v in run["anchor_state"].items()},
             "config": cfg.model_dump(), "history": history, "step": step}
    _save_model(run, run_dir / f"step-{step}", run["policy"], state, {"step": step, "mode": f"online-{cfg.algorithm}"})
    if cfg.keep_checkpoints:
        import shutil

        done = sorted(run_dir.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in done[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def _resume(run: dict, run_dir: Path, cfg: OnlineConfig) -> list[dict]:
    """Load the latest complete checkpoint of run_dir into run; its metrics history ([] if none)."""
    latest = checkpoints.latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if latest is None:
        return []
    state = torch.load(latest / "trainer_state.pt", weights_only=True)
    changed = [k for k in RESUME_KEYS if state["config"][k] != getattr(cfg, k)]
    if changed:
        was = ", ".join(f"{k}={state['config'][k]!r}" for k in changed)
        raise ValueError(f"{latest}: was trained with {was}; use another run_dir or the same settings")
    if state["step"] > cfg.steps:
        raise ValueError(f"{latest}: already at step {state['step']}, past steps={cfg.steps}")
    policy, _ = checkpoints.load_policy(latest, run["device"])
    with torch.no_grad():
        run["policy"].load_state_dict(policy.state_dict())
        for k, v in run["anchor_state"].items():
            v.copy_(state["anchor"][k])
    run["opt"].load_state_dict(state["opt"])
    return list(state["history"])


def _save(run: dict, out_dir: Path, cfg: OnlineConfig, history: list[dict]) -> dict:
    meta = {"mode": f"online-{cfg.algorithm}", "steps": cfg.steps, "config": cfg.model_dump()}
    # the policy first: save_checkpoint replaces the whole folder, anchor/ included
    policy_hash = _save_model(run, out_dir, run["policy"], None, meta)
    anchor_hash = _save_model(run, out_dir / "anchor", run["anchor"], None, {**meta, "role": "ema-anchor"})
    last = history[-min(5, len(history)):]
    final = {k: history[-1][k] for k in ("loss", "forward", "backward", "anchor_kl", "backward_reward",
                                         "log_ratio", "below_both", "kl_penalty") if k in history[-1]}
    return {**final, "reward_last": sum(m["reward"] for m in last) / len(last), "steps": len(history),
            "samples_generated": sum(m["samples"] for m in history), "policy_dir": str(out_dir),
            "policy_hash": policy_hash, "anchor_dir": str(out_dir / "anchor"), "anchor_hash": anchor_hash}
