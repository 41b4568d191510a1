"""The training loop on a real store: it learns, registers the next anchor with its lineage,
resumes an interrupted run to the same parameters, and matches itself under torchrun (DDP, gloo)."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from trainer.config import TrainConfig
from trainer import train as train_mod
from trainer.checkpoints import is_complete

from testutil import crashing, torchrun


def cfg(**kw):
    return TrainConfig(**{"micro_batch_size": 8, "grad_accum": 2, "epochs": 2, "lr": 1e-3, "warmup_steps": 2,
                          "checkpoint_every": 2, **kw})


def metrics(store):
    (path,) = (store.root / "train").rglob("metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_training_learns_and_registers_the_next_anchor(round0):
    out = train_mod.train(str(round0.root), cfg(beta=0.5))
    nxt = round0.anchor(1)
    assert out["next_anchor"] == nxt and nxt["anchor_path"].endswith("anchors/round=1")
    assert is_complete(round0.root / "anchors" / "round=1")
    row = round0.query("SELECT parent_round, config FROM rounds WHERE round = 1").to_pylist()[0]
    assert row["parent_round"] == 0 and json.loads(row["config"])["beta"] == 0.5
    log = metrics(round0)
    assert [m["step"] for m in log] == list(range(1, len(log) + 1)) and len(log) == 10  # 80 rows / 16, 2 epochs
    assert abs(log[0]["log_ratio"]) < 1e-3  # the policy starts as the anchor: rho = 1
    assert {"forward", "backward", "anchor_kl", "grad_norm", "tokens_per_s", "lr"} <= set(log[0])
    assert "mfu" not in log[0]  # on the CPU: no bf16 peak to measure against (tests/trainer/test_mfu.py)
    # the run's speed, its first step (warm-up) apart: the later steps' tokens over their seconds
    later = [m["tokens"] / m["tokens_per_s"] for m in log[1:]]
    assert out["tokens_per_s"] == pytest.approx(sum(m["tokens"] for m in log[1:]) / sum(later), rel=1e-6)
    assert out["mfu"] is None
    # each epoch covers the same 80 rows: the second epoch fits the weighted pool better
    epoch = [sum(m["forward"] for m in log[e * 5 : e * 5 + 5]) / 5 for e in (0, 1)]
    assert epoch[1] < epoch[0]
    assert train_mod.train(str(round0.root), cfg(beta=0.5))["skipped"]  # done rounds are skipped


def test_rows_carry_both_weights_and_older_datasets_fall_back(round0, tmp_path):
    """New datasets: forward weight `bon_weight`, backward weight `bon_weight_pool`, log A
    `target_logprob`. Datasets built before those columns: `bon_weight` and `anchor_logprob`."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(round0.anchor(0)["anchor_path"])
    (path,) = (round0.root / "datasets").rglob("part-0.parquet")
    table = pq.read_table(path)
    rows = train_mod._load_rows(path, tokenizer)
    assert [r["weight"] for r in rows] == table.column("bon_weight").to_pylist()
    assert [r["weight_pool"] for r in rows] == table.column("bon_weight_pool").to_pylist()
    assert [r["logp_anchor"] for r in rows] == table.column("target_logprob").to_pylist()
    assert min(r["weight"] for r in rows) == 0 < min(r["weight_pool"] for r in rows)  # unbiased: 0 below rank n
    old = tmp_path / "old.parquet"
    before = table.drop(["bon_weight_pool", "target_logprob"])
    pq.write_table(before.set_column(before.schema.get_field_index("anchor_logprob"), "anchor_logprob",
                                     pa.array([-1.0] * table.num_rows)), old)
    old_rows = train_mod._load_rows(old, tokenizer)
    assert [r["weight_pool"] for r in old_rows] == [r["weight"] for r in old_rows] == table.column("bon_weight").to_pylist()
    assert {r["logp_anchor"] for r in old_rows} == {-1.0}


def test_ema_anchor_lies_between_the_start_and_the_policy(round0):
    train_mod.train(str(round0.root), cfg(eta=0.1))
    final_policy = weights(next((round0.root / "train").rglob("step-10")))
    anchor = weights(round0.root / "anchors" / "round=1")
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(round0.anchor(0)["anchor_path"]).state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    d_anchor = (anchor[name] - init[name]).norm()
    d_policy = (final_policy[name] - init[name]).norm()
    assert 0 < d_anchor < d_policy  # the EMA trails the policy


def test_an_interrupted_run_resumes_to_the_same_parameters(round0, tmp_path, monkeypatch):
    reference = tmp_path / "ref"
    shutil.copytree(round0.root, reference)
    train_mod.train(str(reference), cfg())
    expected = weights(reference / "anchors" / "round=1")

    real_step = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", crashing(real_step, at=5, error=KeyboardInterrupt("simulated crash")))
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(str(round0.root), cfg())
    assert round0.anchor(1) is None  # nothing half-registered
    monkeypatch.setattr(train_mod, "train_step", real_step)
    train_mod.train(str(round0.root), cfg())
    steps = [m["step"] for m in metrics(round0)]
    assert steps == [1, 2, 3, 4] + list(range(5, 11))  # resumed from the step-4 checkpoint
    got = weights(round0.root / "anchors" / "round=1")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(round0, tmp_path):
    two = tmp_path / "two"
    shutil.copytree(round0.root, two)
    train_mod.train(str(round0.root), cfg(grad_accum=2))  # one process, 2 micro-batches per step
    torchrun(2, two, ["--micro-batch-size", "8", "--grad-accum", "1", "--epochs", "2", "--lr", "1e-3",
                      "--warmup-steps", "2", "--checkpoint-every", "2"], port=29533)
    one_w, two_w = weights(round0.root / "anchors" / "round=1"), weights(two / "anchors" / "round=1")
    for k in one_w:
        torch.testing.assert_close(two_w[k], one_w[k], rtol=0, atol=2e-5)
