"""vLLM conversion code with stand-in output objects (vLLM itself needs a CUDA GPU), and the real
backend end to end where a GPU and vllm are present (marker `gpu`)."""

import importlib.util
import math
import sys
from types import SimpleNamespace as NS

import pytest

from bond_data.backends.base import PromptJob, Sampling
from bond_data.backends.vllm import to_completions
from bond_data.generate import candidate_table


def fake_output(request_id, samples):
    """Shaped like vllm.RequestOutput: outputs with index, text, token_ids, logprobs, finish_reason."""
    outputs = []
    for index, (text, ids, lps, reason) in enumerate(samples):
        steps = [{t: NS(logprob=lp, rank=1), t + 1: NS(logprob=-9.0, rank=2)} for t, lp in zip(ids, lps)]
        outputs.append(NS(index=index, text=text, token_ids=ids, logprobs=steps,
                          cumulative_logprob=sum(lps), finish_reason=reason))
    return NS(request_id=request_id, outputs=list(reversed(outputs)))  # order must not matter


def test_request_output_becomes_candidates_in_sample_order():
    out = fake_output("r0", [(" abc", [5, 6, 2], [-0.5, -0.25, -0.125], "stop"),
                             (" xy", [7, 8], [-1.0, -2.0], "length")])
    comps = to_completions(out)
    assert [c.text for c in comps] == [" abc", " xy"]
    assert [c.finish_reason for c in comps] == ["stop", "length"]
    assert comps[0].anchor_logprob == pytest.approx(-0.875) and comps[1].anchor_logprob == pytest.approx(-3.0)
    job = PromptJob("p1", "sort: ba =", None, [3, 4], [11, 12])
    table = candidate_table(0, [job], [comps], "hash", "vllm", Sampling())
    assert table.column("sample_index").to_pylist() == [3, 4]
    assert table.column("num_tokens").to_pylist() == [3, 2]
    assert table.column("backend").to_pylist() == ["vllm", "vllm"]


def test_missing_or_non_finite_logprobs_are_errors():
    out = fake_output("r1", [("a", [1], [-1.0], "stop")])
    out.outputs[0].logprobs = None
    out.outputs[0].cumulative_logprob = None
    with pytest.raises(ValueError, match="logprobs=0"):
        to_completions(out)
    bad = fake_output("r2", [("a", [1], [-math.inf], "stop")])
    with pytest.raises(ValueError, match="non-finite"):
        to_completions(bad)


def test_a_count_mismatch_is_caught():
    job = PromptJob("p1", "x", None, [0, 1, 2], [1, 2, 3])
    comps = to_completions(fake_output("r", [("a", [1], [-1.0], "stop")]))
    with pytest.raises(RuntimeError, match="returned 1 completions for 3"):
        candidate_table(0, [job], [comps], "h", "vllm", Sampling())


def _has_cuda_vllm() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda_vllm(), reason="vLLM runs only on a CUDA GPU with vllm installed")
def test_vllm_backend_on_the_tiny_model(untrained_model):
    from bond_data.backends.vllm import VLLMBackend

    backend = VLLMBackend(str(untrained_model), gpu_memory_utilization=0.3, enforce_eager=True)
    jobs = [PromptJob("a", "sort: dcba =", None, [0, 1, 2, 3], [5, 6, 7, 8])]
    (comps,) = backend.generate(jobs, Sampling(max_new_tokens=8))
    assert len(comps) == 4 and all(c.anchor_logprob < 0 and c.token_ids for c in comps)
    again = backend.generate(jobs, Sampling(max_new_tokens=8))[0]
    assert [c.token_ids for c in again] == [c.token_ids for c in comps]  # seeded


# ---- prompts go in as token ids: the ones the trainer scores after, one BOS -------------------------
class FakeLLM:
    """Shaped like vllm.LLM for what the backend calls: get_tokenizer, generate (records its prompts),
    llm_engine.model_config.dtype."""

    def __init__(self, tokenizer):
        self.tokenizer, self.prompts = tokenizer, None
        self.llm_engine = NS(model_config=NS(dtype="torch.bfloat16"))

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, params, use_tqdm=True):
        self.prompts = prompts
        return [fake_output(str(i), [("a", [65], [-1.0], "stop")]) for i in range(len(prompts))]


@pytest.fixture
def bos_tokenizer():
    """The tiny byte-level tokenizer made to add a BOS to plain text, with a chat template that
    writes its own BOS: the case where templated text re-tokenized gets two."""
    from tokenizers import processors

    from bond_data.tasks.common import build_tokenizer

    tok = build_tokenizer()
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    assert tok("x")["input_ids"][0] == bos  # it does add one to plain text
    return tok


def test_prompts_go_to_vllm_as_the_trainers_token_ids_with_one_bos(bos_tokenizer, monkeypatch):
    from bond_data.backends.hf import prompt_token_ids  # what the trainer renders prompts with
    from bond_data.backends.vllm import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", NS(SamplingParams=lambda **kw: NS(**kw)))  # vllm's, stood in

    llm = FakeLLM(bos_tokenizer)
    backend = VLLMBackend("unused", llm=llm)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort: ba ="}]
    jobs = [PromptJob("p", "sort: ba =", None, [0], [1]), PromptJob("c", "", chat, [0], [2])]
    out = backend.generate(jobs, Sampling(max_new_tokens=4))
    assert len(out) == 2 and out[0][0].token_ids == [65]
    bos = bos_tokenizer.bos_token_id
    for job, sent in zip(jobs, llm.prompts):
        assert set(sent) == {"prompt_token_ids"}  # a TokensPrompt: vLLM does not tokenize it again
        ids = sent["prompt_token_ids"]
        assert ids == prompt_token_ids(bos_tokenizer, job.prompt, job.messages)
        assert ids[0] == bos and ids.count(bos) == 1
    assert bos_tokenizer.decode(llm.prompts[1]["prompt_token_ids"][1:]) == "system: be brief\nuser: sort: ba =\nassistant:"
    # the text the backend used to pass: vLLM's own tokenization would have added a second BOS
    text = bos_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert bos_tokenizer(text)["input_ids"][:2] == [bos, bos]


def test_the_lineage_records_vllms_own_precision(bos_tokenizer):
    from bond_data.backends.vllm import VLLMBackend

    backend = VLLMBackend("unused", llm=FakeLLM(bos_tokenizer), dtype="auto")
    assert backend.precision(Sampling()) == "vllm-bfloat16"  # the dtype "auto" resolved to
    backend.llm.llm_engine = None  # an engine that does not say: the dtype asked for
    assert VLLMBackend("unused", llm=NS(get_tokenizer=lambda: bos_tokenizer), dtype="float16").precision(Sampling()) \
        == "vllm-float16"
