"""Evaluation of a policy against the first reference policy pi_0, next to analytic Best-of-N.

Why a fixed pool: BOND's quantile p_le(y) = P_{y' ~ pi_0}[r(y') <= r(y)] is measured against pi_0,
so we draw k completions per held-out prompt from pi_0 once (`ensure_eval_pool`) and compare every
round's policy to that same pool. If pi_t were exactly Best-of-N of pi_0 (N = n^t), the quantile of
its samples would be Beta(N, 1): E[p_le] = N/(N+1), E[log p_le] = -1/N, KL(pi_t || pi_0) =
log N - (N-1)/N (`analytic_row`). `evaluate_policy` measures the same three numbers and the mean
reward, and `plot_reward_vs_kl` draws them for a run of rounds.

p_le of a policy sample y counts y itself among the pool, (#{pool r <= r(y)} + 1) / (k + 1), as the
dataset's definition does, so log p_le is always finite; for pi_0 against its own pool with
continuous rewards its mean is (k+2) / (2(k+1)), a shade above 1/2 (ties push it higher still).

The analytic row is the reference for a *continuous* reward only. With ties (a discrete reward, the
tiny task) Best-of-N is weaker than Beta(N, 1) and its KL is below log N - (N-1)/N (an upper bound,
Beirami et al. 2024, arXiv 2401.01879), so each policy is also set beside Best-of-N *measured on
the task*: `evaluate_best_of_n` samples it and evaluates it the same way, and `bon_kl_exact` gives
its KL to pi_0 exactly, ties included, from the pool's reward law (Theorem 1 summed over a reward
level). `ks_distance` compares two quantile samples (a policy against measured Best-of-N) and
`ks_noise` says how far apart two samples of one law typically are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bond_data.backends.base import PromptJob, Sampling
from bond_data.bon import analytic_bon
from bond_data.files import atomic_path, file_sha256, folder_sha256, write_parquet_atomic, write_text_atomic
from bond_data.schema import seed63

POOL_FILE, META_FILE = "eval_pool.parquet", "eval_pool.json"
BATCH_SIZE = 64  # generation, reward and pi_0 scoring micro-batches


def _backend(model_dir: str):
    from bond_data.backends.hf import TransformersBackend

    # every pass here runs under the device's policy (auto), as the generate stage's: weights held for it
    return TransformersBackend.from_pretrained(model_dir, batch_size=BATCH_SIZE, precision="auto")


def _sample(backend, prompts: list[str], per_prompt: int, max_new_tokens: int, tag: str, seed: int):
    """per_prompt completions of every prompt at temperature 1 (the distribution KL is about). The
    pool ("pool") and the policy samples ("eval") never share a seed, and a sample does not depend
    on batching."""
    jobs = [PromptJob(str(i), p, None, list(range(per_prompt)), [seed63(tag, seed, i, s) for s in range(per_prompt)])
            for i, p in enumerate(prompts)]
    return backend.generate(jobs, Sampling(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens))


def _rewards(reward_spec: str, pairs: list[tuple[str, str]]) -> np.ndarray:
    from bond_data.score import check_finite, load_reward_model, score_pairs

    rewards = score_pairs(load_reward_model(reward_spec).score_batch, pairs, BATCH_SIZE)
    check_finite(rewards, lambda i: f"reward model {reward_spec} returned {rewards[i]} for {pairs[i]!r}")
    return np.asarray(rewards)


# ---- the pool ----------------------------------------------------------------------------------
def ensure_eval_pool(folder: Path, pi0_dir: str, prompts_file: str, reward_spec: str, k: int = 64,
                     max_new_tokens: int = 16, seed: int = 0) -> Path:
    """Sample k completions per held-out prompt from pi_0 once, score them, write
    `folder/eval_pool.parquet` (columns prompt, completion, reward) and return its path.

    Reused while `eval_pool.json` beside it records the same arguments and the same content of
    pi_0, of the prompts file and of the reward model; rebuilt otherwise. The record is removed
    before the pool is rewritten, so a crash in between never leaves a stale record that matches.
    """
    from bond_data.score import describe_reward_model

    folder = Path(folder)
    pool, meta_path = folder / POOL_FILE, folder / META_FILE
    meta = {"pi0_hash": folder_sha256(Path(pi0_dir)), "prompts_hash": file_sha256(Path(prompts_file)),
            "reward_spec": reward_spec, "reward_hash": describe_reward_model(reward_spec)[1],
            "k": k, "max_new_tokens": max_new_tokens, "seed": seed}
    if pool.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        return pool
    meta_path.unlink(missing_ok=True)
    prompts = [json.loads(line)["prompt"] for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    outs = _sample(_backend(pi0_dir), prompts, k, max_new_tokens, "pool", seed)
    pairs = [(p, c.text) for p, cs in zip(prompts, outs) for c in cs]
    rewards = _rewards(reward_spec, pairs)
    table = pa.table({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs],
                      "reward": pa.array(rewards, pa.float64())})
    write_parquet_atomic(table, pool)
    write_text_atomic(json.dumps(meta, indent=2) + "\n", meta_path)
    return pool


def read_pool(pool_path: Path) -> dict[str, np.ndarray]:
    """Prompt -> its pool rewards, prompts in file order."""
    table = pq.read_table(pool_path, columns=["prompt", "reward"]).to_pydict()
    groups: dict[str, list[float]] = {}
    for p, r in zip(table["prompt"], table["reward"]):
        groups.setdefault(p, []).append(r)
    return {p: np.asarray(rs, dtype=np.float64) for p, rs in groups.items()}


def quantile_against_pool(pool_rewards: np.ndarray, reward: np.ndarray) -> np.ndarray:
    """(#{pool r <= r(y)} + 1) / (k + 1): y counts itself, so p_le is in (0, 1] and log p_le finite."""
    below = np.searchsorted(np.sort(pool_rewards), reward, side="right")
    return (below + 1) / (len(pool_rewards) + 1)


# ---- one policy ------------------------------------------------------------------------------
def _logprobs_under(backend, prompts: list[str], token_ids: list[list[int]]) -> np.ndarray:
    """log pi_0(y | x) of given completion token ids over the exact context they were sampled in
    (prompt_token_ids), as the trainer scores them."""
    import torch

    from bond_data.backends.hf import prompt_token_ids
    from bond_data.logprobs import completion_logprobs

    out = []
    for start in range(0, len(prompts), BATCH_SIZE):
        rows = [{"prompt": prompt_token_ids(backend.tokenizer, p, None), "completion": y}
                for p, y in zip(prompts[start : start + BATCH_SIZE], token_ids[start : start + BATCH_SIZE])]
        with torch.inference_mode():
            out.append(completion_logprobs(backend.model, rows, backend.device).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def evaluate_policy(policy_dir: str, pi0_dir: str, pool_path: Path, reward_spec: str,
                    samples_per_prompt: int = 8, max_new_tokens: int = 16, seed: int = 1) -> dict:
    """Mean reward, p_le, log p_le and KL(pi_t || pi_0) of fresh policy samples on the pool's prompts.

    kl is the Monte Carlo mean of log pi_t(y) - log pi_0(y) over y ~ pi_t: log pi_t is what the
    sampling backend recorded (temperature 1), log pi_0 a forward pass of pi_0 on the same token ids.
    For policy_dir == pi0_dir both sides are the same model, so kl is 0 up to float noise.
    """
    pool = read_pool(Path(pool_path))
    prompts = list(pool)
    outs = _sample(_backend(policy_dir), prompts, samples_per_prompt, max_new_tokens, "eval", seed)
    flat_prompts = [p for p, cs in zip(prompts, outs) for _ in cs]
    flat = [c for cs in outs for c in cs]
    rewards = _rewards(reward_spec, [(p, c.text) for p, c in zip(flat_prompts, flat)])
    per_prompt = rewards.reshape(len(prompts), samples_per_prompt)
    p_le = np.concatenate([quantile_against_pool(pool[p], r) for p, r in zip(prompts, per_prompt)])
    logp_policy = np.array([c.anchor_logprob for c in flat], dtype=np.float64)
    logp_pi0 = _logprobs_under(_backend(pi0_dir), flat_prompts, [c.token_ids for c in flat])
    return {"reward": float(rewards.mean()), "p_le": float(p_le.mean()), "log_p_le": float(np.log(p_le).mean()),
            "kl": float((logp_policy - logp_pi0).mean()), "samples": len(flat), "quantiles": p_le.tolist()}


def evaluate_best_of_n(pi0_dir: str, pool_path: Path, reward_spec: str, n: int, samples_per_prompt: int = 8,
                       max_new_tokens: int = 16, seed: int = 2) -> dict:
    """Best-of-n sampling itself (the target BOND distils): per prompt, `samples_per_prompt` groups of
    n fresh pi_0 samples, the best of each group kept (the first wins ties, as an argmax does).

    Best-of-n has no density to sample a KL from; "kl" is its exact KL to pi_0 on the pool's reward
    law, ties included (`bon_kl_on_pool`), "kl_analytic" the continuous-reward log n - (n-1)/n."""
    return evaluate_best_of_ns(pi0_dir, pool_path, reward_spec, [n], samples_per_prompt, max_new_tokens, seed)[n]


def evaluate_best_of_ns(pi0_dir: str, pool_path: Path, reward_spec: str, ns: list[int], samples_per_prompt: int = 8,
                        max_new_tokens: int = 16, seed: int = 2) -> dict[int, dict]:
    """`evaluate_best_of_n` for several n from one draw of max(ns) * samples_per_prompt pi_0 samples
    per prompt: Best-of-n takes the first n * samples_per_prompt of them, in groups of n. Each n's
    figures are those of Best-of-n sampling; across n they share samples (not independent)."""
    pool = read_pool(Path(pool_path))
    prompts = list(pool)
    draw = max(ns) * samples_per_prompt
    outs = _sample(_backend(pi0_dir), prompts, draw, max_new_tokens, f"bon{max(ns)}", seed)
    pairs = [(p, c.text) for p, cs in zip(prompts, outs) for c in cs]
    rewards = _rewards(reward_spec, pairs).reshape(len(prompts), draw)
    out = {}
    for n in ns:
        groups = rewards[:, : n * samples_per_prompt].reshape(len(prompts), samples_per_prompt, n)
        best = np.take_along_axis(groups, groups.argmax(-1)[..., None], -1)[..., 0]  # [prompts, samples]
        p_le = np.concatenate([quantile_against_pool(pool[p], r) for p, r in zip(prompts, best)])
        out[n] = {"reward": float(best.mean()), "p_le": float(p_le.mean()), "log_p_le": float(np.log(p_le).mean()),
                  "kl": bon_kl_on_pool(pool, n), "kl_analytic": analytic_row(n)["kl"], "samples": int(groups.size),
                  "quantiles": p_le.tolist()}
    return out


# ---- Best-of-N measured on the task: exact KL with ties, KS distances -------------------------
def bon_kl_exact(rewards: np.ndarray, n: int) -> float:
    """KL(BoN_n || pi_0) of one prompt, ties included, taking `rewards` (a large pool of pi_0 samples)
    as the prompt's reward law.

    With reward levels v of probability p_v and F_le(v) / F_lt(v) = P[r <= v] / P[r < v], Theorem 1
    gives pi_BoN(y) = pi_0(y) w(r(y)) with w(v) = (F_le^n - F_lt^n) / (F_le - F_lt): the ratio depends
    on y only through its reward, and a level's Best-of-n mass is P_BoN(v) = F_le^n - F_lt^n, so

        KL(BoN_n || pi_0) = E_BoN[log w] = sum_v P_BoN(v) log(P_BoN(v) / p_v).

    Without ties and with a large pool this tends to log n - (n-1)/n (64 distinct values, n = 8:
    1.2038 against 1.2044); with ties it is smaller."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _, counts = np.unique(np.asarray(rewards, dtype=np.float64), return_counts=True)  # levels, ascending
    p = counts / counts.sum()
    f_le = np.minimum(np.cumsum(p), 1.0)
    f_lt = f_le - p
    mass = f_le**n - f_lt**n  # [levels] Best-of-n probability of each level
    keep = mass > 0  # 0 log 0 = 0 (a level far below the top, underflowed)
    return float(np.sum(mass[keep] * np.log(mass[keep] / p[keep])))


def bon_kl_on_pool(pool: dict[str, np.ndarray], n: int) -> float:
    """KL(BoN_n || pi_0) over prompts drawn uniformly from the pool's: the mean of the per-prompt KLs."""
    return float(np.mean([bon_kl_exact(r, n) for r in pool.values()]))


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance sup_x |F_a(x) - F_b(x)| (ties handled: both empirical
    CDFs are compared just after every value either sample takes)."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if a.size == 0 or b.size == 0:
        raise ValueError("ks_distance needs two non-empty samples")
    x = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, x, side="right") / a.size
                               - np.searchsorted(b, x, side="right") / b.size)))


KOLMOGOROV_MEAN = float(np.sqrt(np.pi / 2) * np.log(2))  # E[sup |Brownian bridge|] = 0.8687


def ks_noise(n1: int, n2: int | None = None) -> float:
    """The KS distance expected between samples of one continuous law: a one-sample KS of n1 draws
    against the law (n2 None), or two samples of n1 and n2 draws; asymptotically
    0.8687 * sqrt(1/n1 + 1/n2). A measured distance well above it is a real difference."""
    return KOLMOGOROV_MEAN * float(np.sqrt(1 / n1 + (1 / n2 if n2 else 0.0)))


def analytic_row(N: int) -> dict:
    """What exact Best-of-N of pi_0 would give (continuous rewards): the reference for round t, N = n^t."""
    a = analytic_bon(N)
    return {"N": N, "p_le": a["mean_quantile"], "log_p_le": a["mean_log_quantile"], "kl": a["kl"]}


# ---- the plot ----------------------------------------------------------------------------------
def plot_reward_vs_kl(rows: list[dict], out_png: Path, n: int, bon: list[dict] | None = None) -> Path:
    """Two panels against KL(pi_t || pi_0): measured mean p_le (left) and mean reward (right), each
    round marked 't=..'. The left panel has the analytic Best-of-N curve and its points N = n^t,
    labelled as the continuous-reward reference. `bon` (optional): Best-of-N measured on the task,
    rows of `evaluate_best_of_n` with their "N", drawn on both panels at their exact KL. Legends sit
    below the axes and the figure is cut to its contents, so no label is clipped. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    rounds = [r["round"] for r in rows]
    kl, p_le, reward = ([r[key] for r in rows] for key in ("kl", "p_le", "reward"))
    big_n = np.linspace(1.0, 2.0 * n ** max(rounds, default=0), 400)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.plot(np.log(big_n) - (big_n - 1) / big_n, big_n / (big_n + 1), color="grey", lw=1.5, ls="--",
              label="Best-of-N, analytic (continuous reward only)")
    ref = [analytic_row(n**t) for t in rounds]
    left.scatter([a["kl"] for a in ref], [a["p_le"] for a in ref], marker="x", color="grey", zorder=3,
                 label=f"analytic N = {n}^t")
    for a in ref:
        left.annotate(f"N={a['N']}", (a["kl"], a["p_le"]), textcoords="offset points", xytext=(4, -12),
                      fontsize=8, color="grey")
    for ax, key in ((left, "p_le"), (right, "reward")):
        if bon:
            pts = sorted(bon, key=lambda b: b["kl"])
            ax.plot([b["kl"] for b in pts], [b[key] for b in pts], "s-", color="tab:orange", ms=4,
                    label="Best-of-N sampling, measured (exact KL, ties)")
            for b in pts:
                ax.annotate(f"N={b['N']}", (b["kl"], b[key]), textcoords="offset points", xytext=(4, -12),
                            fontsize=8, color="tab:orange")
    for ax, ys, name in ((left, p_le, "mean quantile p_le"), (right, reward, "mean reward")):
        ax.plot(kl, ys, "o-", color="tab:blue", label="measured, round t")
        for t, x, y in zip(rounds, kl, ys):
            ax.annotate(f"t={t}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=9)
        ax.set_xlabel(r"KL($\pi_t \,\|\, \pi_0$) (nats)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=8, ncol=1)  # one column: no overlap
    left.set_title(f"quantile vs KL: BOND rounds vs Best-of-{n}^t")
    right.set_title("reward vs KL")
    return save_figure(fig, out_png)


def save_figure(fig, out_png: Path) -> Path:
    """Write a matplotlib figure as PNG atomically, cut to its contents (no label clipped), and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(out_png)
