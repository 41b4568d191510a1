"""Trace one offline BOND run on `digits` epoch by epoch: where does its KL(pi || pi_0) go?

`bench/fidelity.py` measures a policy once, after 4 epochs. This driver trains the same way (same
seed's pool of k = 16 per training prompt, same dataset, `trainer/configs/tiny.yaml`), keeps a
checkpoint after every epoch and measures each with the same samples fidelity.py would draw
(same seeds: epoch 4 of the default run reproduces fidelity.py's row), plus:

- the **KL per completion position**: a digits completion is " " + 10 digits + EOS, one byte-level
  token each, so KL(pi || pi_0) = sum_t E_pi[log pi(y_t | y_<t) - log pi_0(y_t | y_<t)] (chain
  rule), estimated on the same policy samples; beside it Best-of-N's exact share of each position
  for a Uniform(0, 1) reward (`bon_position_kl`): Best-of-8's 1.204 nats sit in the first two
  digits (1.177 + 0.027; the third holds 0.0003), so KL a policy spends on digits 3-10, on the
  space or on EOS does not move its quantile; and the first digit's law per held-out prompt
  (exact, one forward pass each);
- the share of malformed completions (anything but " " + 10 digits + EOS) and the KL they carry;
- a brute-force check of the evaluation's KL: the policy's log-probs recomputed token by token
  with full logits must sum to the log-probs the sampler recorded (`logp_gap`).

Variants, each a separate row key: `--beta`, `--lr`, `--k` (pool size), `--backward snis` (the
trainer's `self_normalize`), and `--weighting`: the dataset's weights as built (`unbiased`,
`pool`), Best-of-8's exact density ratio 8 r^7 in both terms or one (`oracle`, `oracle-fwd`,
`oracle-bwd`; on `digits` the reward is its own CDF under pi_0), or exp(E[log w | rank]) in the
backward term (`digamma-bwd`). `--table` prints the tables of bench/RESULTS.md, "Tracing the digits
KL overshoot", with the forward target's own KL (simulated pools and each seed's).

    python bench/fidelity_trace.py                                          # seed 0, Jeffreys beta 0.5, 4 epochs
    python bench/fidelity_trace.py --seeds 0 1 2 --beta 0.5 0 --epochs 8    # default and forward only
    python bench/fidelity_trace.py --seeds 0 1 2 --epochs 8 --backward snis --weighting oracle
    python bench/fidelity_trace.py --table 4 8 --seeds 0 1 2                # the tables from trace.json

Rows go to <out>/trace.json (one per seed, beta, lr, weighting, k, backward and epoch; a rerun
trains and measures only missing ones, `--force` all).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
import fidelity

from bond_data import bon
from bond_data.build import build_dataset
from bond_data.files import write_parquet_atomic
from bond_data.store import Store
from trainer import evaluate
from trainer.config import TrainConfig
from trainer.train import train

N, DIGITS = 8, 10
ORACLE = {"oracle": ("bon_weight", "bon_weight_pool"), "oracle-fwd": ("bon_weight",), "oracle-bwd": ("bon_weight_pool",)}
POSITIONS = ["space", *(f"d{i}" for i in range(1, DIGITS + 1)), "eos"]  # a well-formed completion's tokens


def bon_position_kl(n: int, digits: int = DIGITS, exact_upto: int = 5) -> np.ndarray:
    """Best-of-n of a Uniform(0, 1) reward written as decimal digits: KL(BoN || uniform digits) at
    each digit position (chain rule), by enumeration of the prefixes up to `exact_upto` digits
    (later positions carry < 1e-7 nats at n = 8). Their sum is log n - (n - 1)/n up to the
    truncation at `digits` digits."""
    out = np.zeros(digits)
    lo = np.zeros(1)  # left ends of the current prefix intervals, width h
    mass = np.ones(1)  # BoN mass of each prefix interval
    for t in range(min(digits, exact_upto)):
        h = 10.0 ** -(t + 1)
        edges = lo[:, None] + h * np.arange(11)[None, :]  # [prefixes, 11]
        cell = np.diff(edges**n, axis=1)  # [prefixes, 10] BoN mass of each next digit
        cond = cell / np.maximum(mass[:, None], 1e-300)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[t] = float(np.nansum(cell * np.log(np.where(cond > 0, 10 * cond, 1.0))))
        lo, mass = edges[:, :10].ravel(), cell.ravel()
        keep = mass > 1e-14  # prefixes Best-of-n never reaches carry nothing further
        lo, mass = lo[keep], mass[keep]
    return out


def token_logprobs(model_dir: str, prompts: list[str], completions: list[list[int]]) -> list[np.ndarray]:
    """log model(y_t | x, y_<t) of every completion token, by full logits and an fp32 log-softmax
    (the reference path, bond_data/logprobs.py: sequence_logprobs), one array per completion."""
    import torch

    from bond_data.backends.hf import prompt_token_ids
    from bond_data.logprobs import collate
    from trainer import checkpoints

    model, tokenizer = checkpoints.load_policy(model_dir, torch.device("cpu"), None)
    model.eval()
    out = []
    for s in range(0, len(prompts), evaluate.BATCH_SIZE):
        rows = [{"prompt": prompt_token_ids(tokenizer, p, None), "completion": y}
                for p, y in zip(prompts[s : s + evaluate.BATCH_SIZE], completions[s : s + evaluate.BATCH_SIZE])]
        input_ids, attention, labels, mask = collate(rows, torch.device("cpu"))
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()  # [B, T-1, V]
            logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # [B, T-1]
        out += [lp[m.bool()].double().numpy() for lp, m in zip(logp, mask)]
    return out


def measure_traced(policy: str, task, pool_path: Path, seed: int, samples: int = fidelity.EVAL_SAMPLES) -> dict:
    """evaluate.evaluate_policy's figures on the very samples it draws (same seed), plus the KL per
    completion position and the largest gap between recorded and recomputed log pi."""
    pool = evaluate.read_pool(pool_path)
    prompts = list(pool)
    outs = evaluate._sample(evaluate._backend(policy), prompts, samples, 16, "eval", 1 + 1000 * seed)
    flat_prompts = [p for p, cs in zip(prompts, outs) for _ in cs]
    flat = [c for cs in outs for c in cs]
    rewards = evaluate._rewards(task.reward, [(p, c.text) for p, c in zip(flat_prompts, flat)])
    p_le = np.concatenate([evaluate.quantile_against_pool(pool[p], r)
                           for p, r in zip(prompts, rewards.reshape(len(prompts), samples))])
    ids = [c.token_ids for c in flat]
    lp_pi, lp_0 = token_logprobs(policy, flat_prompts, ids), token_logprobs(str(task.model_dir), flat_prompts, ids)
    recorded = np.array([c.anchor_logprob for c in flat])
    width = len(POSITIONS) + 1  # the last column: any token past a well-formed completion's length
    per_pos = np.zeros(width)
    for a, b in zip(lp_pi, lp_0):
        d = a - b
        per_pos[: min(len(d), width - 1)] += d[: width - 1]
        per_pos[-1] += d[width - 1 :].sum()
    well_formed = np.array([bool(fidelity_digits_re().fullmatch(c.text)) for c in flat])
    log_ratio = recorded - np.array([b.sum() for b in lp_0])  # [samples] log pi - log pi_0
    return {"reward": float(rewards.mean()), "log_p_le": float(np.log(p_le).mean()), "p_le": float(p_le.mean()),
            "kl": float(log_ratio.mean()), "kl_se": float(log_ratio.std(ddof=1) / np.sqrt(len(flat))),
            "kl_position": (per_pos / len(flat)).tolist(),
            "logp_gap": float(np.max(np.abs(recorded - np.array([a.sum() for a in lp_pi])))),
            "well_formed": float(np.mean(well_formed)),
            "kl_malformed": float(np.sum(log_ratio[~well_formed]) / len(flat)),  # their share of "kl"
            **first_digit_split(first_digit_laws(policy, prompts), first_digit_laws(str(task.model_dir), prompts))}


def first_digit_laws(model_dir: str, prompts: list[str]) -> np.ndarray:
    """[prompts, 10] each prompt's law of the first digit, P(d | x, " "), renormalised over the digits."""
    import torch

    from bond_data.backends.hf import prompt_token_ids
    from trainer import checkpoints

    model, tokenizer = checkpoints.load_policy(model_dir, torch.device("cpu"), None)
    model.eval()
    space = tokenizer.encode(" ", add_special_tokens=False)
    digits = [tokenizer.encode(str(d), add_special_tokens=False)[0] for d in range(10)]
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([prompt_token_ids(tokenizer, p, None) + space])
            probs = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)[digits]
            out.append((probs / probs.sum()).numpy())
    return np.array(out)


def first_digit_split(policy: np.ndarray, pi0: np.ndarray) -> dict:
    """The first digit's KL, exact per prompt: E_x KL(p_x || q_x) = KL(mean p || mean q) + what the
    laws' variation across prompts adds (held-out prompts carry no information: all of it is noise,
    exact when q does not depend on x), and the mean law itself."""
    kl = lambda p, q: float(np.sum(p * np.log(p / q), axis=-1).mean())
    mean_p, mean_q = policy.mean(0), pi0.mean(0)
    return {"d1_kl": kl(policy, pi0), "d1_kl_of_mean": kl(mean_p, mean_q), "d1_law": mean_p.tolist(),
            "d1_spread": float(policy.std(0).mean())}


def bon_first_digit(n: int = N) -> np.ndarray:
    """Best-of-n's first-digit law for a Uniform(0, 1) reward: ((d + 1)/10)^n - (d/10)^n."""
    d = np.arange(10)
    return ((d + 1) / 10) ** n - (d / 10) ** n


def fidelity_digits_re():
    from bond_data.tasks.digits import _WELL_FORMED_RE

    return _WELL_FORMED_RE


def measure_row(task_name: str, policy: str, task, pool: Path, seed: int) -> dict:
    """`measure_traced` on digits; on tiny fidelity.py's own figures (reward, p_le, log p_le, KL)."""
    if task_name == "digits":
        return measure_traced(policy, task, pool, seed)
    m = fidelity.measure("policy", N, policy, task, pool, seed, {})
    return {k: m[k] for k in ("reward", "p_le", "log_p_le", "kl")}


def references(task_name: str, task, pool: Path, seed: int, cache: Path) -> dict:
    """pi_0 and measured Best-of-8 for this seed, as fidelity.py measures them (same samples)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    bon = fidelity.measure_bon([N], task, pool, seed, {})[0]
    ref = {"bon": {k: bon[k] for k in ("log_p_le", "kl", "reward")},
           "pi0": measure_row(task_name, str(task.model_dir), task, pool, seed)}
    cache.write_text(json.dumps(ref))
    return ref


def oracle_weights(path: Path, columns: tuple[str, ...], n: int = N) -> None:
    """Replace the weight columns named (forward `bon_weight`, backward `bon_weight_pool`) by Best-of-n's exact density ratio w(y) = n F(r(y))^(n-1), with
    F the reward's CDF under pi_0: on `digits` F(r) = r (Uniform(0, 1) rewards). No pool noise in
    the weights (the samples y_i stay the pool's)."""
    table = pq.read_table(path)
    w = pa.array(n * np.asarray(table["reward"].to_numpy(), dtype=np.float64) ** (n - 1))
    for name in columns:
        table = table.set_column(table.schema.get_field_index(name), name, w)
    write_parquet_atomic(table, path)


def expected_log_weight(lt: np.ndarray, le: np.ndarray, k: np.ndarray, n: int = N) -> np.ndarray:
    """E[log w(y) | the sample's rank in its pool] for a continuous reward: with u = F(r(y)) the
    j-th smallest of k uniforms, u ~ Beta(j, k + 1 - j) and E[log u] = psi(j) - psi(k + 1), so
    E[log n u^(n-1)] = log n + (n - 1) (psi(j) - psi(k + 1)); a tie over ranks lt+1..le averages psi
    over them. psi(j) = H_(j-1) - Euler's gamma for integers."""
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int(k.max()) + 2))])  # H_0 .. H_(kmax+1)
    cum = np.concatenate([[0.0], np.cumsum(harmonic)])  # cum[m] = sum_{i < m} H_i
    mean_h = (cum[le] - cum[lt]) / (le - lt)  # mean of H_(j-1) over j = lt+1..le
    return np.log(n) + (n - 1) * (mean_h - harmonic[k])  # Euler's gamma cancels


def train_traced(base: Store, folder: Path, seed: int, beta: float, lr: float, epochs: int, weighting: str,
                 self_normalize: bool = False) -> list[Path]:
    """One offline run from the seed's pool with a checkpoint after every epoch; their folders.
    weighting "oracle*": the unbiased dataset with weights replaced (`oracle_weights`, ORACLE)."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(base.root, folder)
    store = Store(folder)
    round0 = 100 * seed
    dataset_id = build_dataset(store, round0, N, weighting=weighting if weighting in ("unbiased", "pool") else "unbiased")["dataset_id"]
    path = store.root / store.query("SELECT path FROM datasets WHERE dataset_id = ?", [dataset_id]).to_pylist()[0]["path"]
    if weighting in ORACLE:
        oracle_weights(path, ORACLE[weighting])
    if weighting == "digamma-bwd":  # backward term: exp(E[log w | rank]) instead of the pool weights
        table = pq.read_table(path)
        lt, le, k = bon.empirical_counts(table["prompt_id"].to_numpy(), table["reward"].to_numpy())
        w = pa.array(np.exp(expected_log_weight(lt, le, k)))
        write_parquet_atomic(table.set_column(table.schema.get_field_index("bon_weight_pool"), "bon_weight_pool", w), path)
    per_epoch = store.dataset_summary(path)["candidates"]
    steps = per_epoch // fidelity.TRAIN["micro_batch_size"]  # grad_accum 1, one process: steps per epoch
    cfg = {**fidelity.TRAIN, "lr": lr, "epochs": epochs, "checkpoint_every": steps, "self_normalize": self_normalize}
    train(str(folder), TrainConfig(round=round0, beta=beta, dataset_id=dataset_id, seed=seed, **cfg))
    run = folder / "train" / f"round={round0}" / dataset_id
    return [run / f"step-{steps * e}" for e in range(1, epochs + 1)]


def ratios(row: dict, ref: dict) -> tuple[float, float]:
    """Share of measured Best-of-8's E[log p_le] gain over pi_0, and KL / Best-of-8's exact KL."""
    gain = (row["log_p_le"] - ref["pi0"]["log_p_le"]) / (ref["bon"]["log_p_le"] - ref["pi0"]["log_p_le"])
    return gain, row["kl"] / ref["bon"]["kl"]


def law_kl(u: np.ndarray, weight: np.ndarray, digits: int) -> float:
    """KL(weighted law of the leading `digits` digits of u || uniform): what a policy that fits the
    weighted pool exactly on those digits spends on them (and Best-of-n's law when u is dense)."""
    cells = 10**digits
    law = np.bincount(np.minimum((u * cells).astype(int), cells - 1), weights=weight, minlength=cells) / weight.sum()
    law = law[law > 0]
    return float(np.sum(law * np.log(cells * law)))


def target_weights(lt, le, k, reward, weighting: str, n: int = N) -> np.ndarray:
    """Forward weights of one pool: unbiased, pool (with replacement) or exact n F^(n-1) (F(r) = r)."""
    if weighting == "exact":
        return n * np.asarray(reward, dtype=np.float64) ** (n - 1)
    return bon.unbiased_bon_weight(lt, le, k, n) if weighting == "unbiased" else bon.bon_weight(lt / k, le / k, n)


def pool_target_kl(base: Path) -> dict[str, list[float]]:
    """KL of the forward term's target law on the first one and two digits, for this seed's pool."""
    t = Store(base).query("SELECT lt, le, k, reward FROM pool").to_pydict()
    lt, le, k, r = (np.asarray(t[c]) for c in ("lt", "le", "k", "reward"))
    return {w: [law_kl(r, target_weights(lt, le, k, r, w), d) for d in (1, 2)] for w in ("unbiased", "exact", "pool")}


def simulate_target_kl(pools: int = 2000, prompts: int = 64, k: int = 16, n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    """Monte Carlo of `pool_target_kl` over fresh pools of Uniform(0, 1) rewards: [pools, 2] per weighting."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"unbiased": [], "exact": [], "pool": []}
    ranks = np.arange(1, k + 1)
    for _ in range(pools):
        u = np.sort(rng.random((prompts, k)), axis=1).ravel()  # each prompt's rewards in rank order
        lt, le, kk = np.tile(ranks - 1, prompts), np.tile(ranks, prompts), np.full(u.size, k)
        for w, kls in out.items():
            kls.append([law_kl(u, target_weights(lt, le, kk, u, w, n), d) for d in (1, 2)])
    return {w: np.array(v) for w, v in out.items()}


def target_table(seeds: list[int], out: Path) -> str:
    """Markdown: the forward target's KL on 1 and 2 digits, per weighting: exact Best-of-8, the
    Monte Carlo mean ± sd over fresh pools, and each seed's own pool."""
    sim = simulate_target_kl()
    exact = [law_kl(np.linspace(0, 1, 2_000_001)[:-1] + 2.5e-7, N * (np.linspace(0, 1, 2_000_001)[:-1] + 2.5e-7) ** (N - 1), d)
             for d in (1, 2)]
    per_seed = {s: pool_target_kl(out / f"seed{s}" / "base") for s in seeds if (out / f"seed{s}" / "base").is_dir()}
    lines = ["| forward weights | digits | Best-of-8 (exact) | target law, 2,000 simulated pools of 64 x 16 (mean ± sd) | "
             + " | ".join(f"seed {s}'s pool" for s in per_seed) + " |", "|---|---:|---:|---:|" + "---:|" * len(per_seed)]
    for w in ("unbiased", "exact", "pool"):
        for d in (0, 1):
            lines.append(f"| {w} | {d + 1} | {exact[d]:.3f} | {sim[w][:, d].mean():.3f} ± {sim[w][:, d].std():.3f} | "
                         + " | ".join(f"{v[w][d]:.3f}" for v in per_seed.values()) + " |")
    return "\n".join(lines)


def split(row: dict) -> str:
    """KL by position as `d1 | d2 | d3..d10 | space, EOS and beyond`."""
    kp = row["kl_position"]
    return f"{kp[1]:.3f} | {kp[2]:.3f} | {sum(kp[3:11]):.3f} | {kp[0] + sum(kp[11:]):.3f}"


def tables(rows: list[dict], epochs: list[int]) -> str:
    """Markdown: per setting and epoch, mean ± sd over seeds (each seed's figure in brackets), and
    each run's KL by position at the last epoch asked."""
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        w = WEIGHTS_LABEL.get(r["weighting"], r["weighting"]) + (", self-normalized" if r.get("backward") == "snis" else "")
        groups.setdefault((w, r["beta"], r["lr"], r.get("k", 16), r["epoch"]), []).append(r)
    lines = [("| weights (forward / backward) | beta | lr | k | epoch | seeds | gain (each seed) | KL / BoN-8's (each seed) "
             "| malformed (mean) |"), "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for (w, beta, lr, k, epoch), rs in sorted(groups.items()):
        if epoch not in epochs:
            continue
        g, kl = np.array([r["gain"] for r in rs]), np.array([r["kl_ratio"] for r in rs])
        sd = lambda x, f: f" ± {f(x.std(ddof=1))}" if x.size > 1 else ""
        pct, times = (lambda v: f"{100 * v:.0f}%"), (lambda v: f"{v:.2f}x")
        lines.append(f"| {w} | {beta} | {lr} | {k} | {epoch} | {len(rs)} | {pct(g.mean())}{sd(g, pct)} "
                     f"({', '.join(pct(v) for v in g)}) | {times(kl.mean())}{sd(kl, times)} ({', '.join(times(v) for v in kl)}) "
                     + (f"| {1 - np.mean([r['well_formed'] for r in rs]):.1%} |" if "well_formed" in rs[0] else "| - |"))
    lines += ["", ("| weights (forward / backward) | beta | lr | k | epoch | seed | KL | d1 | d2 | d3..d10 | space, EOS, beyond "
              "| malformed samples | KL on them |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    last = {key[:4]: max(e for *k2, e in groups if tuple(k2) == key[:4] and e in epochs) for key in groups
            if any(e in epochs for *k2, e in groups if tuple(k2) == key[:4])}
    for (w, beta, lr, k, epoch), rs in sorted(groups.items()):
        if last.get((w, beta, lr, k)) == epoch and "kl_position" in rs[0]:  # each setting's last epoch asked
            lines += [f"| {w} | {beta} | {lr} | {k} | {epoch} | {r['seed']} | {r['kl']:.3f} | {split(r)} "
                      f"| {1 - r['well_formed']:.1%} | {r['kl_malformed']:.3f} |" if "kl_malformed" in r else
                      f"| {w} | {beta} | {lr} | {k} | {epoch} | {r['seed']} | {r['kl']:.3f} | {split(r)} "
                      f"| {1 - r['well_formed']:.1%} | - |" for r in rs]
    bon_kl = bon_position_kl(N)
    lines.append(f"| Best-of-8, exact (Uniform reward) | | | | | | {bon_kl.sum():.3f} | {bon_kl[0]:.3f} | {bon_kl[1]:.3f} | "
                 f"{bon_kl[2:].sum():.3f} | 0 | | |")
    return "\n".join(lines)


def trajectory(rows: list[dict]) -> str:
    """Markdown: epoch by epoch, the default run, forward only and the self-normalized backward
    (lr 1e-3, k = 16, unbiased weights), each seed's gain and KL ratio and the malformed share."""
    runs = {"default (beta 0.5)": (0.5, "pool"), "forward only (beta 0)": (0.0, "pool"), "self-normalized (beta 0.5)": (0.5, "snis")}
    lines = ["| epoch | " + " | ".join(f"{name}: gain | KL / BoN-8's | malformed" for name in runs) + " |",
             "|---:|" + "---|---|---:|" * len(runs)]
    for epoch in range(1, 1 + max((r["epoch"] for r in rows), default=0)):
        cells = []
        for beta, backward in runs.values():
            rs = sorted((r for r in rows if r["weighting"] == "unbiased" and r["beta"] == beta and r["lr"] == 1e-3
                         and r.get("k", 16) == 16 and r.get("backward", "pool") == backward and r["epoch"] == epoch),
                        key=lambda r: r["seed"])
            if not rs:
                cells += ["-"] * 3
                continue
            g, kl = np.array([r["gain"] for r in rs]), np.array([r["kl_ratio"] for r in rs])
            cells += [f"{g.mean():.0%} ({', '.join(f'{v:.0%}' for v in g)})",
                      f"{kl.mean():.2f}x ({', '.join(f'{v:.2f}' for v in kl)})",
                      f"{1 - np.mean([r['well_formed'] for r in rs]):.1%}"]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


WEIGHTS_LABEL = {"unbiased": "unbiased / pool (the default)", "pool": "pool / pool", "oracle": "exact / exact",
                 "oracle-fwd": "exact / pool", "oracle-bwd": "unbiased / exact", "digamma-bwd": "unbiased / E[log w given rank]",
                 "unbiased+snis": "unbiased / pool, self-normalized backward"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="digits", choices=["digits", "tiny"],
                    help="tiny: fidelity.py's figures only (no per-position KL; its reward has ties)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--beta", type=float, nargs="+", default=[0.5])
    ap.add_argument("--lr", type=float, nargs="+", default=[fidelity.TRAIN["lr"]])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--weighting", default="unbiased", choices=["unbiased", "pool", "digamma-bwd", *ORACLE])
    ap.add_argument("--k", type=int, default=16, help="pool size per training prompt (fidelity.py: 16)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/fidelity-trace"))
    ap.add_argument("--backward", default="pool", choices=["pool", "snis"],
                    help="snis: train with self_normalize (the backward term's rho / mean rho, trainer/losses.py)")
    ap.add_argument("--force", action="store_true", help="train and measure again even if trace.json has the rows")
    ap.add_argument("--table", type=int, nargs="*", help="only print the tables of trace.json at these epochs (default 4), "
                    "the epoch-by-epoch trajectory and the forward target's KL (simulated and on each --seeds pool)")
    args = ap.parse_args()
    if args.table is not None:
        rows = json.loads((args.out / "trace.json").read_text())
        tiny = [r for r in rows if r.get("task") == "tiny"]
        rows = [r for r in rows if r.get("task", "digits") == "digits"]
        if tiny:
            print(tables(tiny, args.table or [4]).split("\n\n")[0].replace("| weights", "| tiny: weights", 1))
            print()
        print(tables(rows, args.table or [4]))
        print()
        print(trajectory(rows))
        print()
        print(target_table(args.seeds, args.out))
        return
    if args.task == "tiny" and (args.weighting not in ("unbiased", "pool")):
        ap.error(f"--weighting {args.weighting} needs the digits task (a reward that is its own CDF)")
    import torch

    torch.set_num_threads(1)
    task = fidelity.load_task(args.task)
    pool = evaluate.ensure_eval_pool(args.out / f"{args.task}-eval", str(task.model_dir), str(task.eval_prompts_file),
                                     task.reward, k=fidelity.EVAL_POOL_K)
    trace_path = args.out / "trace.json"
    rows = json.loads(trace_path.read_text()) if trace_path.is_file() else []
    for seed in args.seeds:
        work = args.out / (f"seed{seed}" if args.task == "digits" else f"{args.task}-seed{seed}")
        work.mkdir(parents=True, exist_ok=True)
        base_dir = work / ("base" if args.k == 16 else f"base-k{args.k}")
        base = Store(base_dir) if base_dir.is_dir() else fidelity.base_store(base_dir, task, args.k, 100 * seed)
        ref = references(args.task, task, pool, seed, work / "refs.json")
        print(f"{args.task} seed {seed}: pi_0 {ref['pi0']['log_p_le']:.3f}, BoN-8 {ref['bon']['log_p_le']:.3f} "
              f"at KL {ref['bon']['kl']:.3f}", flush=True)
        for beta in args.beta:
            for lr in args.lr:
                key = {"seed": seed, "beta": beta, "lr": lr, "weighting": args.weighting, "k": args.k,
                       "backward": args.backward, **({} if args.task == "digits" else {"task": args.task})}
                rows = run_setting(rows, key, args, base, work, task, pool, ref, trace_path)


def run_setting(rows: list[dict], key: dict, args, base: Store, work: Path, task, pool: Path, ref: dict,
                trace_path: Path) -> list[dict]:
    """Train one setting with a checkpoint per epoch and measure each (unless trace.json has them)."""
    def same(r: dict) -> bool:  # rows written before the task key are digits rows
        return r.get("task", "digits") == key.get("task", "digits") and all(
            r.get(k) == v for k, v in key.items() if k != "task")

    if {r["epoch"] for r in rows if same(r)} >= set(range(1, args.epochs + 1)) and not args.force:
        return rows
    folder = work / f"b{key['beta']}-lr{key['lr']}-{args.weighting}-k{args.k}-{args.backward}"
    checkpoints = train_traced(base, folder, key["seed"], key["beta"], key["lr"], args.epochs, args.weighting,
                               args.backward == "snis")
    for epoch, ckpt in enumerate(checkpoints, 1):
        row = {**key, "epoch": epoch, **measure_row(args.task, str(ckpt), task, pool, key["seed"])}
        row["gain"], row["kl_ratio"] = ratios(row, ref)
        rows = [r for r in rows if not (same(r) and r["epoch"] == epoch)] + [row]
        trace_path.write_text(json.dumps(rows, indent=1))
        extra = (f" by position {np.round(row['kl_position'], 3).tolist()}; malformed {1 - row['well_formed']:.3f} "
                 f"carrying KL {row['kl_malformed']:.3f}; logp gap {row['logp_gap']:.1e}; first-digit law "
                 f"{np.round(row['d1_law'], 3).tolist()}" if "kl_position" in row else "")
        print(f"{key} epoch {epoch}: gain {row['gain']:.1%} KL {row['kl']:.3f} ({row['kl_ratio']:.2f}x){extra}", flush=True)
    shutil.rmtree(folder, ignore_errors=True)  # checkpoints: ~MBs each, measured
    return rows

if __name__ == "__main__":
    sys.exit(main())
