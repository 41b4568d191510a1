"""A whole round on tiny random models of real Hugging Face families (bond_data/tasks/families.py):
generate, score with a reward model of another family (Mistral), build, train, register, generate
again. Per family, the trainer scores exactly the ids that were generated, after exactly the
prompt ids the family's chat template gives: its log A(y) equals the one generation recorded."""

from __future__ import annotations

import json

import pytest
import torch

from bond_data import build
from bond_data.backends.base import PromptJob
from bond_data.backends.hf import TransformersBackend, stop_token_ids
from bond_data.files import folder_sha256
from bond_data.prompts import add_prompts
from bond_data.store import Store
from bond_data.tasks.families import FAMILIES, save_family_model
from testutil import run_generation, run_scoring, write_jsonl
from trainer import train as train_mod
from trainer.checkpoints import load_policy
from trainer.config import TrainConfig
from bond_data.logprobs import completion_logprobs

WORDS = ["cab", "zyx", "kite", "lamp", "dbca", "mno"]
LORA = {"gemma2": "r=4,alpha=8,targets=q_proj,v_proj", "phi3": "r=4,alpha=8,targets=qkv_proj"}  # phi3 fuses q, k, v


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    return save_family_model("mistral", tmp_path_factory.mktemp("rm") / "mistral")


def family_store(tmp_path, family: str) -> Store:
    anchor = save_family_model(family, tmp_path / family)
    store = Store(tmp_path / "store")
    store.register_anchor(0, str(anchor), folder_sha256(anchor))
    chat = [{"messages": [{"role": "user", "content": f"sort: {w} ="}]} for w in WORDS]
    add_prompts(store, write_jsonl(tmp_path / "chat.jsonl", chat))
    add_prompts(store, write_jsonl(tmp_path / "plain.jsonl", [{"prompt": f"reverse: {w} ="} for w in WORDS[:2]]))
    return store


def assert_trainer_scores_the_generated_ids(store: Store, dataset_path: str):
    """Rows as the trainer loads them: prompt ids = the backend's rendering, completion ids = the
    generated ids, and log pi(y|x) under the anchor = the anchor_logprob generation stored."""
    anchor = store.anchor(0)["anchor_path"]
    model, tokenizer = load_policy(anchor, "cpu")
    model.eval()
    backend = TransformersBackend.from_pretrained(anchor, device="cpu")
    rows = train_mod._load_rows(store.root / dataset_path, tokenizer)
    table = store.query("SELECT d.prompt, d.messages, d.token_ids, c.anchor_logprob FROM read_parquet($p) d "
                        "JOIN candidates c USING (candidate_id)", {"p": str(store.root / dataset_path)}).to_pylist()
    assert len(rows) == len(table) == 8 * 4
    for row, rec in zip(rows, table):
        messages = json.loads(rec["messages"]) if isinstance(rec["messages"], str) else rec["messages"] or None
        assert row["prompt"] == backend.render(PromptJob("x", rec["prompt"], messages, [0], [0]))
        assert row["completion"] == rec["token_ids"]
    with torch.no_grad():
        logp = completion_logprobs(model, rows, torch.device("cpu"))
    expected = torch.tensor([rec["anchor_logprob"] for rec in table], dtype=logp.dtype)
    torch.testing.assert_close(logp, expected, rtol=0, atol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_whole_round(family, reward_model, tmp_path):
    store = family_store(tmp_path, family)
    run_generation(store, k=4, max_new_tokens=10)
    run_scoring(store, spec=str(reward_model), rm_id="mistral-rm")
    dataset = build.build_dataset(store, 0, n=2)
    path = store.query("SELECT path FROM datasets WHERE round = 0").to_pylist()[0]["path"]
    assert_trainer_scores_the_generated_ids(store, path)

    cfg = TrainConfig(micro_batch_size=8, grad_accum=1, epochs=1, lr=1e-3, warmup_steps=1, checkpoint_every=100,
                      lora=LORA.get(family), device="cpu")
    out = train_mod.train(str(store.root), cfg)
    assert out["steps"] == 4 and not out["skipped"]
    old, new = store.anchor(0), store.anchor(1)
    assert new["anchor_hash"] != old["anchor_hash"]
    model, tokenizer = load_policy(new["anchor_path"], "cpu")  # a plain model (LoRA merged), family class kept
    assert type(model).__name__ == FAMILIES[family].model_class
    old_model, old_tok = load_policy(old["anchor_path"], "cpu")
    assert stop_token_ids(model, tokenizer) == stop_token_ids(old_model, old_tok)  # end tokens survive training
    assert tokenizer.chat_template == old_tok.chat_template and tokenizer.bos_token == old_tok.bos_token

    assert run_generation(store, k=2, round_=1, max_new_tokens=6) > 0  # round 1 samples from the new anchor
    hashes = store.query("SELECT DISTINCT anchor_hash FROM candidates WHERE round = 1").to_pylist()
    assert hashes == [{"anchor_hash": new["anchor_hash"]}] and dataset["dataset_id"]
