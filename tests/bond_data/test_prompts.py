"""Prompts in: formats, validation errors that name file/line/field, duplicates folded, nothing
written on bad input, chat prompts rendered with the tokenizer's chat template."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bond_data.prompts import PromptError, add_prompts, read_prompts
from bond_data.schema import prompt_id
from bond_data.store import Store

from testutil import tree_digest, write_jsonl


def test_jsonl_parquet_and_datasets_folder(tmp_path):
    import datasets

    records = [{"prompt": "sort: ab ="}, {"messages": [{"role": "user", "content": "sort: cb ="}]}]
    j = write_jsonl(tmp_path / "p.jsonl", records)
    pq.write_table(pa.Table.from_pylist([{"prompt": "sort: ab ="}, {"prompt": "sort: zz ="}]), tmp_path / "p.parquet")
    datasets.Dataset.from_list([{"prompt": "sort: q ="}]).save_to_disk(str(tmp_path / "ds"))
    assert read_prompts(j).column("messages").to_pylist()[1] == json.dumps([{"role": "user", "content": "sort: cb ="}])
    assert read_prompts(tmp_path / "p.parquet").num_rows == 2
    assert read_prompts(tmp_path / "ds").column("prompt").to_pylist() == ["sort: q ="]


def test_duplicates_fold_by_content_within_a_file_and_across_adds(tmp_path):
    st = Store(tmp_path / "s")
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}, {"prompt": "y"}, {"prompt": "x"}])
    assert add_prompts(st, f) == {"read": 2, "added": 2, "duplicates": 0}
    g = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "y"}, {"prompt": "z"}])
    assert add_prompts(st, g) == {"read": 2, "added": 1, "duplicates": 1}
    assert st.query("SELECT count(*) c, count(DISTINCT prompt_id) d FROM prompts").to_pylist() == [{"c": 3, "d": 3}]
    assert prompt_id("x", None) != prompt_id(None, [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "ok"}\n{"prompt": }\n', r"p.jsonl:2: invalid JSON"),
    ('{"prompt": "ok"}\n\n{"text": "no prompt"}\n', r"p.jsonl:3: exactly one of the fields 'prompt' or 'messages'"),
    ('{"prompt": 42}\n', r"p.jsonl:1: field 'prompt' must be a non-empty string"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}\n',
     r"p.jsonl:1: field 'messages\[1\]'"),
    ('{"prompt": "a", "messages": []}\n', r"exactly one of"),
    ('[1, 2]\n', r"p.jsonl:1: expected an object"),
])
def test_bad_input_names_file_line_and_field_and_writes_nothing(tmp_path, line, message):
    st = Store(tmp_path / "s")
    add_prompts(st, write_jsonl(tmp_path / "good.jsonl", [{"prompt": "kept"}]))
    before = tree_digest(st.root)
    bad = tmp_path / "p.jsonl"
    bad.write_text(line)
    with pytest.raises(PromptError, match=message):
        add_prompts(st, bad)
    assert tree_digest(st.root) == before
    assert len(list((st.root / "prompts").glob("*.parquet"))) == 1


def test_unsupported_and_missing_inputs(tmp_path):
    (tmp_path / "p.csv").write_text("prompt\nx\n")
    with pytest.raises(PromptError, match="unsupported input"):
        read_prompts(tmp_path / "p.csv")
    with pytest.raises(PromptError, match="no such file"):
        read_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PromptError, match="no prompts"):
        read_prompts(tmp_path / "empty.jsonl")
