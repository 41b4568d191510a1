"""Special tokens per Hugging Face family: the prompt ids the backend samples after (and the trainer
scores after) are the ones the family's own tooling gives, with BOS once or not at all, and a
completion ends at any of the family's end tokens."""

from __future__ import annotations

import pytest

from bond_data.backends.base import PromptJob, Sampling
from bond_data.backends.hf import TransformersBackend, prompt_token_ids, stop_token_ids
from bond_data.score import reward_model_inputs
from bond_data.tasks.families import FAMILIES, save_family_model

MESSAGES = [{"role": "user", "content": "sort: cab ="}]
# (BOS count in a chat prompt, in a plain prompt): the template decides for chat, the tokenizer for text
BOS_COUNT = {"llama": (1, 1), "qwen2": (0, 0), "qwen3": (0, 0), "gemma2": (1, 1), "gemma3": (1, 1), "phi3": (0, 1)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: save_family_model(name, root / name) for name in [*FAMILIES, "mistral"]}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_prompt_ids_match_the_family_tooling_with_bos_once(family, folders):
    backend = TransformersBackend.from_pretrained(str(folders[family]), batch_size=8)
    tok = backend.tokenizer
    chat = backend.render(PromptJob("c", "", MESSAGES, [0], [1]))
    assert chat == tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    plain = prompt_token_ids(tok, "sort: cab =", None)
    bos = tok.bos_token_id
    assert (chat.count(bos), plain.count(bos)) == BOS_COUNT[family]  # never twice (template + tokenizer)
    if BOS_COUNT[family][0]:
        assert chat[0] == bos


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_completions_stop_at_every_end_token(family, folders):
    backend = TransformersBackend.from_pretrained(str(folders[family]), batch_size=64)
    spec, tok = FAMILIES[family], backend.tokenizer
    stops = [tok.convert_tokens_to_ids(t) for t in spec.stop]
    assert set(backend.stop_ids) == {tok.eos_token_id, *stops} and backend.stop_ids[0] == tok.eos_token_id
    jobs = [PromptJob(str(j), "", [{"role": "user", "content": f"sort: {w} ="}], list(range(8)),
                      [1000 * j + s for s in range(8)]) for j, w in enumerate(["cab", "zyx", "kite", "lamp"])]
    rows = [c for cs in backend.generate(jobs, Sampling(max_new_tokens=24)) for c in cs]
    stopped = [c for c in rows if c.finish_reason == "stop"]
    assert stopped, "no row drew an end token: make the test draw more"
    for c in rows:
        assert not any(t in backend.stop_ids for t in c.token_ids[:-1])  # cut at the first end token
        assert (c.token_ids[-1] in backend.stop_ids) == (c.finish_reason == "stop")
        assert c.finish_reason == "stop" or len(c.token_ids) == 24
        assert c.text == tok.decode(c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids,
                                    skip_special_tokens=True)


def test_family_stop_ids_without_a_generation_config_list(folders):
    """A checkpoint whose generation config names one EOS (or none) stops at the tokenizer's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(str(folders["qwen2"]))
    tok = AutoTokenizer.from_pretrained(str(folders["qwen2"]))
    model.generation_config = GenerationConfig()
    assert stop_token_ids(model, tok) == [tok.eos_token_id]
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id)
    assert stop_token_ids(model, tok) == [tok.eos_token_id]


def test_family_reward_model_sees_one_bos(folders):
    """The Mistral-style RM's template writes BOS and its tokenizer adds one to plain text: the
    scored ids hold it once, at the start."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folders["mistral"]))
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = reward_model_inputs(tok, [(MESSAGES, "abc"), ("plain prompt", "a longer completion")])
    for ids, mask in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist()):
        real = [t for t, m in zip(ids, mask) if m]
        assert real.count(tok.bos_token_id) == 1 and real[0] == tok.bos_token_id
        assert real[-1] == tok.eos_token_id  # the template closes the reply
