"""Scoring: callables and sequence-classification reward models, non-finite rewards, input order."""

from __future__ import annotations

import pytest

from bond_data import score

from testutil import run_generation, run_scoring


def test_a_nan_reward_names_the_candidate_and_writes_nothing(store):
    run_generation(store, k=3)
    with pytest.raises(score.RewardError, match=r"nan for candidate [0-9a-f]{16}"):
        run_scoring(store, "rewards_for_tests:nan_on_third")
    assert not (store.root / "scores").exists() or not list((store.root / "scores").rglob("*.parquet"))
    assert store.registered_shards("scores") == []


def _save_reward_model(tok, folder):
    """A tiny seeded LlamaForSequenceClassification (one logit) with `tok`, saved to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_sequence_classification_reward_model(store, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(store.anchor(0)["anchor_path"])
    rm_dir = _save_reward_model(tok, tmp_path / "rm")
    run_generation(store, k=2)
    rm_id = run_scoring(store, str(rm_dir))
    rewards = store.query("SELECT reward FROM scores WHERE rm_id = ?", [rm_id]).column("reward").to_pylist()
    assert rm_id == "rm" and len(rewards) == 20 and len(set(rewards)) > 5


def test_length_sorted_scoring_keeps_input_order():
    pairs = [("p", "x" * n) for n in [5, 1, 9, 3, 7, 2]]
    calls = []

    def fn(batch):
        calls.append([len(c) for _, c in batch])
        return [float(len(c)) for _, c in batch]

    assert score.score_pairs(fn, pairs, batch_size=2) == [5, 1, 9, 3, 7, 2]
    assert calls == [[1, 2], [3, 5], [7, 9]]


def test_a_chat_prompt_reaches_the_reward_model_through_its_own_chat_template(store, tmp_path):
    """System and earlier turns included, rendered by the RM tokenizer's template: not the flattened
    "role: content" text the store keeps for callables."""
    import json

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bond_data.prompts import add_prompts
    from testutil import write_jsonl

    chat = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "sort: cab ="},
            {"role": "assistant", "content": " abc"}, {"role": "user", "content": "sort: fed ="}]
    add_prompts(store, write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}]))
    tok = AutoTokenizer.from_pretrained(store.anchor(0)["anchor_path"])
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    tok.model_max_length = 512  # the whole conversation fits: nothing truncated
    rm_dir = _save_reward_model(tok, tmp_path / "chat-rm")
    run_generation(store, k=1)
    rm_id = run_scoring(store, str(rm_dir))
    row = store.query(
        "SELECT s.reward, c.completion FROM scores s JOIN candidates c USING (candidate_id) "
        "JOIN prompts p ON p.prompt_id = s.prompt_id WHERE p.messages IS NOT NULL AND s.rm_id = ?", [rm_id]).to_pylist()[0]
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    rm_tok = AutoTokenizer.from_pretrained(rm_dir)

    def reward(text: str) -> float:
        with torch.inference_mode():
            return float(model(**rm_tok([text], return_tensors="pt")).logits[0, 0])

    templated = rm_tok.apply_chat_template(chat + [{"role": "assistant", "content": row["completion"]}], tokenize=False)
    assert "<system>Be terse." in templated
    assert row["reward"] == pytest.approx(reward(templated), abs=1e-5)
    flattened = "\n".join(f"{m['role']}: {m['content']}" for m in chat)
    old_way = rm_tok.apply_chat_template([{"role": "user", "content": flattened},
                                          {"role": "assistant", "content": row["completion"]}], tokenize=False)
    assert abs(reward(old_way) - row["reward"]) > 1e-4  # the difference the fix makes
    assert json.loads(json.dumps(chat))  # the stored messages are what was added
