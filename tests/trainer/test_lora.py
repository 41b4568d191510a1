"""LoRA training (trainer/lora.py): only the adapters learn, the EMA anchor is the naive EMA of the
adapters, an interrupted run resumes to the same anchor, and the merged next anchor is a plain
model that the next round generates from."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from bond_data import build
from bond_data.files import folder_sha256
from trainer import lora
from trainer import train as train_mod
from trainer.checkpoints import load_policy
from trainer.config import TrainConfig
from testutil import crashing, run_generation, run_scoring, torchrun

SPEC = "r=4,alpha=8,targets=q_proj,v_proj"


@pytest.fixture(scope="module")
def round0_built(tmp_path_factory, untrained_model):
    """Round 0 generated, scored and built once for this module (each test trains on a copy)."""
    from bond_data.prompts import add_prompts
    from bond_data.store import Store
    from testutil import write_jsonl

    root = tmp_path_factory.mktemp("lora")
    store = Store(root / "store")
    store.register_anchor(0, str(untrained_model), folder_sha256(untrained_model))
    words = ["dbca", "zyx", "hello", "qwerty", "mno", "pqrs", "abc", "edcba", "kite", "lamp"]
    add_prompts(store, write_jsonl(root / "prompts.jsonl", [{"prompt": f"sort: {w} ="} for w in words]))
    run_generation(store, k=8, max_new_tokens=6)
    run_scoring(store)
    build.build_dataset(store, 0, n=4)
    return store.root


@pytest.fixture
def round0(round0_built, tmp_path):
    from bond_data.store import Store

    shutil.copytree(round0_built, tmp_path / "store")
    return Store(tmp_path / "store")


def cfg(**kw):
    return TrainConfig(**{"micro_batch_size": 8, "grad_accum": 2, "epochs": 2, "lr": 1e-2, "warmup_steps": 2,
                          "checkpoint_every": 2, "lora": SPEC, **kw})


def anchor_weights(store, round_):
    return load_file(str(store.anchor(round_)["anchor_path"] + "/model.safetensors"))


def test_lora_spec_is_parsed_and_bad_specs_are_refused():
    assert lora.parse_lora("r=16,alpha=32,targets=q_proj,v_proj") == lora.LoraSpec(16, 32.0, ("q_proj", "v_proj"))
    assert lora.parse_lora("targets=o_proj, r=2, dropout=0.1") == lora.LoraSpec(2, 2.0, ("o_proj",), 0.1)
    for bad, why in [("r=4", "required"), ("r=x,targets=q", "integer"), ("r=4,targets=q,foo=1", "unknown"),
                     ("q_proj", "key=value"), ("r=0,targets=q", "r >= 1"), ("r=4,r=5,targets=q", "twice"),
                     ("r=4,targets=q;rm -rf", "module names")]:
        with pytest.raises(ValueError, match=why):
            lora.parse_lora(bad)
    with pytest.raises(ValueError, match="field 'lora'"):
        TrainConfig.validate_as({"lora": "r=4"}, "flags")


def test_lora_only_adapter_params_get_gradients(round0):
    anchor = round0.anchor(0)["anchor_path"]
    policy, tokenizer = lora.load_lora_policy(anchor, None, lora.parse_lora(SPEC), 0, torch.device("cpu"))
    (path,) = (round0.root / "datasets").rglob("part-0.parquet")
    rows = train_mod._load_rows(path, tokenizer)[:8]
    train_mod.train_step(policy, [rows], 0.5, 0.1, 8, 1, torch.device("cpu"))
    grads = {n for n, p in policy.named_parameters() if p.grad is not None}
    assert grads == set(lora.adapter_state(policy)) and len(grads) == 2 * 2 * 2  # (A, B) x (q, v) x 2 layers
    assert all(".lora_A." in n or ".lora_B." in n for n in grads)
    assert any(float(policy.get_parameter(n).grad.abs().max()) > 0 for n in grads if ".lora_B." in n)
    assert all(not p.requires_grad for n, p in policy.named_parameters() if "lora_" not in n)


def test_lora_training_learns_and_registers_a_merged_anchor(round0):
    train_mod.train(str(round0.root), cfg(beta=0.5))
    log = [json.loads(line) for line in next((round0.root / "train").rglob("metrics.jsonl")).read_text().splitlines()]
    epoch = [sum(m["forward"] for m in log[e * 5 : e * 5 + 5]) / 5 for e in (0, 1)]
    assert len(log) == 10 and epoch[1] < epoch[0]  # the weighted NLL falls
    folder = round0.root / "anchors" / "round=1"
    assert round0.anchor(1)["anchor_hash"] == folder_sha256(folder) != round0.anchor(0)["anchor_hash"]
    assert json.loads(round0.query("SELECT config FROM rounds WHERE round = 1").to_pylist()[0]["config"])["lora"] == SPEC
    assert not (folder / lora.ADAPTER_FILE).exists()  # a merged, plain model
    base, merged = anchor_weights(round0, 0), anchor_weights(round0, 1)
    assert set(merged) == set(base)  # same tensors, no adapter keys
    for name in base:
        changed = not torch.equal(base[name], merged[name])
        assert changed == (name.endswith(("q_proj.weight", "v_proj.weight"))), name  # only target modules move
    # the next round samples from the merged anchor with the unchanged backend
    assert run_generation(round0, k=2, round_=1, max_new_tokens=4) > 0
    rows = round0.query("SELECT DISTINCT anchor_hash FROM candidates WHERE round = 1").to_pylist()
    assert rows == [{"anchor_hash": round0.anchor(1)["anchor_hash"]}]
    run_scoring(round0, round_=1)  # and the round's scoring and build take its pool as any other
    assert build.build_dataset(round0, 1, n=2)["dataset_id"]


def test_lora_ema_of_adapters_equals_the_naive_ema(round0, monkeypatch):
    eta, seen = 0.3, []
    real_update = train_mod.ema_update

    def recording_update(ema, policy_state, eta_):
        seen.append({k: v.detach().clone() for k, v in policy_state.items()})  # the adapters after each step
        real_update(ema, policy_state, eta_)

    monkeypatch.setattr(train_mod, "ema_update", recording_update)
    train_mod.train(str(round0.root), cfg(eta=eta, epochs=1))
    assert len(seen) == 5
    base_model, _ = load_policy(round0.anchor(0)["anchor_path"], "cpu")
    start = lora.add_adapters(base_model, lora.parse_lora(SPEC), seed=0)  # the trainer's seeded init
    naive = {k: v.detach().clone() for k, v in lora.adapter_state(start).items()}
    for step in seen:  # theta_a <- (1 - eta) theta_a + eta theta, one tensor at a time, in float64
        naive = {k: (1 - eta) * naive[k].double() + eta * step[k].double() for k in naive}
    base, merged = anchor_weights(round0, 0), anchor_weights(round0, 1)
    scale = 8 / 4  # alpha / r
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            a, b = naive[f"{prefix}.lora_A.default.weight"], naive[f"{prefix}.lora_B.default.weight"]
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            expected = base[name].double() + scale * b @ a
            torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=1e-6)
    assert not torch.equal(merged[name], base[name])


@pytest.mark.slow
def test_lora_an_interrupted_run_resumes_to_the_same_anchor(round0, tmp_path, monkeypatch):
    reference = tmp_path / "ref"
    shutil.copytree(round0.root, reference)
    train_mod.train(str(reference), cfg(eta=0.2, epochs=1))
    expected = load_file(str(reference / "anchors" / "round=1" / "model.safetensors"))

    real_step = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", crashing(real_step, at=4, error=KeyboardInterrupt("simulated crash")))
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(str(round0.root), cfg(eta=0.2, epochs=1))
    (step2,) = (round0.root / "train").rglob("step-2")  # the last checkpoint before the crash
    assert (step2 / lora.ADAPTER_FILE).is_file() and not (step2 / "model.safetensors").exists()  # adapters only
    with pytest.raises(ValueError, match="LoRA checkpoint"):
        train_mod.train(str(round0.root), cfg(eta=0.2, epochs=1, lora=None))  # a full-model run refuses it
    monkeypatch.setattr(train_mod, "train_step", real_step)
    train_mod.train(str(round0.root), cfg(eta=0.2, epochs=1))
    log = [json.loads(line) for line in next((round0.root / "train").rglob("metrics.jsonl")).read_text().splitlines()]
    assert [m["step"] for m in log] == [1, 2, 3, 4, 5]  # steps 3.. redone from the step-2 checkpoint
    got = anchor_weights(round0, 1)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_lora_torchrun_two_processes_match_one_process(round0, tmp_path):
    """DDP over a peft model: the frozen base is not synchronised, the adapters' gradients are."""
    two = tmp_path / "two"
    shutil.copytree(round0.root, two)
    train_mod.train(str(round0.root), cfg(grad_accum=2, epochs=1))  # one process, 2 micro-batches per step
    torchrun(2, two, ["--micro-batch-size", "8", "--grad-accum", "1", "--epochs", "1", "--lr", "1e-2",
                      "--warmup-steps", "2", "--checkpoint-every", "2", "--lora", SPEC], port=29541)
    one_w = anchor_weights(round0, 1)
    two_w = load_file(str(two / "anchors" / "round=1" / "model.safetensors"))
    for k in one_w:
        torch.testing.assert_close(two_w[k], one_w[k], rtol=0, atol=2e-5)
