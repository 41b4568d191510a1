"""Does it distil Best-of-N? BOND against Best-of-N measured on the task, over 3 seeds.

On each built-in task (`tiny`: letter sorting, discrete reward with ties; `digits`: continuous
reward, where the analytic law holds exactly) and for each N, in the same run and for each seed:

    Best-of-N sampling   the target itself: the best of N fresh pi_0 samples (first wins ties),
                         evaluated like every policy; its KL is exact, ties included
                         (trainer.evaluate.bon_kl_on_pool over the large evaluation pool)
    RS-SFT               fine-tune on the single best of each group of N pool samples (first index
                         wins ties): RAFT / ReST / OpenRLHF's rejection sampling
    BOND forward         beta = 0 (the weighted NLL alone), unbiased weights, k = 16, every N
    BOND Jeffreys        beta = 0.5, unbiased weights, k = 16 = 2N at N = 8
    Jeffreys k = N = 8   the same on a pool of 8 (digits): unbiased weights are then rejection sampling
                         (backward-only, beta = 1, diverges offline: bench/RESULTS.md, earlier run)
    iterative Jeffreys   n = 2 per round, M = 1, 2, 3 rounds (N = 2^M), a fresh pool each round, at
                         ITERATIVE_LR (a Best-of-2 round is a small step: bench/RESULTS.md, "Tracing
                         the tiny iterative gap")
    online J-BOND        paper Algorithm 2 (trainer/online.py), checkpoints along training, beside
                         REINFORCE + KL at the same generation budget (a sweep of its KL coefficient)

RS-SFT and the offline BOND variants train on the *same* pool (k samples per training prompt): the
same generation budget. A seed changes the training pool (its rounds start at 100 * seed, and a
sample's seed derives from its round), the batch order, the evaluation samples and J-BOND's samples;
the evaluation pool of pi_0 (256 samples per held-out prompt) is the fixed ruler. Each policy gets
64 fresh samples per held-out prompt: E[log p_le], KL(pi || pi_0) (Monte Carlo), and the KS distance
of its quantiles to Best-of-N measured on the task and to Beta(N, 1) (the continuous-reward law).
Writes bench/RESULTS.md (appended), a PNG and bench-out/fidelity/rows.json.

    python bench/fidelity.py            # both tasks, 3 seeds, the online comparison on digits
    python bench/fidelity.py --quick    # tiny task, N = 8, M <= 2, one seed, no online runs
    python bench/fidelity.py --rows bench-out/fidelity/rows.json   # only redraw the plot
    python bench/fidelity.py --only-rs-forward --seeds 12   # RS-SFT vs the forward term alone, paired by seed
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bond_data import bon, stages
from bond_data.backends.base import Sampling
from bond_data.build import build_dataset
from bond_data.files import folder_sha256, write_parquet_atomic
from bond_data.prompts import add_prompts
from bond_data.store import Store
from trainer import evaluate
from trainer.config import TINY_ITERATIVE_LR, TINY_TRAIN, OnlineConfig, TrainConfig
from trainer.train import train

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from fidelity_plot import aggregate, plot

TRAIN = TrainConfig.load(TINY_TRAIN).model_dump(exclude={"round", "beta", "dataset_id", "seed"})  # shared with `bond demo`
ITERATIVE_LR = TINY_ITERATIVE_LR  # 3e-4, as `bond demo` (trainer/config.py); direct rows keep tiny.yaml's 1e-3
# (at 3e-4 direct N = 8's backward-term excursion off the pool is slower to undo)
EVAL_POOL_K = 256  # pi_0 samples per held-out prompt: the ruler for p_le and the exact Best-of-N KL
EVAL_SAMPLES = 64  # fresh samples per held-out prompt and policy (32 prompts: 2,048 per policy)
ONLINE = {"lr": 1e-3, "prompts_per_step": 32, "checkpoint_every": 25, "keep_checkpoints": 0}  # both online methods
KL_COEFS = (0.05, 0.1, 0.2)  # REINFORCE + KL sweep (continuous reward in [0, 1): KL ~2, ~1.3, ~0.65 at the optimum)


def load_task(name: str):
    if name == "digits":
        from bond_data.tasks.digits import ensure_digits_task

        return ensure_digits_task(quiet=True)
    from bond_data.tasks.tiny import ensure_tiny_task

    return ensure_tiny_task(quiet=True)


def with_training_prompts(task, count: int, folder: Path):
    """`tiny` with `count` training prompts: the shipped 64, then fresh words from the task's own
    generator (seeded), none of them a shipped training or held-out word; as is for count <= 64.
    The iterative rows' gap on `tiny` is generalisation from 64 words (bench/RESULTS.md, "Tracing
    the tiny iterative gap")."""
    from bond_data.tasks import tiny
    from bond_data.tasks.common import read_prompts

    if count <= 64:
        return task
    taken = set(read_prompts(task.prompts_file)) | set(read_prompts(task.eval_prompts_file))
    prompts, rng = read_prompts(task.prompts_file), random.Random(99)
    while len(prompts) < count:
        prompt = tiny.make_prompt(tiny._random_word(rng))
        if prompt not in taken:
            taken.add(prompt)
            prompts.append(prompt)
    path = folder / f"tiny_prompts_{count}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return dataclasses.replace(task, prompts_file=path)


# ---- training ----------------------------------------------------------------------------------
def base_store(folder: Path, task, k: int, round0: int) -> Store:
    """pi_0 as the anchor of round `round0`: k candidates per training prompt, scored once."""
    store = Store(folder)
    store.register_anchor(round0, str(task.model_dir), folder_sha256(task.model_dir))
    add_prompts(store, task.prompts_file)
    stages.generate_round(store, round0, k, Sampling(max_new_tokens=16))
    stages.score_round(store, round0, task.reward)
    return store


def rejection_sampling_dataset(store: Store, round0: int, n: int) -> str:
    """RS-SFT as a dataset the trainer reads: weight n on the argmax of each group of n consecutive
    samples (first index wins ties), 0 elsewhere, so the forward term is plain SFT on the winners."""
    record = build_dataset(store, round0, n)
    table = pq.read_table(store.root / record["path"])
    cands = store.query("SELECT candidate_id, sample_index FROM candidates").to_pydict()
    index = dict(zip(cands["candidate_id"], cands["sample_index"]))
    rows = table.to_pylist()
    weights = np.zeros(len(rows))
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r["prompt_id"], index[r["candidate_id"]] // n), []).append(i)
    for members in groups.values():
        if len(members) == n:
            members.sort(key=lambda i: index[rows[i]["candidate_id"]])
            weights[members[int(np.argmax([rows[i]["reward"] for i in members]))]] = n
    dataset_id = f"rs-sft-n{n}"
    path = store.root / "datasets" / f"round={round0}" / dataset_id / "part-0.parquet"
    write_parquet_atomic(table.set_column(table.schema.get_field_index("bon_weight"), "bon_weight",
                                          pa.array(weights)), path)
    store.register_dataset({"dataset_id": dataset_id, "round": round0, "rm_id": record["rm_id"], "n": n,
                            "path": path.relative_to(store.root).as_posix(), "num_rows": len(rows),
                            "num_prompts": record["num_prompts"], "card": {"method": "rejection sampling SFT"}})
    return dataset_id


def train_offline(base: Store, folder: Path, round0: int, n: int, beta: float, seed: int, rs_sft: bool = False) -> str:
    """Copy the seed's pool, build its dataset, train; return the trained policy's folder."""
    shutil.copytree(base.root, folder)
    store = Store(folder)
    dataset_id = (rejection_sampling_dataset(store, round0, n) if rs_sft
                  else build_dataset(store, round0, n)["dataset_id"])
    train(str(folder), TrainConfig(round=round0, beta=beta, dataset_id=dataset_id, seed=seed, **TRAIN))
    return store.anchor(round0 + 1)["anchor_path"]


def train_iterative(base: Store, folder: Path, task, k: int, round0: int, rounds: int, seed: int) -> list[str]:
    """n = 2 per round; round t >= 1 generates a fresh pool from the anchor round t - 1 registered."""
    shutil.copytree(base.root, folder)
    store = Store(folder)
    anchors = []
    for t in range(round0, round0 + rounds):
        record = stages.curate_round(store, t, k, task.reward, n=2)
        train(str(folder), TrainConfig(round=t, beta=0.5, dataset_id=record["dataset_id"], seed=seed,
                                       **{**TRAIN, "lr": ITERATIVE_LR}))
        anchors.append(store.anchor(t + 1)["anchor_path"])
    return anchors


def train_online_run(task, folder: Path, cfg: OnlineConfig) -> list[tuple[int, str]]:
    """(step, policy folder) of every checkpoint of one online run (J-BOND or REINFORCE)."""
    from trainer.online import train_online

    prompts = [json.loads(line)["prompt"] for line in Path(task.prompts_file).read_text().splitlines() if line.strip()]
    train_online(str(task.model_dir), prompts, task.reward, folder, cfg, run_dir=folder.with_name(folder.name + "-steps"))
    steps = sorted(folder.with_name(folder.name + "-steps").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return [(int(p.name.split("-")[1]), str(p)) for p in steps]


# ---- measuring ---------------------------------------------------------------------------------
def _row(method: str, n: int | None, seed: int, m: dict, bon_q: dict[int, list[float]]) -> dict:
    row = {"method": method, "N": n, "seed": seed, **{k: m[k] for k in ("reward", "p_le", "log_p_le", "kl")},
           "samples": len(m["quantiles"]), "ks_beta": bon.ks_distance_to_beta(m["quantiles"], n or 1)}
    if n in bon_q and method != "Best-of-N sampling":
        row["ks_bon"] = evaluate.ks_distance(m["quantiles"], bon_q[n])
    return row


def measure(method: str, n: int | None, policy: str, task, pool: Path, seed: int,
            bon_q: dict[int, list[float]], samples: int = EVAL_SAMPLES) -> dict:
    """One policy on the held-out prompts against pi_0's pool; KS to measured Best-of-n if known."""
    m = evaluate.evaluate_policy(policy, str(task.model_dir), pool, task.reward, samples_per_prompt=samples,
                                 seed=1 + 1000 * seed)
    return _row(method, n, seed, m, bon_q)


def measure_bon(ns: list[int], task, pool: Path, seed: int, bon_q: dict[int, list[float]]) -> list[dict]:
    """Best-of-n sampling for every n from one draw (evaluate_best_of_ns); keeps its quantiles in bon_q."""
    ms = evaluate.evaluate_best_of_ns(str(task.model_dir), pool, task.reward, ns, samples_per_prompt=EVAL_SAMPLES,
                                      seed=2 + 1000 * seed)
    bon_q.update({n: m["quantiles"] for n, m in ms.items()})
    return [_row("Best-of-N sampling", n, seed, m, bon_q) for n, m in ms.items()]


def run_seed(name: str, task, work: Path, pool: Path, seed: int, quick: bool, k: int,
             only_rs_forward: bool = False) -> list[dict]:
    round0 = 100 * seed
    base = base_store(work / "base", task, k, round0)
    bon_q: dict[int, list[float]] = {}
    ns = [8] if quick else [2, 4, 8]
    bon_rows = measure_bon(ns, task, pool, seed, bon_q)
    rows = [measure("pi_0", 1, str(task.model_dir), task, pool, seed, bon_q)]
    for n, bon_row in zip(ns, bon_rows):
        rows.append(bon_row)
        rows.append(measure("RS-SFT", n, train_offline(base, work / f"rs-{n}", round0, n, 0.0, seed, rs_sft=True),
                            task, pool, seed, bon_q))
        jeffreys = n == 8 and not only_rs_forward
        variants = [("BOND forward (beta 0)", 0.0)] + ([("BOND Jeffreys (beta 0.5)", 0.5)] if jeffreys else [])
        for method, beta in variants:
            rows.append(measure(method, n, train_offline(base, work / f"b{beta}-{n}", round0, n, beta, seed),
                                task, pool, seed, bon_q))
        print_rows(f"{name}, seed {seed}", rows)
    if only_rs_forward:
        return rows
    if not quick and name == "digits":  # k = N = 8: unbiased weights = rejection sampling (all forward mass on each pool's best)
        base8 = base_store(work / "base-k8", task, 8, round0)
        rows.append(measure("BOND Jeffreys, k = N", 8, train_offline(base8, work / "k8", round0, 8, 0.5, seed),
                            task, pool, seed, bon_q))
    for m, anchor in enumerate(train_iterative(base, work / "iterative", task, k, round0, 2 if quick else 3, seed), start=1):
        rows.append(measure(f"iterative Jeffreys n=2, M={m}", 2**m, anchor, task, pool, seed, bon_q))
    print_rows(f"{name}, seed {seed}", rows)
    return rows


def online_runs(seed: int, steps: int, kl_coefs: tuple[float, ...]) -> list[tuple[str, OnlineConfig]]:
    runs = [("online J-BOND", OnlineConfig(steps=steps, seed=seed, **ONLINE))]
    return runs + [(f"REINFORCE + KL {c}", OnlineConfig(algorithm="reinforce", kl_coef=c, steps=steps, seed=seed, **ONLINE))
                   for c in kl_coefs]


def run_online(task, folder: Path, pool: Path | None, seed: int, steps: int, kl_coefs: tuple[float, ...]) -> list[dict]:
    """J-BOND and REINFORCE + KL (one run per KL coefficient); each checkpoint measured (16 samples
    per prompt: curve points, not KS) unless pool is None. The runs live in `folder` and resume:
    a finished run costs nothing the second time."""
    rows = []
    for method, cfg in online_runs(seed, steps, kl_coefs):
        run = folder / f"{method.replace(' ', '-')}-seed{seed}"
        checkpoints = train_online_run(task, run, cfg)
        if pool is None:
            continue
        cache = run.with_name(run.name + "-steps") / "measured.json"  # step -> row: a rerun measures only new ones
        measured = json.loads(cache.read_text()) if cache.is_file() else {}
        for step, policy in checkpoints:
            if str(step) not in measured:
                row = measure(method, None, policy, task, pool, seed, {}, samples=16)
                measured[str(step)] = {**row, "step": step, "generated": step * cfg.prompts_per_step * 3}
                cache.write_text(json.dumps(measured))
            rows.append(measured[str(step)])
        print(f"{method} seed {seed}: last E[log p_le] {rows[-1]['log_p_le']:.3f} KL {rows[-1]['kl']:.3f}", flush=True)
    return rows


def run_task(name: str, out: Path, quick: bool, seeds: list[int], k: int, online_steps: int,
             online_seeds: list[int], kl_coefs: tuple[float, ...], save, train_prompts: int = 64,
             only_rs_forward: bool = False) -> dict:
    """Every seed of one task, then its online runs; `save(result)` after each seed and run."""
    task = with_training_prompts(load_task(name), train_prompts, out)
    pool = evaluate.ensure_eval_pool(out / f"{name}-eval", str(task.model_dir), str(task.eval_prompts_file),
                                     task.reward, k=EVAL_POOL_K)
    result = {"rows": [], "online": [], "bon_kl": {n: evaluate.bon_kl_on_pool(evaluate.read_pool(pool), n)
                                                   for n in (1, 2, 4, 8, 16, 32)}}
    for seed in seeds:
        work = out / name / f"seed{seed}"
        shutil.rmtree(work, ignore_errors=True)
        result["rows"] += run_seed(name, task, work, pool, seed, quick, k, only_rs_forward)
        save(result)
    for seed in online_seeds if name == "digits" and online_steps else []:
        result["online"] += run_online(task, out / name / "online", pool, seed, online_steps,
                                       kl_coefs if seed == online_seeds[0] else ())
        save(result)
    return result


# ---- reporting -----------------------------------------------------------------------------------
def _pm(r: dict, key: str, digits: int = 3) -> str:
    if key not in r:
        return "-"
    return f"{r[key]:.{digits}f} ± {r[key + '_sd']:.{digits}f}" if r["seeds"] > 1 else f"{r[key]:.{digits}f}"


def markdown_table(task: str, agg: list[dict]) -> str:
    seeds = max(r["seeds"] for r in agg)
    lines = [f"\n#### task `{task}` (mean ± sd over {seeds} seed{'s' if seeds > 1 else ''})\n",
             "| method | N | reward | E[p_le] | E[log p_le] | KL(pi‖pi_0) | KS to measured BoN | KS to Beta(N,1) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in agg:
        kl = _pm(r, "kl") + (" (exact)" if r["method"] == "Best-of-N sampling" else "")
        lines.append(f"| {r['method']} | {r['N'] or '-'} | {_pm(r, 'reward', 4)} | {_pm(r, 'p_le')} | "
                     f"{_pm(r, 'log_p_le')} | {kl} | {_pm(r, 'ks_bon')} | {_pm(r, 'ks_beta')} |")
    return "\n".join(lines)


def _ratios(rows: list[dict], method: str, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Per seed: the share of measured Best-of-n's E[log p_le] gain over pi_0, and KL / its exact KL."""
    by = {(r["method"], r["N"], r["seed"]): r for r in rows}
    gains, kls = [], []
    for seed in sorted({r["seed"] for r in rows}):
        pol, bon_row, pi0 = by.get((method, n, seed)), by.get(("Best-of-N sampling", n, seed)), by.get(("pi_0", 1, seed))
        if pol and bon_row and pi0:
            gains.append((pol["log_p_le"] - pi0["log_p_le"]) / (bon_row["log_p_le"] - pi0["log_p_le"]))
            kls.append(pol["kl"] / bon_row["kl"])
    return (np.array(gains), np.array(kls)) if gains else None


def _ms(x: np.ndarray, pct: bool = False) -> str:
    f = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: f"{v:.2f}x")
    return f(x.mean()) + (f" ± {f(x.std(ddof=1))}" if x.size > 1 else "") + f" (seeds: {', '.join(f(v) for v in x)})"


def targets(task: str, rows: list[dict]) -> list[str]:
    """The issue's targets, checked on this task's per-seed rows."""
    continuous = task == "digits"  # the targets: direct on the continuous task, iterative on the tie-heavy one
    checks = [("Jeffreys direct, k = 2N = 16", "BOND Jeffreys (beta 0.5)", 8, *((0.95, 1.05) if continuous else (None, None))),
              ("Jeffreys direct, k = N = 8 (reported)", "BOND Jeffreys, k = N", 8, None, None),
              ("Jeffreys iterative n=2, M=3", "iterative Jeffreys n=2, M=3", 8, *((None, None) if continuous else (0.80, 1.2)))]
    out = []
    for label, method, n, gain_target, kl_target in checks:
        got = _ratios(rows, method, n)
        if got is None:
            continue
        gain, kl = got
        tgt = (f" (target >= {gain_target:.0%} at <= {kl_target}x: "
               f"{'met' if gain.mean() >= gain_target and kl.mean() <= kl_target else 'missed'})") if gain_target else ""
        out.append(f"- {label}: {_ms(gain, pct=True)} of measured Best-of-{n}'s E[log p_le] gain over pi_0, "
                   f"KL {_ms(kl)} its exact KL{tgt}")
    agg = {(r["method"], r["N"]): r for r in aggregate(rows)}
    for n in sorted({r["N"] for r in rows if r["method"] == "RS-SFT"}):
        fwd, rs = agg.get(("BOND forward (beta 0)", n)), agg.get(("RS-SFT", n))
        if fwd and rs and "ks_bon" in fwd:
            apart = fwd["ks_bon"] + fwd["ks_bon_sd"] < rs["ks_bon"] - rs["ks_bon_sd"]
            spread = "one seed, no spread" if fwd["seeds"] < 2 else "beyond the seed spread" if apart else "within the seed spread"
            verdict = f"forward closer, {spread}" if fwd["ks_bon"] < rs["ks_bon"] else "RS-SFT closer"
            out.append(f"- N={n}: KS to measured Best-of-N: exact-weight forward {_pm(fwd, 'ks_bon')} vs RS-SFT "
                       f"{_pm(rs, 'ks_bon')} ({verdict}){paired_ks(rows, n)}")
    return out


def paired_ks(rows: list[dict], n: int) -> str:
    """Forward against RS-SFT seed by seed: both train on the same pool and are measured against the
    same Best-of-N rows, so the per-seed difference d = KS(RS-SFT) - KS(forward) removes what the
    seeds share (pool, evaluation draw). Separated when mean d exceeds twice its standard error."""
    by = {(r["method"], r["N"], r["seed"]): r.get("ks_bon") for r in rows}
    pairs = [(by.get(("RS-SFT", n, s)), by.get(("BOND forward (beta 0)", n, s))) for s in sorted({r["seed"] for r in rows})]
    d = np.array([rs - fwd for rs, fwd in pairs if rs is not None and fwd is not None])
    if d.size < 2:
        return ""
    se = d.std(ddof=1) / np.sqrt(d.size)
    verdict = "separated" if d.mean() > 2 * se else "not separated"
    return (f"; paired by seed: RS-SFT - forward {d.mean():+.3f} ± {se:.3f} (standard error), forward lower on "
            f"{int((d > 0).sum())} of {d.size} seeds: {verdict}")


def online_table(online: list[dict], every: int = 50) -> str:
    """Checkpoints every `every` steps of each online method, mean ± sd over its seeds."""
    lines = [("\n#### online, task `digits`: checkpoints along training (16 samples per held-out prompt, "
             "mean ± sd over seeds where there are several)\n"),
             "| method | seeds | step | samples generated | reward | E[log p_le] | KL(pi‖pi_0) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in online:
        if r["step"] % every == 0:
            groups.setdefault((r["method"], r["step"]), []).append(r)
    for (method, step), rs in groups.items():
        cells = []
        for key, digits in (("reward", 4), ("log_p_le", 3), ("kl", 3)):
            v = np.array([r[key] for r in rs])
            cells.append(f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if v.size > 1 else ""))
        lines.append(f"| {method} | {len(rs)} | {step} | {rs[0]['generated']:,} | {' | '.join(cells)} |")
    return "\n".join(lines)


def merge_rows(saved: list[dict]) -> dict:
    """Several rows.json files as one: per task, rows and online rows concatenated."""
    out: dict = {}
    for results in saved:
        for task, res in results.items():
            into = out.setdefault(task, {"rows": [], "online": []})
            into["rows"] += res.get("rows", [])
            into["online"] += res.get("online", [])
    return out


def report_lines(results: dict) -> list[str]:
    out = []
    for name, res in results.items():
        out += [markdown_table(name, aggregate(res["rows"])), "", *targets(name, res["rows"])] if res["rows"] else []
        if res.get("online"):
            out.append(online_table(res["online"]))
    return out


def print_rows(label: str, rows: list[dict]) -> None:
    print(markdown_table(label, aggregate(rows)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", nargs="+", default=None, choices=["tiny", "digits"])
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..S-1 (default 3; --quick 1)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/fidelity"))
    ap.add_argument("--results", type=Path, default=Path("bench/RESULTS.md"))
    ap.add_argument("--rows", type=Path, nargs="+", help="only redraw the plot from saved rows.json files (merged)")
    ap.add_argument("--k", type=int, default=16, help="pool size per training prompt")
    ap.add_argument("--online-steps", type=int, default=200, help="J-BOND / REINFORCE steps (0: no online runs)")
    ap.add_argument("--online-seeds", type=int, default=1, help="seeds with a J-BOND run (the REINFORCE sweep: the first)")
    ap.add_argument("--online-only", action="store_true", help="only the online runs (digits): train or resume, "
                    "evaluate each checkpoint, write rows-online.json (merge with --rows)")
    ap.add_argument("--train-only", action="store_true", help="with --online-only: train, do not evaluate")
    ap.add_argument("--only-rs-forward", action="store_true", help="only pi_0, measured Best-of-N, RS-SFT and the "
                    "exact-weight forward term at each N (the KS comparison; no Jeffreys, iterative or online runs)")
    ap.add_argument("--self-normalize", action="store_true", help="offline training with the trainer's self_normalize "
                    "(the backward term's rho / mean rho; bench/RESULTS.md, 'Tracing the digits KL overshoot')")
    ap.add_argument("--train-prompts", type=int, default=64, help="tiny only: train every row on this many prompts "
                    "(the shipped 64, then fresh words; bench/RESULTS.md, 'Tracing the tiny iterative gap')")
    args = ap.parse_args()
    if args.train_prompts != 64 and ((args.tasks or (["tiny"] if args.quick else [])) != ["tiny"] or args.train_prompts < 64):
        ap.error("--train-prompts needs --tasks tiny and at least the shipped 64 prompts")
    TRAIN["self_normalize"] = args.self_normalize
    import torch

    torch.set_num_threads(1)  # the tiny models run faster on one thread when the CPU is shared (tasks/common)
    tasks = args.tasks or (["tiny"] if args.quick else ["tiny", "digits"])
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    png_path = args.results.with_name("fidelity-quick.png" if args.quick else "fidelity.png")
    if args.rows:  # the tables, targets and plot again from saved rows (nothing appended)
        saved = merge_rows([json.loads(path.read_text()) for path in args.rows])
        print("\n".join(report_lines(saved)))
        print(plot(saved, png_path))
        return
    if args.online_only:  # the online runs alone (they resume: finished runs are only evaluated)
        task = load_task("digits")
        pool = None if args.train_only else evaluate.ensure_eval_pool(
            args.out / "digits-eval", str(task.model_dir), str(task.eval_prompts_file), task.reward, k=EVAL_POOL_K)
        online = []
        for seed in seeds[: args.online_seeds]:
            online += run_online(task, args.out / "digits" / "online", pool, seed, args.online_steps,
                                 KL_COEFS if seed == 0 else ())
            (args.out / "rows-online.json").write_text(json.dumps({"digits": {"rows": [], "online": online}}))
        return
    start = time.time()
    results = {}
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / ("rows-quick.json" if args.quick else "rows-rs-forward.json" if args.only_rs_forward else "rows.json")

    def save(result: dict, name: str = "") -> None:  # partial results survive a run cut short
        rows_path.write_text(json.dumps({**results, name: result}))

    for name in tasks:
        results[name] = run_task(name, args.out, args.quick, seeds, args.k,
                                 0 if args.quick or args.only_rs_forward else args.online_steps,
                                 seeds[: args.online_seeds], KL_COEFS, lambda r, name=name: save(r, name),
                                 args.train_prompts, args.only_rs_forward)
    rows_path.write_text(json.dumps(results))
    report = report_lines(results)
    minutes = (time.time() - start) / 60
    cmd = " ".join(["python bench/fidelity.py", *sys.argv[1:]])
    text = "\n".join([f"### `{cmd}` ({minutes:.1f} min on this machine)", *report, "", f"Plot: `{png_path}`", ""])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(text + "\n")
    print(text)
    plot(results, png_path)
    print(f"fidelity: done in {minutes:.1f} min; appended to {args.results}; rows: {rows_path}")


if __name__ == "__main__":
    sys.exit(main())
