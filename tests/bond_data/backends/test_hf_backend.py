"""The transformers backend: chat templates, and the seeded sampler's uniforms."""

from __future__ import annotations

from bond_data.backends.base import PromptJob, Sampling
from bond_data.backends.hf import TransformersBackend


def test_chat_prompts_are_rendered_with_the_chat_template(untrained_model):
    backend = TransformersBackend.from_pretrained(str(untrained_model), batch_size=4)
    messages = [{"role": "user", "content": "sort: cab ="}]
    job = PromptJob("c", "user: sort: cab =", messages, [0], [1])
    rendered = backend.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert backend.render(job) == backend.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    (comps,) = backend.generate([job], Sampling(max_new_tokens=4))
    assert len(comps) == 1 and comps[0].token_ids


def test_seeded_uniforms_depend_only_on_seed_step_and_token():
    import torch

    from bond_data.backends.hf import seeded_uniform

    a = seeded_uniform(torch.tensor([1, 2, 3]), step=4, vocab=50)  # [B, V]
    b = seeded_uniform(torch.tensor([3, 1]), step=4, vocab=50)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])  # a row's noise ignores its batch
    assert not torch.equal(a, seeded_uniform(torch.tensor([1, 2, 3]), step=5, vocab=50))
    u = seeded_uniform(torch.arange(200), step=0, vocab=500).flatten()
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float((u < 0.1).double().mean()) - 0.1) < 0.005


def test_seeded_uniforms_are_splitmix64_of_the_counter():
    """The in-place tensor code against SplitMix64 written out on Python integers (mod 2^64)."""
    import torch

    from bond_data.backends.hf import seeded_uniform

    mask, golden = (1 << 64) - 1, 0x9E3779B97F4A7C15

    def splitmix(x):
        x = (x + golden) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    seeds, step, vocab = [0, 7, 2**62 + 12345, -(2**63), -1], 3, 40
    got = seeded_uniform(torch.tensor(seeds), step, vocab)
    for b, seed in enumerate(seeds):
        base = splitmix((seed + step * golden) & mask)
        for t in range(vocab):
            bits = splitmix((base + t * 0xD1B54A32D192ED03) & mask)
            assert float(got[b, t]) == ((bits >> 11) + 0.5) / 2**53
