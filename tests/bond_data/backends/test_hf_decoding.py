"""The transformers backend's decoding paths: a static KV cache samples the very tokens the dynamic
one does (the noise is a function of seed, step and token, never of the batch or the cache), and
paths that cannot run are refused in one line."""

from __future__ import annotations

import pytest
import torch

from bond_data.backends.base import PromptJob, Sampling
from bond_data.backends.hf import TransformersBackend, check_decoding
from bond_data.config import ConfigError, GenerateConfig
from bond_data.tasks.families import save_family_model

PROMPTS = ["sort: dcba =", "zyx", "a much longer prompt than the others, to force left padding"]


def jobs(k=3):
    return [PromptJob(str(j), p, None, list(range(k)), [97 * j + s for s in range(k)]) for j, p in enumerate(PROMPTS)]


def sample(folder, decoding, batch_size, device="cpu", precision="auto"):
    backend = TransformersBackend.from_pretrained(str(folder), batch_size=batch_size, device=device, decoding=decoding)
    return backend.generate(jobs(), Sampling(max_new_tokens=10, precision=precision))


def assert_same(a, b, atol):
    for ja, jb in zip(a, b):
        for ca, cb in zip(ja, jb):
            assert ca.token_ids == cb.token_ids and ca.finish_reason == cb.finish_reason
            assert abs(ca.anchor_logprob - cb.anchor_logprob) < atol and abs(ca.sample_logprob - cb.sample_logprob) < atol


@pytest.mark.parametrize("family", ["tiny-llama", pytest.param("qwen2", marks=pytest.mark.slow),
                                    pytest.param("gemma2", marks=pytest.mark.slow),  # sliding-window layers
                                    pytest.param("gemma3", marks=pytest.mark.slow)])  # sliding and global layers
def test_static_cache_samples_the_same_tokens_as_the_dynamic_cache(family, untrained_model, tmp_path):
    folder = untrained_model if family == "tiny-llama" else save_family_model(family, tmp_path / family)
    dynamic = sample(folder, "dynamic", batch_size=16)
    assert_same(sample(folder, "static", batch_size=16), dynamic, atol=1e-4)
    assert_same(sample(folder, "static", batch_size=5), dynamic, atol=1e-4)  # other batches, other padding


def test_decoding_paths_that_cannot_run_are_refused(untrained_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(untrained_model))
    cpu = torch.device("cpu")
    assert check_decoding(model, cpu, "dynamic") == {}
    assert check_decoding(model, cpu, "static")["cache_implementation"] == "static"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_decoding(model, cpu, "static-compiled")
    with pytest.raises(ValueError, match="use one of"):
        check_decoding(model, cpu, "paged")
    model._can_compile_fullgraph = False  # as for architectures transformers cannot compile whole
    with pytest.raises(ValueError, match="cannot be compiled whole"):
        check_decoding(model, torch.device("cuda"), "static-compiled")
    with pytest.raises(ConfigError, match="field 'decoding'.*needs a CUDA device"):
        GenerateConfig.validate_as({"decoding": "static-compiled", "device": "cpu"}, "flags")
    with pytest.raises(ConfigError, match="field 'decoding'.*transformers option"):
        GenerateConfig.validate_as({"decoding": "static", "backend": "vllm"}, "flags")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_static_compiled_matches_dynamic_on_a_gpu(untrained_model):
    """fp32, so that only the kernels differ: compiled kernels may round differently, which can flip
    a near-tie in the argmax and change the rest of a row; nearly every row must agree exactly."""
    dynamic = sample(untrained_model, "dynamic", 16, "cuda", "fp32")
    compiled = sample(untrained_model, "static-compiled", 16, "cuda", "fp32")
    rows = [(a, b) for ja, jb in zip(dynamic, compiled) for a, b in zip(ja, jb)]
    same = [(a, b) for a, b in rows if a.token_ids == b.token_ids]
    assert len(same) >= 0.9 * len(rows)
    assert all(abs(a.anchor_logprob - b.anchor_logprob) < 1e-3 for a, b in same)
