"""Round reports under a real Prefect server: `bond rounds` run one round, then one more, off a
terminal. The second run prints a short log (progress lines, one summary line per stage); every
round leaves reports/round=R/ whose table holds the kept evaluations, which equal a fresh
evaluation; `bond report` rewrites the same bytes from the store; bad input is one error line."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from testutil import REWARD, tree_digest, write_jsonl

from bond_data.files import folder_sha256
from bond_data.prompts import add_prompts
from bond_data.store import Store
from flows.cli import main
from trainer import evaluate, report

WORDS = ["dbca", "zyx", "hello", "qwerty", "mno", "pqrs", "abc", "edcba", "kite", "lamp"]
EVAL = {"pool_k": 8, "samples_per_prompt": 2, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, untrained_model, prefect_server):
    """A store after `bond rounds --num 1` and then `--num 2` (the CLI, in subprocesses, output
    captured as a pipe); yields the store, the held-out prompts and the second run's output."""
    root = tmp_path_factory.mktemp("reports")
    store = Store(root / "reports-store")  # its own artifact keys: they are named after the folder
    store.register_anchor(0, str(untrained_model), folder_sha256(untrained_model))
    add_prompts(store, write_jsonl(root / "prompts.jsonl", [{"prompt": f"sort: {w} ="} for w in WORDS]))
    held_out = write_jsonl(root / "held_out.jsonl", [{"prompt": f"sort: {w} ="} for w in ("cab", "fed", "jig")])
    config = root / "rounds.yaml"
    config.write_text(json.dumps({
        "generate": {"k": 4, "max_new_tokens": 6, "shard_prompts": 4}, "score": {"rm": REWARD},
        "train": {"micro_batch_size": 8, "epochs": 1, "lr": 1e-3}, "evaluate": {"prompts": str(held_out), **EVAL}}))
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    env.pop("BOND_PROGRESS_SECONDS", None)

    def rounds(num: int) -> str:
        cmd = [sys.executable, "-m", "flows.cli", "rounds", "--store", str(store.root), "--num", str(num), "--n", "2",
               "--config", str(config)]
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stdout
        return done.stdout

    rounds(1)
    return store, held_out, rounds(2)


@pytest.mark.slow
def test_one_more_round_prints_a_short_log_with_a_line_per_stage(two_rounds):
    _, _, out = two_rounds
    lines = out.splitlines()
    assert len(lines) <= 25, out
    starts = ["round 0: done", "round 1: generated 3 shard(s), 40 candidates (k = 4)", "round 1: scored 3 shard(s)",
              "round 1: dataset n2-", "round 1: trained", "round 1: anchor 2 on held-out prompts"]
    for start in starts:
        assert sum(line.startswith(start) for line in lines) == 1, (start, out)
    assert not any("Traceback" in line or "Finished in state" in line for line in lines)


@pytest.mark.slow
def test_every_round_reports_and_the_table_is_the_evaluation(two_rounds):
    store = two_rounds[0]
    for R in (0, 1):
        folder = store.root / "reports" / f"round={R}"
        assert {p.name for p in folder.iterdir()} == {"report.md", "evaluation.csv", "reward_vs_kl.png",
                                                       "training_loss.png"}
        table = list(csv.DictReader((folder / "evaluation.csv").open()))
        assert [int(r["round"]) for r in table] == list(range(R + 2)) and [int(r["N"]) for r in table] == [1, 2, 4][:R + 2]
        for row in table:
            kept = json.loads((store.root / "eval" / f"anchor={row['round']}.json").read_text())
            assert {k: float(row[k]) for k in ("reward", "p_le", "log_p_le", "kl")} == \
                   {k: kept[k] for k in ("reward", "p_le", "log_p_le", "kl")}
            bon = json.loads((store.root / "eval" / f"bon={row['N']}.json").read_text())
            assert {k: float(row[f"bon_{k}"]) for k in ("reward", "p_le", "log_p_le", "kl")} == \
                   {k: bon[k] for k in ("reward", "p_le", "log_p_le", "kl")}
            pool = evaluate.read_pool(store.root / "eval" / "eval_pool.parquet")
            assert bon["kl"] == pytest.approx(evaluate.bon_kl_on_pool(pool, int(row["N"])))
            assert float(row["analytic_kl"]) == evaluate.analytic_row(int(row["N"]))["kl"]
        md = (folder / "report.md").read_text()
        assert md == report.round_report_markdown(store, R) and f"| {R + 1} | {2 ** (R + 1)} | " in md
    # the kept numbers are the evaluation's: a fresh one of anchor 2 gives the same (the same samples,
    # so reward and quantiles exactly; KL's forward pass of pi_0 ran in another process: float noise)
    pool = store.root / "eval" / "eval_pool.parquet"
    fresh = evaluate.evaluate_policy(store.anchor(2)["anchor_path"], store.anchor(0)["anchor_path"], pool, REWARD,
                                     EVAL["samples_per_prompt"], EVAL["max_new_tokens"])
    kept = json.loads((store.root / "eval" / "anchor=2.json").read_text())
    assert {k: fresh[k] for k in ("reward", "p_le", "log_p_le", "kl", "samples")} == pytest.approx(
        {k: kept[k] for k in ("reward", "p_le", "log_p_le", "kl", "samples")}, rel=1e-5, abs=1e-9)


@pytest.mark.slow
def test_index_links_every_round_and_its_plots(two_rounds):
    store = two_rounds[0]
    index = (store.root / "reports" / "index.md").read_text()
    links = re.findall(r"\]\(([^)]+\.png)\)", index)
    assert sorted(links) == sorted(f"round={R}/{p}" for R in (0, 1) for p in ("training_loss.png", "reward_vs_kl.png"))
    assert all((store.root / "reports" / link).is_file() for link in links)
    html = (store.root / "reports" / "index.html").read_text()
    assert "<table>" in html and 'src="round=1/reward_vs_kl.png"' in html


@pytest.mark.slow
def test_kept_evaluations_are_reused_and_redone_when_settings_change(two_rounds, monkeypatch):
    store, held_out, _ = two_rounds
    kept = [json.loads((store.root / "eval" / f"anchor={t}.json").read_text()) for t in range(3)]

    def refuse(*args, **kwargs):
        raise AssertionError("re-evaluated a kept anchor")

    monkeypatch.setattr(evaluate, "evaluate_policy", refuse)
    assert report.evaluate_anchors(store, 2, str(held_out), REWARD, **EVAL) == kept
    with pytest.raises(AssertionError, match="re-evaluated"):
        report.evaluate_anchors(store, 2, str(held_out), REWARD, **{**EVAL, "samples_per_prompt": 3})


@pytest.mark.slow
def test_bond_report_rewrites_the_same_bytes(two_rounds, capsys):
    store = two_rounds[0]
    reports = store.root / "reports"
    before = tree_digest(reports)
    shutil.rmtree(reports)
    assert main(["report", "--store", str(store.root)]) == 0
    assert "index.md" in capsys.readouterr().out
    assert tree_digest(reports) == before


def test_bond_report_bad_input_is_one_error_line(tmp_path, store, capsys):
    assert main(["report", "--store", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: no BOND store at")
    before = tree_digest(store.root)
    assert main(["report", "--store", str(store.root)]) == 2  # an anchor, no trained round
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no trained round yet" in err[0]
    assert tree_digest(store.root) == before and not (tmp_path / "nothing").exists()
