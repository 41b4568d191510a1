"""The trainer reads a chat prompt's `messages` as datasets now hold them (a list of {role, content})
and as older datasets did (JSON text), rendering both with the tokenizer's chat template."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer

from bond_data import schema
from bond_data.backends.hf import prompt_token_ids
from trainer import train as train_mod

CHAT = [{"role": "system", "content": "sort letters"}, {"role": "user", "content": "kite"}]


def rows_file(path, messages_type, messages) -> str:
    n = len(messages)
    pq.write_table(pa.table({
        "prompt": ["system: sort letters\nuser: kite"] * n, "messages": pa.array(messages, messages_type),
        "token_ids": pa.array([[5, 6, 2]] * n, pa.list_(pa.int32())), "bon_weight": [1.0] * n,
        "bon_weight_pool": [1.0] * n, "target_logprob": [-1.0] * n}), path)
    return path


def test_messages_as_structs_and_as_json_text_give_the_chat_template(untrained_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(untrained_model)
    chat_ids = prompt_token_ids(tok, "ignored", CHAT)
    plain_ids = prompt_token_ids(tok, "system: sort letters\nuser: kite", None)
    assert chat_ids != plain_ids  # the template matters, so the test can tell the two apart
    new = train_mod._load_rows(rows_file(tmp_path / "new.parquet", schema.MESSAGES, [CHAT, None]), tok)
    old = train_mod._load_rows(rows_file(tmp_path / "old.parquet", pa.string(), [json.dumps(CHAT), None]), tok)
    for rows in (new, old):
        assert [r["prompt"] for r in rows] == [chat_ids, plain_ids]
        assert rows[0]["completion"] == [5, 6, 2]
