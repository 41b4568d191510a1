"""Round reports: what each round of iterative BOND did, and how far its anchor got towards Best-of-N.

    reports/round=R/report.md          the round: data, dataset, training, evaluation (Markdown)
    reports/round=R/evaluation.csv     the evaluation table: anchors 0..R+1 against pi_0, beside Best-of-N
                                       measured on the task (and the continuous-reward analytic law)
    reports/round=R/reward_vs_kl.png   quantile and reward against KL(pi_t || pi_0) (trainer.evaluate's plot)
    reports/round=R/training_loss.png  the loss terms per optimizer step, from the trainer's metrics.jsonl
    reports/index.md, index.html       every round on one page, linking each round's plots

Two steps, kept apart so that a report can be rebuilt without a model:
- `evaluate_anchors` is the expensive one (samples and scores, trainer/evaluate.py); each anchor's
  result is kept in `eval/anchor=T.json`, keyed by the anchor's hash, the evaluation settings and
  the pi_0 pool's record, and reused while they match; so is Best-of-N sampling of pi_0 measured
  the same way for each N = n_0 * ... * n_(t-1) the rounds reach (`eval/bon=N.json`, its KL exact
  with ties from the pool's reward law): on a tie-heavy task that, not the analytic law, is the
  target a round is compared with;
- `write_round_report` and `write_store_report` only read the store (catalog, dataset cards,
  metrics.jsonl, the kept evaluations) and write every file atomically; the same store gives the
  same bytes, so `bond report` rewrites exactly what `bond rounds` wrote.
A round R is reported once its anchor R+1 is registered; an anchor with no kept evaluation (no
held-out prompts configured) shows as "not evaluated".
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from bond_data.build import catalog_record
from bond_data.files import write_text_atomic
from bond_data.store import Store, StoreError
from trainer import evaluate

REPORTS, EVAL = "reports", "eval"
TABLE_COLUMNS = ["round", "N", "reward", "bon_reward", "p_le", "bon_p_le", "log_p_le", "bon_log_p_le", "kl", "bon_kl",
                 "analytic_log_p_le", "analytic_kl", "samples"]
BON_FIELDS = ("reward", "p_le", "log_p_le", "kl")


# ---- evaluation (expensive; kept per anchor) ---------------------------------------------------
def evaluation_file(root: Path, t: int) -> Path:
    return Path(root) / EVAL / f"anchor={t}.json"


def bon_file(root: Path, N: int) -> Path:
    return Path(root) / EVAL / f"bon={N}.json"


def _bon_ns(store: Store, up_to: int, facts: dict | None = None) -> dict[int, int]:
    """N of each anchor 0..up_to: the product of the n of the rounds that led to it (1 for pi_0)."""
    facts = facts or store.report_facts()
    ns, N = {}, 1
    for t in range(up_to + 1):
        if t > 0:
            dataset = _dataset(facts, t - 1)
            N *= dataset["n"] if dataset else 1
        ns[t] = N
    return ns


def evaluate_anchors(store: Store, up_to: int, prompts: str, reward: str, pool_k: int = 64,
                     samples_per_prompt: int = 8, max_new_tokens: int = 16, facts: dict | None = None) -> list[dict]:
    """Each anchor 0..up_to against pi_0 (round 0's anchor) on the held-out prompts, reusing every
    kept result whose anchor, settings and pool still match; the evaluations, in round order.
    `facts`: a `Store.report_facts()` snapshot to reuse."""
    pi0 = store.anchor(0)["anchor_path"]
    pool = evaluate.ensure_eval_pool(store.root / EVAL, pi0, prompts, reward, k=pool_k, max_new_tokens=max_new_tokens)
    pool_record = json.loads((pool.parent / evaluate.META_FILE).read_text())
    out = []
    for t in range(up_to + 1):
        anchor = store.anchor(t)
        key = {"anchor_hash": anchor["anchor_hash"], "pool": pool_record, "samples_per_prompt": samples_per_prompt,
               "max_new_tokens": max_new_tokens, "prompts": Path(prompts).name}
        path = evaluation_file(store.root, t)
        kept = json.loads(path.read_text()) if path.is_file() else None
        if kept is None or kept["key"] != key:
            m = evaluate.evaluate_policy(anchor["anchor_path"], pi0, pool, reward, samples_per_prompt, max_new_tokens)
            kept = {"round": t, "key": key, **{k: m[k] for k in ("reward", "p_le", "log_p_le", "kl", "samples")}}
            write_text_atomic(json.dumps(kept, indent=1, sort_keys=True) + "\n", path)
        out.append(kept)
    evaluate_bon(store, sorted(set(_bon_ns(store, up_to, facts).values())), pool, pool_record, pi0, reward,
                 samples_per_prompt, max_new_tokens, Path(prompts).name)
    return out


def evaluate_bon(store: Store, ns: list[int], pool: Path, pool_record: dict, pi0: str, reward: str,
                 samples_per_prompt: int, max_new_tokens: int, prompts_name: str) -> None:
    """Best-of-N sampling of pi_0 for each N in `ns`, measured as the anchors are (same prompts, same
    samples per prompt, same pool); the missing or stale ones from one draw, each kept in `eval/bon=N.json`."""
    key = {"pool": pool_record, "samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens,
           "prompts": prompts_name}
    missing = []
    for N in ns:
        path = bon_file(store.root, N)
        if not path.is_file() or json.loads(path.read_text())["key"] != key:
            missing.append(N)
    if not missing:
        return
    measured = evaluate.evaluate_best_of_ns(pi0, pool, reward, missing, samples_per_prompt, max_new_tokens)
    for N, m in measured.items():
        kept = {"N": N, "key": key, **{k: m[k] for k in (*BON_FIELDS, "samples")}}
        write_text_atomic(json.dumps(kept, indent=1, sort_keys=True) + "\n", bon_file(store.root, N))


def kept_evaluations(store: Store, up_to: int) -> dict[int, dict]:
    """Kept evaluations of anchors 0..up_to measured against the store's current pi_0 pool."""
    meta = store.root / EVAL / evaluate.META_FILE
    if not meta.is_file():
        return {}
    pool_record = json.loads(meta.read_text())
    found = {}
    for t in range(up_to + 1):
        path = evaluation_file(store.root, t)
        if path.is_file():
            kept = json.loads(path.read_text())
            if kept["key"]["pool"] == pool_record:
                found[t] = kept
    return found


def kept_bon(store: Store, N: int, key: dict) -> dict | None:
    """Kept Best-of-N figures for N measured with the anchors' evaluation `key` (pool and settings), or None."""
    path = bon_file(store.root, N)
    if not path.is_file():
        return None
    kept = json.loads(path.read_text())
    same = {k: key[k] for k in ("pool", "samples_per_prompt", "max_new_tokens", "prompts")}
    return kept if kept["key"] == same else None


# ---- what a round report shows -----------------------------------------------------------------
def _trained_rounds(facts: dict) -> list[int]:
    return sorted(t for t in facts["anchors"] if t + 1 in facts["anchors"])


def _dataset(facts: dict, R: int) -> dict | None:
    """The dataset that trained anchor R+1 (its registration names it), card parsed."""
    row = facts["datasets"].get(facts["anchors"][R + 1]["config"].get("dataset_id"))
    return catalog_record(row) if row else None


def evaluation_rows(store: Store, R: int, facts: dict | None = None) -> list[dict]:
    """The table of round R: each evaluated anchor 0..R+1 with N (the product of the n of the rounds
    that led to it), Best-of-N measured for that N (`bon_*`, None where not kept) and the
    continuous-reward analytic law (`analytic_*`)."""
    facts = facts or store.report_facts()
    evals = kept_evaluations(store, R + 1)
    rows = []
    for t, N in _bon_ns(store, R + 1, facts).items():
        if t in evals:
            e, a = evals[t], evaluate.analytic_row(N)
            bon = kept_bon(store, N, e["key"])
            rows.append({"round": t, "N": N, **{k: e[k] for k in BON_FIELDS},
                         **{f"bon_{k}": bon[k] if bon else None for k in BON_FIELDS},
                         "analytic_log_p_le": a["log_p_le"], "analytic_kl": a["kl"], "samples": e["samples"],
                         "analytic": a, "bon": bon})
    return rows


def _metrics(store: Store, R: int, dataset_id: str | None) -> list[dict]:
    path = store.root / "train" / f"round={R}" / str(dataset_id) / "metrics.jsonl"
    if not dataset_id or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def num(x: float | None, digits: int) -> str:
    """x to `digits` decimals, n/a for a figure not measured."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def _table_md(rows: list[dict]) -> str:
    head = ("| anchor | N | reward | BoN reward | p_le | BoN p_le | log p_le | BoN log p_le | KL(pi_t‖pi_0) | BoN KL "
            "| continuous law: log p_le, KL |\n")
    head += "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    return head + "".join(
        f"| {r['round']} | {r['N']} | {r['reward']:.4f} | {num(r['bon_reward'], 4)} | {r['p_le']:.3f} "
        f"| {num(r['bon_p_le'], 3)} | {r['log_p_le']:.3f} | {num(r['bon_log_p_le'], 3)} | {r['kl']:.3f} "
        f"| {num(r['bon_kl'], 3)} | {r['analytic_log_p_le']:.3f}, {r['analytic_kl']:.3f} |\n" for r in rows)


def _kv_md(pairs: list[tuple[str, str]]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in pairs)


def _data_md(facts: dict, R: int, dataset: dict | None, h: str) -> str:
    gen = facts["generation"].get(R, {"candidates": 0, "tokens": 0, "stop": 0, "length": 0})
    tokens = f"{gen['tokens']} ({gen['stop']} ended at end of sequence, {gen['length']} cut at max_new_tokens)"
    pairs = [("candidates", f"{gen['candidates']}"), ("tokens", tokens)]
    for r in (r for r in facts["rewards"] if r["round"] == R):
        rm = r["rm_id"]
        pairs.append((f"rewards `{rm}`", f"mean {r['mean']:.4f}, std {r['std']:.4f}, min {r['min']:.4f}, max {r['max']:.4f}"))
    if dataset:
        c = dataset["card"]
        pairs += [("dataset", f"`{dataset['dataset_id']}`"), ("prompts, k", f"{c['prompts']}, {c['k_min']} to {c['k_max']}"),
                  ("Best-of-n, weighting, target", f"{dataset['n']}, {dataset['weighting']}, {dataset['target']}"),
                  ("tie rate", f"{c['tie_rate']:.3f}"), ("ESS per prompt", f"{c['ess_mean']:.2f} of {c['k_max']}"),
                  ("reward: one sample -> Best-of-n", f"{c['mean_reward']:.4f} -> {c['bon_reward']:.4f}")]
    return f"{h} Data\n\n" + _kv_md(pairs)


def _training_md(config: dict, metrics: list[dict], prefix: str, h: str) -> str:
    text = f"{h} Training\n\n"
    settings = ", ".join(f"{k} {config[k]}" for k in ("beta", "gamma", "eta", "lr", "epochs", "micro_batch_size")
                         if k in config)
    if settings:
        text += f"Settings: {settings}.\n\n"
    if not metrics:
        return text + "No metrics.jsonl for this round (trained elsewhere, or before metrics were kept).\n"
    first, last = metrics[0], metrics[-1]
    pairs = [(term, f"{first[term]:.4f} -> {last[term]:.4f}") for term in ("loss", "forward", "backward", "anchor_kl")
             if term in last]
    pairs.append(("mean log pi/A (last step)", f"{last['log_ratio']:.4f}"))
    text += f"{len(metrics)} optimizer steps; first -> last step:\n\n" + _kv_md(pairs)
    return text + f"\n![training loss]({prefix}training_loss.png)\n"


def _evaluation_md(rows: list[dict], key: dict | None, prefix: str, h: str) -> str:
    text = f"{h} Evaluation\n\n"
    if not rows:
        return text + ("Not evaluated: no held-out prompts configured (`evaluate.prompts` in the `bond rounds` "
                       "config).\n")
    pool = key["pool"]
    text += (f"Each anchor sampled {key['samples_per_prompt']} times per held-out prompt (`{key['prompts']}`), "
             f"against {pool['k']} samples per prompt from pi_0, reward `{pool['reward_spec']}`, up to "
             f"{key['max_new_tokens']} new tokens. `BoN` columns: Best-of-N sampling of pi_0 measured the same way, "
             f"N = the product of the rounds' n, its KL exact (ties included) from the pool's reward law; the last "
             f"column is the analytic law `-1/N`, `log N - (N-1)/N`, which holds for continuous rewards only.\n\n")
    return text + _table_md(rows) + f"\n![quantile and reward vs KL]({prefix}reward_vs_kl.png)\n"


def round_report_markdown(store: Store | str, R: int, prefix: str = "", level: int = 1,
                          facts: dict | None = None) -> str:
    """Round R's report as Markdown (what `report.md` holds, and what a Prefect artifact can show);
    `prefix` goes before the plots' file names, `level` is the title's heading level, `facts` a
    `Store.report_facts()` snapshot to reuse."""
    store = Store(store) if not isinstance(store, Store) else store
    facts = facts or store.report_facts()
    anchors = facts["anchors"]
    if R not in anchors or R + 1 not in anchors:
        raise StoreError(f"round {R} has not been trained (no anchor {R + 1}): nothing to report")
    dataset = _dataset(facts, R)
    rows = evaluation_rows(store, R, facts)
    key = kept_evaluations(store, R + 1)[rows[-1]["round"]]["key"] if rows else None
    metrics = _metrics(store, R, dataset["dataset_id"] if dataset else None)
    h = "#" * (level + 1)
    return "\n".join([
        f"{'#' * level} Round {R}\n",
        f"Anchor {R} `{anchors[R]['anchor_hash'][:12]}` -> anchor {R + 1} `{anchors[R + 1]['anchor_hash'][:12]}`.\n",
        _data_md(facts, R, dataset, h), _training_md(anchors[R + 1]["config"], metrics, prefix, h),
        _evaluation_md(rows, key, prefix, h)])


# ---- files -------------------------------------------------------------------------------------
def round_dir(root: Path, R: int) -> Path:
    return Path(root) / REPORTS / f"round={R}"


def table_csv(rows: list[dict]) -> str:
    """The evaluation table, every number at full precision (repr): equal to the kept evaluations'."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    writer.writerows([[repr(r[c]) if isinstance(r[c], float) else r[c] for c in TABLE_COLUMNS] for r in rows])
    return out.getvalue()


def plot_training_loss(metrics: list[dict], out_png: Path, title: str) -> Path:
    """Loss terms per optimizer step (left) and the mean log pi/A (right: how far the policy moved
    from the anchor on the pool). Written atomically; labels kept inside the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for term in ("loss", "forward", "backward", "anchor_kl"):
        if any(m.get(term) for m in metrics):
            left.plot(steps, [m[term] for m in metrics], label=term)
    right.plot(steps, [m["log_ratio"] for m in metrics], color="tab:purple")
    left.set(xlabel="optimizer step", ylabel="loss term", title=title)
    right.set(xlabel="optimizer step", ylabel=r"mean log $\pi$/A on the pool", title="policy vs anchor")
    left.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return evaluate.save_figure(fig, out_png)


def write_round_report(store: Store, R: int, facts: dict | None = None) -> Path:
    """reports/round=R/: report.md, evaluation.csv and the two plots, each written atomically;
    returns report.md's path. Reads the store only (see the module docstring)."""
    facts = facts or store.report_facts()
    folder = round_dir(store.root, R)
    markdown = round_report_markdown(store, R, facts=facts)
    rows = evaluation_rows(store, R, facts)
    dataset = _dataset(facts, R)
    if rows:
        write_text_atomic(table_csv(rows), folder / "evaluation.csv")
        # the analytic points N = n^t take this round's n (exact when every round used the same n);
        # the measured Best-of-N points are each row's own N
        bon = sorted({r["N"]: {"N": r["N"], **r["bon"]} for r in rows if r["bon"]}.values(), key=lambda b: b["N"])
        evaluate.plot_reward_vs_kl(rows, folder / "reward_vs_kl.png", dataset["n"] if dataset else 1, bon=bon or None)
    metrics = _metrics(store, R, dataset["dataset_id"] if dataset else None)
    if metrics:
        plot_training_loss(metrics, folder / "training_loss.png", f"round {R}: training loss")
    write_text_atomic(markdown, folder / "report.md")
    return folder / "report.md"


HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px}}img{{max-width:100%}}</style></head>
<body>
{body}
</body></html>
"""


def write_index(store: Store, facts: dict | None = None) -> Path:
    """reports/index.md and index.html: every reported round on one page, after the last round's evaluation table."""
    import markdown

    facts = facts or store.report_facts()
    rounds = _trained_rounds(facts)
    if not rounds:
        raise StoreError(f"{store.root}: no trained round yet, nothing to report (run `bond rounds`)")
    last = evaluation_rows(store, rounds[-1], facts)
    text = f"# BOND report: {store.root.name}\n\n{len(rounds)} round(s) trained.\n\n"
    if last:
        text += "Every evaluated anchor against pi_0 (the last round's table):\n\n" + _table_md(last) + "\n"
    text += "\n".join(round_report_markdown(store, R, prefix=f"round={R}/", level=2, facts=facts) for R in rounds)
    folder = store.root / REPORTS
    write_text_atomic(text, folder / "index.md")
    html = markdown.markdown(text, extensions=["tables"])
    write_text_atomic(HTML.format(title=f"BOND report: {store.root.name}", body=html), folder / "index.html")
    return folder / "index.md"


def write_store_report(store: Store) -> Path:
    """Every trained round's report and the index, rebuilt from the store (what `bond report` runs)."""
    if not store.exists():
        raise StoreError(f"no BOND store at {store.root}")
    facts = store.report_facts()
    for R in _trained_rounds(facts):
        write_round_report(store, R, facts)
    return write_index(store, facts)


def report_round(store: Store, R: int, prompts: str | None, reward: str, pool_k: int = 64,
                 samples_per_prompt: int = 8, max_new_tokens: int = 16) -> dict:
    """What `bond rounds` runs after training round R: evaluate anchors 0..R+1 on the held-out
    prompts (kept results reused; skipped when `prompts` is None), then write round R's report and
    the index. Returns the report's path and the new anchor's evaluation (None when skipped)."""
    facts = store.report_facts()  # the catalog only: evaluating writes nothing there
    evals = (evaluate_anchors(store, R + 1, prompts, reward, pool_k, samples_per_prompt, max_new_tokens, facts)
             if prompts else [])
    path = write_round_report(store, R, facts)
    write_index(store, facts)
    return {"round": R, "report": str(path), "evaluation": evals[-1] if evals else None}


def report_summary(result: dict) -> str:
    """The one line a round's report step ends with."""
    e = result["evaluation"]
    if e is None:
        return f"round {result['round']}: report {result['report']} (not evaluated: no held-out prompts configured)"
    return (f"round {result['round']}: anchor {e['round']} on held-out prompts: reward {e['reward']:.4f}, "
            f"p_le {e['p_le']:.3f}, KL to pi_0 {e['kl']:.3f}; report {result['report']}")
