"""The fidelity benchmark's figure: E[log p_le] and reward against KL(pi || pi_0), per task.

One row of two panels per task (offline methods, mean ± sd over seeds as error bars), and for the
online comparison a last row (J-BOND and REINFORCE + KL checkpoints along training). Every panel has
Best-of-N measured on the task (sampled, at its exact tie-aware KL); the E[log p_le] panels also
the analytic curve, labelled as the continuous-reward reference. Legends sit below their panel
and the figure is cut to its contents (bbox_inches="tight"), so no label is clipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

X_MAX = 2.5  # KL region drawn; diverged runs are listed in a corner, not drawn


def _bon_curve(agg: list[dict]) -> list[dict]:
    pts = [r for r in agg if r["method"] == "pi_0"] + [r for r in agg if r["method"] == "Best-of-N sampling"]
    return sorted(pts, key=lambda r: r["kl"])


def _reference(ax, agg: list[dict], key: str) -> None:
    bon = _bon_curve(agg)
    ax.plot([r["kl"] for r in bon], [r[key] for r in bon], "s-", color="black", ms=4, zorder=4,
            label="Best-of-N sampling, measured (exact KL, ties)")
    for r in bon:
        ax.annotate(f"N={r['N']}", (r["kl"], r[key]), textcoords="offset points", xytext=(4, -11), fontsize=7)
    if key == "log_p_le":
        n = np.linspace(1, 40, 300)
        ax.plot(np.log(n) - (n - 1) / n, -1 / n, "--", color="grey", lw=1,
                label="Best-of-N analytic (continuous reward only)")


def _finish(ax, title: str, key: str) -> None:
    ax.set(title=title, xlabel="KL(pi || pi_0) (nats)", ylabel={"log_p_le": "E[log p_le]", "reward": "mean reward"}[key])
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=7, ncol=2)


def _offline_panel(ax, task: str, agg: list[dict], key: str) -> None:
    _reference(ax, agg, key)
    groups: dict[str, list[dict]] = {}
    for r in agg:
        if r["method"] not in ("pi_0", "Best-of-N sampling"):
            groups.setdefault(r["method"].split(", M=")[0], []).append(r)
    off = []
    for method, pts in groups.items():
        shown = [r for r in pts if r["kl"] <= X_MAX]
        off += [f"{method} N={r['N']}: KL {r['kl']:.0f}" for r in pts if r not in shown]
        if not shown:
            continue
        ax.errorbar([r["kl"] for r in shown], [r[key] for r in shown], xerr=[r["kl_sd"] for r in shown],
                    yerr=[r[key + "_sd"] for r in shown], fmt="o-" if len(shown) > 1 else "o", ms=4, capsize=2,
                    label=method)
        for r in shown:
            ax.annotate(str(r["N"]), (r["kl"], r[key]), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if off:
        ax.text(0.98, 0.02, "off the plot (diverged):\n" + "\n".join(off), transform=ax.transAxes,
                ha="right", va="bottom", fontsize=7)
    ax.set_xlim(-0.05, X_MAX)
    _finish(ax, f"task {task}: offline (numbers: N), mean ± sd over seeds", key)


def _online_panel(ax, agg: list[dict], online: list[dict], key: str) -> None:
    _reference(ax, agg, key)
    runs: dict[tuple, list[dict]] = {}
    for r in online:
        runs.setdefault((r["method"], r["seed"]), []).append(r)
    for (method, seed), pts in runs.items():
        pts = sorted(pts, key=lambda r: r["step"])
        ax.plot([0.0] + [r["kl"] for r in pts], [_start(agg, key)] + [r[key] for r in pts], ".-", ms=4,
                label=f"{method} (seed {seed})")
    _finish(ax, "task digits: online, checkpoints every 25 steps", key)


def _start(agg: list[dict], key: str) -> float:
    return next(r[key] for r in agg if r["method"] == "pi_0")


def aggregate(rows: list[dict]) -> list[dict]:
    """Rows grouped by (method, N) in first-seen order: mean and sample sd over seeds of each figure."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["N"]), []).append(r)
    out = []
    for (method, n), rs in groups.items():
        agg = {"method": method, "N": n, "seeds": len(rs), "samples": rs[0]["samples"]}
        for key in ("reward", "p_le", "log_p_le", "kl", "ks_beta", "ks_bon"):
            vals = np.array([r[key] for r in rs if key in r and not (key == "ks_bon" and method == "Best-of-N sampling")],
                            dtype=float)  # Best-of-N against its own quantiles: 0 by construction
            if vals.size:
                agg[key] = float(vals.mean())
                agg[key + "_sd"] = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
        out.append(agg)
    return out


def plot(results: dict, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    panels = [(task, res, False) for task, res in results.items()]
    panels += [(task, res, True) for task, res in results.items() if res.get("online")]
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 5.6 * len(panels)), squeeze=False)
    for (task, res, online), row in zip(panels, axes):
        agg = aggregate(res["rows"])
        for ax, key in zip(row, ("log_p_le", "reward")):
            _online_panel(ax, agg, res["online"], key) if online else _offline_panel(ax, task, agg, key)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
