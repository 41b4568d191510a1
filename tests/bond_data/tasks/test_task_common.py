"""What the built-in tasks share: tokenizer, tiny model, cache folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bond_data.tasks import common, digits, tiny


def test_tokenizer_round_trips_text_and_sets_special_tokens():
    tok = common.build_tokenizer()
    for text in ["sort: dbca = abcd", "  spaces  and\nnewlines\t", "héllo wörld ✓ 🙂", ""]:
        assert tok.decode(tok(text)["input_ids"]) == text
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    assert None not in ids and len(ids) == 3
    assert tok.decode(tok("abc")["input_ids"] + [tok.eos_token_id], skip_special_tokens=True) == "abc"


def test_chat_template_renders_the_plain_prompt():
    tok = common.build_tokenizer()
    messages = [{"role": "user", "content": "sort: dbca ="}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "sort: dbca ="
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": " abcd"}], tokenize=False)
    assert full == "sort: dbca = abcd" + tok.eos_token


def test_save_untrained_model_loads_offline_and_generates(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401 (warm import)

    start = time.perf_counter()
    out = common.save_untrained_model(tmp_path / "m")
    assert time.perf_counter() - start < 2.0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "sort: cba ="}],
                                   add_generation_prompt=True, tokenize=False)
    enc = tok([text, "sort: gfedcba ="], return_tensors="pt", padding=True)
    with torch.no_grad():
        gen = model.generate(**enc, do_sample=True, max_new_tokens=5)
    assert gen.shape[0] == 2 and gen.shape[1] <= enc["input_ids"].shape[1] + 5


def test_build_model_is_seeded():
    import torch

    tok = common.build_tokenizer()
    a, b, c = common.build_model(tok, seed=0), common.build_model(tok, seed=0), common.build_model(tok, seed=1)
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert common.build_model(tok, hidden_size=32, num_attention_heads=2).config.hidden_size == 32


def test_default_cache_dir_honours_bond_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BOND_CACHE", str(tmp_path))
    assert common.default_cache_dir() == tmp_path
    monkeypatch.delenv("BOND_CACHE")
    assert common.default_cache_dir() == Path.home() / ".cache" / "bond"


@pytest.mark.parametrize("task, ensure, name", [(tiny, tiny.ensure_tiny_task, "tiny-task"),
                                                (digits, digits.ensure_digits_task, "digits-task")])
def test_a_crashed_build_leaves_nothing_a_later_run_trusts(task, ensure, name, tmp_path, monkeypatch):
    def crash(folder: Path, seed: int, quiet: bool) -> None:
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    def fake_build(folder: Path, seed: int, quiet: bool) -> None:
        common.save_untrained_model(folder / "model", seed)
        (folder / task.MARKER).write_text(json.dumps({"fake": True}))

    monkeypatch.setattr(task, "_build_into", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure(tmp_path, quiet=True)
    assert list(tmp_path.iterdir()) == []

    (tmp_path / f"{name}-{task.TASK_VERSION}").mkdir()  # a stray folder without the marker
    monkeypatch.setattr(task, "_build_into", fake_build)
    built = ensure(tmp_path, quiet=True)
    assert (built.model_dir.parent / task.MARKER).is_file()
