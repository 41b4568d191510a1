"""Trace the tie-heavy `tiny` iterative run (n = 2 per round, M = 3) round by round: where does its KL go?

`bench/fidelity.py` measures iterated Jeffreys on `tiny` once per round against pi_0. This driver
reruns that iteration (same seed's pools, same datasets, `trainer/configs/tiny.yaml`, whose lr 1e-3
is the default here; fidelity.py's iterative rows now train at its ITERATIVE_LR, `--lr 0.0003`;
round 0 is fidelity.py's own pool, so the policies are the same) with a checkpoint after
every epoch, and measures every checkpoint on 256 samples per held-out prompt (the first 64 are
fidelity.py's, same seeds: `kl64` / `log_p_le64` reproduce its rows), against two rulers:

- **pi_0's ruler** (256 samples per prompt, fidelity.py's): E[log p_le], KL(pi || pi_0), and the
  share of measured Best-of-2^t's gain / its exact KL (Best-of-N from that ruler's reward law,
  exact and tie-aware: `bon_from_ruler`);
- **the round's own anchor** A_t (a ruler of 256 A_t samples per prompt, the same size): KL(pi || A_t)
  against Best-of-2 of A_t's exact KL, and the round's gain against Best-of-2 of A_t's, both on
  pi_0's quantile scale (does each round already overshoot, or does the error compound?).

Each KL is split by the chain rule into the part the reward sees and the part it cannot:
KL(pi || A) = KL(P_pi(v) || P_A(v)) + E_v KL(pi(.|v) || A(.|v)), v the reward level. Best-of-N's
density ratio depends on y only through r(y) (Theorem 1), so its within-level part is exactly 0:
KL spent inside a level (among completions of equal reward) buys nothing. The level laws are
plug-in estimates per prompt (policy: 256 samples; A: its ruler), biased up: pi_0 measured
against its own ruler gives that floor (about 0.04 nats on `tiny`). Also: the share
of samples off the anchor's ruler (a completion none of its 256 samples wrote) and the KL they
carry, and how concentrated the KL is on a few prompts.

Per round it checks the dataset: both weight columns against brute-force enumeration (all
n-subsets for `bon_weight`, all ordered n-tuples with replacement for `bon_weight_pool`, ties split
uniformly), that the candidates came from the round's registered anchor, rho = 1 at the first
step, and the KL of the weighted level law (the round's target) against Best-of-n's exact KL on
the same pool.

    python bench/fidelity_trace_tiny.py --seeds 0 1 2 --every-epoch   # the default iteration, per round and epoch
    python bench/fidelity_trace_tiny.py --seeds 0 1 2 --n 1           # null: weights 1, the target is the anchor itself
    python bench/fidelity_trace_tiny.py --seeds 0 1 2 --k 64          # 4x the pool per round
    python bench/fidelity_trace_tiny.py --seeds 0 1 2 --lr 0.0003     # fidelity.py's iterative lr
    python bench/fidelity_trace_tiny.py --seeds 0 --prompts train     # measured on the 64 training prompts
    python bench/fidelity_trace_tiny.py --table --seeds 0 1 2         # the tables of bench/RESULTS.md

Rows go to <out>/trace.json (one per setting, seed, round and epoch; a rerun trains and measures only
missing settings, `--force` all).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
import fidelity

from bond_data import stages
from bond_data.store import Store
from trainer import evaluate
from trainer.config import TrainConfig
from trainer.train import train

SAMPLES = 256  # policy samples per prompt; the first 64 are fidelity.py's (a sample's seed is its index)
RULER_K = fidelity.EVAL_POOL_K  # samples per prompt of each anchor's ruler
ROUNDS = 3


# ---- the iteration ---------------------------------------------------------------------------
def run_iteration(base: Store, folder: Path, task, seed: int, s: dict) -> list[tuple[list[Path], str]]:
    """fidelity.train_iterative with the setting's n, k, epochs, lr, beta, eta and a checkpoint per
    epoch; per round, its epochs' checkpoint folders and the next anchor it registered (with eta 0
    the last checkpoint's weights; with eta > 0 their EMA, which the next round samples from)."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(base.root, folder)
    store = Store(folder)
    out = []
    for t in range(100 * seed, 100 * seed + ROUNDS):
        record = stages.curate_round(store, t, s["k"], task.reward, n=s["n"])
        steps = record["num_rows"] // (fidelity.TRAIN["micro_batch_size"] * s["grad_accum"])  # one process
        cfg = {**fidelity.TRAIN, "lr": s["lr"], "epochs": s["epochs"], "eta": s["eta"], "grad_accum": s["grad_accum"],
               "checkpoint_every": steps}
        train(str(folder), TrainConfig(round=t, beta=s["beta"], dataset_id=record["dataset_id"], seed=seed, **cfg))
        run = folder / "train" / f"round={t}" / record["dataset_id"]
        out.append(([run / f"step-{steps * e}" for e in range(1, s["epochs"] + 1)], store.anchor(t + 1)["anchor_path"]))
    return out


def check_round(store: Store, round_: int, n: int, k_check: int = 8) -> dict:
    """The round's dataset against brute force on its first `k_check` prompts, its candidates'
    anchor, rho at the first step, and the KL of its weighted level law (the forward target)."""
    record = store.query("SELECT dataset_id, path FROM datasets WHERE round = ?", [round_]).to_pylist()[0]
    t = pq.read_table(store.root / record["path"]).to_pydict()
    by: dict[str, list[int]] = {}
    for i, p in enumerate(t["prompt_id"]):
        by.setdefault(p, []).append(i)
    gap_u = gap_p = 0.0
    for rows in list(by.values())[:k_check]:
        r = np.array([t["reward"][i] for i in rows])
        gap_u = max(gap_u, np.max(np.abs(enumerate_unbiased(r, n) - np.array([t["bon_weight"][i] for i in rows]))))
        gap_p = max(gap_p, np.max(np.abs(enumerate_with_replacement(r, n) - np.array([t["bon_weight_pool"][i] for i in rows]))))
    target_kl, pool_kl = [], []
    for rows in by.values():
        r, w = np.array([t["reward"][i] for i in rows]), np.array([t["bon_weight"][i] for i in rows])
        target_kl.append(float(np.sum(w[w > 0] * np.log(w[w > 0])) / len(w)))  # level law sum w / k against count / k
        pool_kl.append(evaluate.bon_kl_exact(r, n))  # Best-of-n of the pool's empirical law
    anchor = store.anchor(round_)["anchor_hash"]
    hashes = set(store.query("SELECT DISTINCT anchor_hash FROM candidates WHERE round = ?", [round_])["anchor_hash"].to_pylist())
    run = store.root / "train" / f"round={round_}" / record["dataset_id"] / "metrics.jsonl"
    first = json.loads(run.read_text().splitlines()[0]) if run.is_file() else {}
    return {"weights_gap_unbiased": float(gap_u), "weights_gap_pool": float(gap_p), "target_level_kl": float(np.mean(target_kl)),
            "pool_bon_kl": float(np.mean(pool_kl)), "from_anchor": hashes == {anchor}, "first_log_ratio": first.get("log_ratio")}


def enumerate_unbiased(r: np.ndarray, n: int) -> np.ndarray:
    """k x P(y_i is the best of a uniform n-subset of the pool, ties split uniformly): every subset."""
    k, hits = len(r), np.zeros(len(r))
    for sub in itertools.combinations(range(k), n):
        top = [i for i in sub if r[i] == max(r[j] for j in sub)]
        hits[top] += 1 / len(top)
    return k * hits / math.comb(k, n)


def enumerate_with_replacement(r: np.ndarray, n: int) -> np.ndarray:
    """k x P(y_i is selected by Best-of-n drawn with replacement, ties split uniformly): every tuple."""
    k, hits = len(r), np.zeros(len(r))
    for tup in itertools.product(range(k), repeat=n):
        best = max(r[i] for i in tup)
        top = [i for i in tup if r[i] == best]
        for i in top:
            hits[i] += 1 / len(top)
    return k * hits / k**n


# ---- measuring -------------------------------------------------------------------------------
def ruler(folder: Path, model_dir: str, task, prompts_file: str) -> dict[str, np.ndarray]:
    """RULER_K samples per prompt of a model, scored: prompt -> rewards (cached in folder)."""
    return evaluate.read_pool(evaluate.ensure_eval_pool(folder, model_dir, prompts_file, task.reward, k=RULER_K))


def ruler_texts(folder: Path) -> dict[str, set[str]]:
    t = pq.read_table(folder / evaluate.POOL_FILE, columns=["prompt", "completion"]).to_pydict()
    out: dict[str, set[str]] = {}
    for p, c in zip(t["prompt"], t["completion"]):
        out.setdefault(p, set()).add(c)
    return out


def bon_from_ruler(law: dict[str, np.ndarray], scale: dict[str, np.ndarray], n: int) -> tuple[float, float]:
    """Best-of-n of the model whose ruler is `law`, exactly on that reward law (ties included):
    (E[log p_le] on `scale`'s quantiles, KL to the model). Level v gets F_le(v)^n - F_lt(v)^n."""
    logq = []
    for p, r in law.items():
        v, c = np.unique(r, return_counts=True)
        f_le = np.cumsum(c) / c.sum()
        mass = f_le**n - (f_le - c / c.sum()) ** n
        logq.append(float(np.sum(mass * np.log(evaluate.quantile_against_pool(scale[p], v)))))
    return float(np.mean(logq)), evaluate.bon_kl_on_pool(law, n)


def level_kl(rewards: np.ndarray, law: dict[str, np.ndarray], prompts: list[str]) -> np.ndarray:
    """[prompts] plug-in KL(P_pi(v) || P_A(v)) of the reward-level laws, P_pi from the policy's
    samples (rows of `rewards`), P_A from A's ruler (a level it never hit counts once)."""
    out = []
    for p, r in zip(prompts, rewards):
        v, c = np.unique(r, return_counts=True)
        ref = np.maximum(np.searchsorted(np.sort(law[p]), v, side="right") - np.searchsorted(np.sort(law[p]), v), 1)
        out.append(float(np.sum(c / c.sum() * np.log((c / c.sum()) / (ref / len(law[p]))))))
    return np.array(out)


def measure(policy: str, anchor: str, task, rulers: dict, prompts: list[str], seed: int) -> dict:
    """One checkpoint: `SAMPLES` fresh samples per prompt, against pi_0's ruler and its anchor's."""
    outs = evaluate._sample(evaluate._backend(policy), prompts, SAMPLES, 16, "eval", 1 + 1000 * seed)
    flat_prompts = [p for p, cs in zip(prompts, outs) for _ in cs]
    flat = [c for cs in outs for c in cs]
    ids = [c.token_ids for c in flat]
    rewards = evaluate._rewards(task.reward, [(p, c.text) for p, c in zip(flat_prompts, flat)]).reshape(len(prompts), SAMPLES)
    logp = np.array([c.anchor_logprob for c in flat]).reshape(len(prompts), SAMPLES)
    log0 = evaluate._logprobs_under(evaluate._backend(str(task.model_dir)), flat_prompts, ids).reshape(logp.shape)
    logA = log0 if anchor == str(task.model_dir) else evaluate._logprobs_under(
        evaluate._backend(anchor), flat_prompts, ids).reshape(logp.shape)
    p_le = np.stack([evaluate.quantile_against_pool(rulers["pi0"][p], r) for p, r in zip(prompts, rewards)])
    texts = rulers["anchor_texts"]
    off = np.array([[c.text not in texts[p] for c in cs] for p, cs in zip(prompts, outs)])
    kl_prompt = (logp - log0).mean(1)  # [prompts]
    share_top = np.sort(kl_prompt)[::-1][: max(1, len(prompts) // 8)].sum() / kl_prompt.sum()
    return {"reward": float(rewards.mean()), "log_p_le": float(np.log(p_le).mean()), "kl": float(kl_prompt.mean()),
            "kl64": float((logp - log0)[:, :64].mean()), "log_p_le64": float(np.log(p_le[:, :64]).mean()),
            "kl_se": float((logp - log0).std() / np.sqrt(logp.size)),
            "kl_anchor": float((logp - logA).mean()),
            "level_kl": float(level_kl(rewards, rulers["pi0"], prompts).mean()),
            "level_kl_anchor": float(level_kl(rewards, rulers["anchor"], prompts).mean()),
            "off_ruler": float(off.mean()), "kl_anchor_off_ruler": float(((logp - logA) * off).sum() / off.size),
            "correct": float((rewards == 1.0).mean()), "kl_top_eighth_share": float(share_top)}


def fidelity_refs(task, pool: Path, seed: int, cache: Path) -> dict:
    """fidelity.py's own pi_0 and sampled Best-of-N rows for this seed (64 samples per prompt),
    for the reproduction check: N -> (E[log p_le], exact KL)."""
    if not cache.is_file():
        rows = fidelity.measure_bon([2, 4, 8], task, pool, seed, {})
        pi0 = fidelity.measure("pi_0", 1, str(task.model_dir), task, pool, seed, {})
        cache.write_text(json.dumps({str(r["N"]): [r["log_p_le"], r["kl"]] for r in rows} | {"1": [pi0["log_p_le"], 0.0]}))
    return {int(n): v for n, v in json.loads(cache.read_text()).items()}


def setting_key(args) -> dict:
    return {"n": args.n, "k": args.k, "epochs": args.epochs, "lr": args.lr, "beta": args.beta, "eta": args.eta,
            "grad_accum": args.grad_accum, "prompts": args.prompts, "train_prompts": args.train_prompts}


def trace_seed(args, task, seed: int, rows: list[dict]) -> list[dict]:
    """Train the setting's iteration for one seed and measure every epoch of every round."""
    s = setting_key(args)
    prompts_file = str(task.eval_prompts_file if args.prompts == "eval" else task.prompts_file)
    r0_dir = args.out / f"ruler-{args.prompts}-pi0"
    rulers0 = ruler(r0_dir, str(task.model_dir), task, prompts_file)
    prompts = list(rulers0)
    ref = {f"bon{n}": bon_from_ruler(rulers0, rulers0, n) for n in (1, 2, 4, 8)}
    work = args.out / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    f64 = fidelity_refs(task, r0_dir / evaluate.POOL_FILE, seed, work / "refs64.json") if args.prompts == "eval" else None
    pi0_path = work / f"pi0-{args.prompts}.json"  # pi_0 against its own ruler: the floors of the plug-in figures
    if not pi0_path.is_file():
        rs0 = {"pi0": rulers0, "anchor": rulers0, "anchor_texts": ruler_texts(r0_dir)}
        pi0_path.write_text(json.dumps(measure(str(task.model_dir), str(task.model_dir), task, rs0, prompts, seed)))
    base_dir = work / f"base-k{args.k}" if args.train_prompts == 64 else work / f"base-k{args.k}-p{args.train_prompts}"
    base = Store(base_dir) if base_dir.is_dir() else fidelity.base_store(
        base_dir, fidelity.with_training_prompts(task, args.train_prompts, args.out), args.k, 100 * seed)
    name = "-".join(f"{k}{v}" for k, v in s.items())
    rounds = run_iteration(base, work / name, task, seed, s)
    store = Store(work / name)
    anchor, anchor_dir = str(task.model_dir), r0_dir
    for t, (checkpoints, next_anchor) in enumerate(rounds):
        law = rulers0 if t == 0 else ruler(anchor_dir, anchor, task, prompts_file)
        base_q, _ = bon_from_ruler(law, rulers0, 1)
        bon2_q, bon2_kl = bon_from_ruler(law, rulers0, 2)
        rs = {"pi0": rulers0, "anchor": law, "anchor_texts": ruler_texts(anchor_dir)}
        check = check_round(store, 100 * seed + t, args.n)
        for e, ckpt in enumerate(checkpoints, 1):
            if e < len(checkpoints) and not args.every_epoch:
                continue
            policy = next_anchor if e == len(checkpoints) else str(ckpt)  # the EMA where eta > 0, as fidelity.py measures
            m = measure(policy, anchor, task, rs, prompts, seed)
            big_n = 2 ** (t + 1)
            row = {**s, "seed": seed, "round": t + 1, "epoch": e, **m, **check,
                   "gain": (m["log_p_le"] - ref["bon1"][0]) / (ref[f"bon{big_n}"][0] - ref["bon1"][0]),
                   "kl_ratio": m["kl"] / ref[f"bon{big_n}"][1],
                   "round_gain": (m["log_p_le"] - base_q) / (bon2_q - base_q), "round_kl_ratio": m["kl_anchor"] / bon2_kl,
                   "anchor_bon2_kl": bon2_kl, "anchor_log_p_le": base_q, "anchor_bon2_log_p_le": bon2_q}
            if f64:
                row["gain64"] = (m["log_p_le64"] - f64[1][0]) / (f64[big_n][0] - f64[1][0])
                row["kl_ratio64"] = m["kl64"] / f64[big_n][1]
            rows = [r for r in rows if not same(r, row)] + [row]
            print(f"seed {seed} round {t + 1} epoch {e}: gain {row['gain']:.0%} KL {m['kl']:.3f} ({row['kl_ratio']:.2f}x); "
                  f"round: gain {row['round_gain']:.0%} KL(pi||A) {m['kl_anchor']:.3f} ({row['round_kl_ratio']:.2f}x of "
                  f"{bon2_kl:.3f}), level part {m['level_kl_anchor']:.3f}; off ruler {m['off_ruler']:.1%}", flush=True)
        anchor, anchor_dir = next_anchor, work / f"ruler-{args.prompts}-{name}-A{t + 1}"
    shutil.rmtree(work / name, ignore_errors=True)  # checkpoints: measured
    return rows


def same(a: dict, b: dict) -> bool:
    return all(a.get(k, DEFAULTS.get(k)) == b.get(k, DEFAULTS.get(k)) for k in (*SETTING, "seed", "round", "epoch"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 (with --table: every seed in trace.json)")
    ap.add_argument("--n", type=int, default=2, help="Best-of-n per round (1: the null, weights 1)")
    ap.add_argument("--k", type=int, default=16, help="pool size per training prompt and round (fidelity.py: 16)")
    ap.add_argument("--epochs", type=int, default=fidelity.TRAIN["epochs"])
    ap.add_argument("--lr", type=float, default=fidelity.TRAIN["lr"])
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--eta", type=float, default=0.0, help="EMA anchor step per optimizer step (0: hard refresh)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches (of 32) per optimizer step")
    ap.add_argument("--train-prompts", type=int, default=64, help="training prompts: the shipped 64, then fresh words")
    ap.add_argument("--prompts", default="eval", choices=["eval", "train"], help="measure on the held-out or the training prompts")
    ap.add_argument("--out", type=Path, default=Path("bench-out/fidelity-trace-tiny"))
    ap.add_argument("--every-epoch", action="store_true", help="measure every epoch's checkpoint (default: each round's last)")
    ap.add_argument("--force", action="store_true", help="train and measure again even if trace.json has the rows")
    ap.add_argument("--table", action="store_true", help="only print the tables of trace.json")
    ap.add_argument("--task", default="tiny", choices=["tiny", "digits"], help="digits: the continuous task (rows in "
                    "<out>/digits/; its gain and KL figures only: every sample is its own reward level there)")
    args = ap.parse_args()
    if args.task == "digits":
        if args.train_prompts != 64:
            ap.error("--train-prompts needs the tiny task")
        args.out = args.out / "digits"
    trace_path = args.out / "trace.json"
    rows = json.loads(trace_path.read_text()) if trace_path.is_file() else []
    if args.table:
        rows = [r for r in rows if args.seeds is None or r["seed"] in args.seeds]
        print(summary(rows))
        print()
        print(tables(rows))
        for path in sorted(p for s in (args.seeds or range(100)) for p in args.out.glob(f"seed{s}/pi0-*.json")):
            m = json.loads(path.read_text())
            print(f"pi_0 against its own ruler ({path.parent.name}, {path.stem}): KL {m['kl']:.4f}, level part {m['level_kl']:.3f} "
                  f"(the plug-in's floor), off ruler {m['off_ruler']:.1%}, correct {m['correct']:.1%}")
        return
    import torch

    torch.set_num_threads(1)
    task = fidelity.load_task(args.task)
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds or [0]:
        key = {**setting_key(args), "seed": seed}
        if not args.force and any(all(r.get(k, DEFAULTS.get(k)) == v for k, v in key.items()) for r in rows):
            continue
        rows = trace_seed(args, task, seed, rows)
        trace_path.write_text(json.dumps(rows, indent=1))


DEFAULTS = {"grad_accum": 1, "train_prompts": 64}  # settings added after the first rows
SETTING = ("n", "k", "epochs", "lr", "beta", "eta", "grad_accum", "prompts", "train_prompts")


def _cell(rs: list[dict], key: str, fmt) -> str:
    """mean ± sd over seeds (each seed in brackets) of one figure."""
    x = np.array([r[key] for r in rs], dtype=float)
    sd = f" ± {fmt(x.std(ddof=1))}" if x.size > 1 else ""
    return f"{fmt(x.mean())}{sd} ({', '.join(fmt(v) for v in x)})"


PCT, TIMES, NATS = (lambda v: f"{100 * v:.0f}%"), (lambda v: f"{v:.2f}x"), (lambda v: f"{v:.3f}")


def _groups(rows: list[dict], last_epoch: bool) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        if not last_epoch or r["epoch"] == r["epochs"]:
            out.setdefault(tuple(r.get(k, DEFAULTS.get(k)) for k in SETTING) + (r["round"], r["epoch"]), []).append(r)
    return out


def summary(rows: list[dict]) -> str:
    """Markdown: each setting's M = 3 policy against the target, on all 256 samples and on
    fidelity.py's 64 (its own pi_0 and sampled Best-of-8 rows, where measured), and its budget."""
    lines = [("| n | k | training prompts | other | measured on | seeds | samples / round | steps / round "
              "| M = 3: gain | KL / BoN-8's | fidelity.py's figures (64 samples) |"), "|---:|---:|---:|---|---|---:|---:|---:|---|---|---|"]
    for key, rs in sorted(_groups(rows, last_epoch=True).items()):
        n, k, epochs, lr, beta, eta, accum, prompts, train_prompts, round_, _ = key
        if round_ != ROUNDS:
            continue
        other = ", ".join(f"{name} {v}" for name, v, default in (("epochs", epochs, 4), ("lr", lr, 1e-3), ("beta", beta, 0.5),
                                                                 ("eta", eta, 0.0), ("grad_accum", accum, 1)) if v != default)
        fid = (f"{_cell(rs, 'gain64', PCT)} at {_cell(rs, 'kl_ratio64', TIMES)}" if all("gain64" in r for r in rs) else "-")
        lines.append(f"| {n} | {k} | {train_prompts} | {other or 'default'} | {prompts} | {len(rs)} | {k * train_prompts:,} | "
                     f"{epochs * k * train_prompts // (32 * accum)} | {_cell(rs, 'gain', PCT)} | {_cell(rs, 'kl_ratio', TIMES)} | {fid} |")
    return "\n".join(lines)


def tables(rows: list[dict]) -> str:
    """Markdown: every setting's rounds at its last epoch (cumulative and per round), the KL split
    of each, the default setting epoch by epoch, and the per-round dataset checks."""
    head = "| n | k | epochs | lr | beta | eta | accum | measured on | training prompts | round | "
    lines = [head + "gain vs BoN-2^t | KL / BoN-2^t's | round gain vs BoN-2(A) | KL(pi‖A) / BoN-2(A)'s |",
             "|" + "---:|" * 10 + "---|---|---|---|"]
    groups = _groups(rows, last_epoch=True)
    for key, rs in sorted(groups.items()):
        lines.append("| " + " | ".join(str(v) for v in key[:10]) + f" | {_cell(rs, 'gain', PCT)} | {_cell(rs, 'kl_ratio', TIMES)} | "
                     f"{_cell(rs, 'round_gain', PCT)} | {_cell(rs, 'round_kl_ratio', TIMES)} |")
    lines += ["", head + "seeds | KL(pi‖A) | level part | within levels | BoN-2(A) exact | KL(pi‖pi_0) | its level part "
              "| off A's ruler | KL(pi‖A) off it | top 1/8 prompts' KL share |", "|" + "---:|" * 20]
    mean = lambda rs, k: float(np.mean([r[k] for r in rs]))
    for key, rs in sorted(groups.items()):
        lines.append("| " + " | ".join(str(v) for v in key[:10]) + f" | {len(rs)} | {mean(rs, 'kl_anchor'):.3f} | "
                     f"{mean(rs, 'level_kl_anchor'):.3f} | {mean(rs, 'kl_anchor') - mean(rs, 'level_kl_anchor'):.3f} | "
                     f"{mean(rs, 'anchor_bon2_kl'):.3f} | {mean(rs, 'kl'):.3f} | {mean(rs, 'level_kl'):.3f} | "
                     f"{mean(rs, 'off_ruler'):.1%} | {mean(rs, 'kl_anchor_off_ruler'):.3f} | {mean(rs, 'kl_top_eighth_share'):.0%} |")
    lines += ["", head + "epoch | gain | KL / BoN-2^t's | KL(pi‖A) / BoN-2(A)'s | within-level KL(pi‖A) |", "|" + "---:|" * 11 + "---|---|---|---:|"]
    for key, rs in sorted(_groups(rows, last_epoch=False).items()):
        lines.append("| " + " | ".join(str(v) for v in key) + f" | {_cell(rs, 'gain', PCT)} | {_cell(rs, 'kl_ratio', TIMES)} | "
                     f"{_cell(rs, 'round_kl_ratio', TIMES)} | {mean(rs, 'kl_anchor') - mean(rs, 'level_kl_anchor'):.3f} |")
    lines += ["", head + "seeds | max weight gap, unbiased / pool (enumeration) | candidates from A | log rho at step 1 "
              "| target's level KL | BoN-n's exact KL on the pool |", "|" + "---:|" * 11 + "---|---|---:|---:|---:|"]
    for key, rs in sorted(groups.items()):
        lines.append("| " + " | ".join(str(v) for v in key[:10]) + f" | {len(rs)} | "
                     f"{max(r['weights_gap_unbiased'] for r in rs):.1e} / {max(r['weights_gap_pool'] for r in rs):.1e} | "
                     f"{all(r['from_anchor'] for r in rs)} | {max(abs(r['first_log_ratio'] or 0) for r in rs):.1e} | "
                     f"{mean(rs, 'target_level_kl'):.3f} | {mean(rs, 'pool_bon_kl'):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
